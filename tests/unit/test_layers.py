"""The import contracts of pyproject.toml (`make lint` runs them too): the library stands alone, pipelines build on
it, jobs on both, and the library imports no Ray, DeepSpeed or MLflow, not even inside a function; inside the library,
integrations build on the model, data and metrics rooms, those on processing, and everything on io."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(exe), "--no-cache"], cwd=root, capture_output=True, text=True)


def test_the_import_contracts_hold():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "library <- pipelines <- jobs KEPT" in done.stdout
    assert "the library imports no Ray, DeepSpeed or MLflow KEPT" in done.stdout
    assert "all on io KEPT" in done.stdout


def test_a_library_module_that_imports_mlflow_or_jobs_breaks_them(tmp_path):
    """The contracts can fail: a copy of the packages with one offending module inside a function."""
    for package in ("convllava", "pipelines", "jobs"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "convllava" / "offender.py").write_text(
        "def f():\n    import mlflow\n    from jobs.dag import runner\n"
    )
    (tmp_path / "convllava" / "io" / "offender.py").write_text("from convllava.data import shards\n")
    done = _lint_imports(tmp_path)
    assert done.returncode == 1
    assert (
        "library <- pipelines <- jobs BROKEN" in done.stdout and "convllava.offender -> jobs.dag.runner" in done.stdout
    )
    assert "imports no Ray, DeepSpeed or MLflow BROKEN" in done.stdout and "convllava.offender -> mlflow" in done.stdout
    assert "all on io BROKEN" in done.stdout and "convllava.io.offender -> convllava.data.shards" in done.stdout
