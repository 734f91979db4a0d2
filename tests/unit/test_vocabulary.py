"""The MLflow vocabulary (`jobs.tracking.vocabulary`): every tag, metric and artifact name spelled once, no tag
spelled anywhere else in jobs/, and the names the readers build the same as the writers'."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from jobs.dag.runbook import key_metric
from jobs.tracking import vocabulary

ROOT = Path(__file__).resolve().parents[2]
VOCABULARY = ROOT / "jobs" / "tracking" / "vocabulary.py"


def _constants() -> dict[str, str]:
    """The module's string constants, by name."""
    return {k: v for k, v in vars(vocabulary).items() if k.isupper() and isinstance(v, str)}


def _is_module(name: str) -> bool:
    """`convllava.x.y` naming a module of the package (an import path, not a tag)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant in a source file (f-strings' literal parts too), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_tag_is_spelled_outside_the_vocabulary():
    tags = {v for k, v in _constants().items() if k.startswith("TAG_") or k.endswith("_TAG")}
    sources = [p for p in sorted((ROOT / "jobs").rglob("*.py")) if p != VOCABULARY]
    sources += sorted((ROOT / "pipelines").rglob("*.py"))
    assert len(sources) > 30
    found = []
    for path in sources:
        for line, value in _string_literals(path):
            if (value.startswith("convllava.") and not _is_module(value.rstrip("."))) or value in tags:
                found.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert not found, "MLflow names spelled outside jobs/tracking/vocabulary.py:\n" + "\n".join(found)


def test_the_scan_would_see_a_tag_literal(tmp_path):
    """The scan above finds a tag in a plain string and in an f-string, and takes an import path for what it is."""
    source = tmp_path / "example.py"
    source.write_text('a = "convllava.node"\nb = f"convllava.gate.{a}"\nc = "convllava.data.shards"\n')
    tagged = [v for _, v in _string_literals(source) if v.startswith("convllava.") and not _is_module(v.rstrip("."))]
    assert tagged == ["convllava.node", "convllava.gate."]


def test_names_are_unique_and_each_is_explained():
    constants = _constants()
    values = list(constants.values())
    assert len(values) > 40
    duplicated = sorted({v for v in values if values.count(v) > 1})
    assert not duplicated, duplicated
    # Every constant's line says what it holds (a trailing comment).
    assignments = [line for line in VOCABULARY.read_text().splitlines() if re.match(r"^[A-Z_]+ = ", line)]
    assert len(assignments) == len([k for k in vars(vocabulary) if k.isupper()])
    assert all("  # " in line for line in assignments), [line for line in assignments if "  # " not in line]
    # Tags are ours (convllava.*) or MLflow's own (mlflow.*); no other name looks like a tag.
    for name, value in constants.items():
        if name.startswith("TAG_") or name.endswith("_TAG"):
            assert value.startswith(("convllava.", "mlflow.")), name
        else:
            assert not value.startswith(("convllava.", "mlflow.")), name


def test_readers_build_the_names_the_writers_log():
    """`pipeline status` and the DAG's summary find the eval metric the suite logged (`@` spelled `_at_`), the
    stage loss the recipe logged, and the rows preprocessing wrote."""
    logged = {vocabulary.eval_metric("pope/f1@0.5"): 0.8, vocabulary.TRAIN_LOSS: 1.5}
    assert vocabulary.eval_metric("pope/f1@0.5") == "eval/pope/f1_at_0.5"
    assert key_metric("eval", logged, "pope/f1@0.5") == ("eval/pope/f1_at_0.5", 0.8)
    assert key_metric("stage2", logged) == ("train/loss", 1.5)
    counts = {vocabulary.preprocess_metric(d, c): 10 for d in ("captions", "instruct") for c in ("read", "written")}
    assert key_metric("preprocess", counts) == (vocabulary.WRITTEN, 20)
    assert vocabulary.resize_tag(120) == "convllava.resize.step_000120"
    assert vocabulary.gate_tag("decision") == "convllava.gate.decision"
    assert vocabulary.startup_metric("driver") == "startup/driver_s"
    assert vocabulary.stage_run_name("stage2", "0123456789abcdef", "fedcba9876543210") == "stage2-0123456789-fedcba98"
