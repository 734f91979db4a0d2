"""The cluster config's eval gate on the paper's benchmarks (jobs/configs/cluster.yaml + suites/paper.yaml).

A miniature benchmark root in exactly the layout paper.yaml documents (TextVQA val, DocVQA val, POPE's three COCO
splits, MME's subtask folders), with real photos: the suite loads every file, its scorers report the cluster's
primary metric `textvqa/accuracy` with VQA soft accuracy's exact values, PipelineConfig refuses a primary metric
the suite does not report, and the registry's champion gate decides by that metric alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from eval_gate_harness import score_answers

from convllava.io.config import ConfigLoadError
from jobs.dag.config import PipelineConfig
from jobs.evaluate.suite import fixed_metric_names, load_suite, metric_value
from jobs.tracking import registry
from jobs.tracking.runs import client

CLUSTER = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "cluster.yaml"
# TextVQA: how many of the 10 annotators gave the first answer (the rest say "other"): k = 10, 2, 1 score
# 1.0, 0.6 and 0.3 when that answer is predicted.
EXPECTED_COUNTS = {"textvqa": 3, "docvqa": 2, "pope_adversarial": 4, "pope_popular": 3, "pope_random": 2, "mme": 8}


def _flip(word: str) -> str:
    return "No" if word.lower() == "yes" else "Yes"


def _first_reference(b, it) -> str:
    return it.reference[0] if isinstance(it.reference, list) else it.reference


def _soft_accuracy(prediction: str, answers: list[str]) -> float:
    """EvalAI's VQA accuracy: over the 10 leave-one-out sets of 9 annotators, min(1, agreeing / 3), averaged."""
    n = len(answers)
    return sum(min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3) for i in range(n)) / n


def test_paper_suite_loads_every_benchmark_in_its_released_layout(paper_root):
    name, benches = load_suite("paper", data_root=str(paper_root))
    assert name == "paper"
    assert {b.name: len(b.items()) for b in benches} == EXPECTED_COUNTS
    for b in benches:
        for it in b.items():
            assert it.image is not None and (b.root / it.image).is_file(), (b.name, it.id, it.image)
    textvqa = {b.name: b for b in benches}["textvqa"].items()
    assert [it.image for it in textvqa] == [f"train_images/{i:04d}c91397f2fe05.jpg" for i in range(3)]
    assert all(len(it.reference) == 10 for it in textvqa)
    mme = {b.name: b for b in benches}["mme"].items()
    assert sorted({it.meta["subtask"] for it in mme}) == ["artwork", "code_reasoning", "existence"]
    assert [it.reference for it in mme] == ["Yes", "No"] * 4


def test_cluster_gate_metric_is_scored_by_the_paper_suite(paper_root):
    config = PipelineConfig.from_yaml(CLUSTER)
    assert (config.eval.suite, config.eval.data_root) == ("paper", "/mnt/work/benchmarks")
    assert (config.primary_metric, config.higher_is_better) == ("textvqa/accuracy", True)
    _, benches = load_suite(config.eval.suite, data_root=str(paper_root))
    right = score_answers(benches, _first_reference)
    assert config.primary_metric in right and set(fixed_metric_names(benches)) <= set(right)
    textvqa = {b.name: b for b in benches}["textvqa"].items()
    expected = sum(_soft_accuracy(it.reference[0], it.reference) for it in textvqa) / 3
    assert expected == pytest.approx((1.0 + 0.6 + 0.3) / 3, abs=1e-12)
    assert right["textvqa/accuracy"] == pytest.approx(expected, abs=1e-12)
    assert right["docvqa/anls"] == 1.0 and right["pope_random/f1"] == 1.0 and right["pope_adversarial/accuracy"] == 1.0
    assert (right["mme/perception"], right["mme/cognition"], right["mme/existence/score"]) == (400.0, 200.0, 200.0)
    # The majority answer ("other" where 8 or 9 annotators agree) scores 1.0; a wrong one 0.0; one wrong question
    # of three drops the first-reference score by that question's 1.0 / 3.
    majority = score_answers(
        benches,
        lambda b, it: max(set(it.reference), key=it.reference.count) if b.kind == "vqa" else _first_reference(b, it),
    )
    assert majority["textvqa/accuracy"] == pytest.approx(1.0, abs=1e-12)
    wrong = score_answers(benches, lambda b, it: "a giraffe" if b.kind == "vqa" else _first_reference(b, it))
    assert wrong["textvqa/accuracy"] == 0.0 < right["textvqa/accuracy"]
    one_wrong = score_answers(
        benches, lambda b, it: "a giraffe" if (b.kind, it.id) == ("vqa", textvqa[0].id) else _first_reference(b, it)
    )
    assert one_wrong["textvqa/accuracy"] == pytest.approx(right["textvqa/accuracy"] - 1.0 / 3, abs=1e-12)
    flipped = score_answers(benches, lambda b, it: _flip(it.reference) if b.kind in ("pope", "mme") else "zzz")
    assert (flipped["pope_random/f1"], flipped["mme/perception"], flipped["docvqa/anls"]) == (0.0, 0.0, 0.0)


def _cluster_with(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(CLUSTER.read_text())
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "cluster.yaml"  # stage configs resolve against jobs/configs, so a copy elsewhere still loads
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "metric", ["textvqa/accuracy", "docvqa/anls", "pope_random/f1", "mme/perception", "mme/existence/score"]
)
def test_primary_metrics_the_paper_suite_reports_are_accepted(tmp_path, metric):
    assert PipelineConfig.from_yaml(_cluster_with(tmp_path, primary_metric=metric)).primary_metric == metric


@pytest.mark.parametrize("metric", ["textvqa/acc", "vqav2/accuracy", "accuracy", "textvqa"])
def test_a_primary_metric_the_suite_does_not_report_is_refused(tmp_path, metric):
    path = _cluster_with(tmp_path, primary_metric=metric)
    with pytest.raises(ConfigLoadError) as info:
        PipelineConfig.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: primary_metric: {metric!r}") and "eval.suite 'paper'" in message
    assert "'textvqa/accuracy'" in message and "'docvqa/anls'" in message and "'mme/perception'" in message


def test_an_unknown_eval_suite_is_refused_when_the_config_loads(tmp_path):
    path = _cluster_with(tmp_path, eval={"suite": "papr"})
    with pytest.raises(ConfigLoadError, match=r"cluster\.yaml: eval\.suite: unknown suite 'papr'.*'paper'"):
        PipelineConfig.from_yaml(path)


def test_champion_gate_decides_by_textvqa_accuracy_alone(paper_root, tmp_path):
    """Versions scored on the mini suite: a candidate better everywhere but TextVQA keeps the champion; one that
    wins TextVQA while scoring 0 on DocVQA, POPE and MME takes it, as cluster.yaml's gate says."""
    config = PipelineConfig.from_yaml(CLUSTER)
    _, benches = load_suite(config.eval.suite, data_root=str(paper_root))
    first = score_answers(benches, _first_reference)  # textvqa 0.633, the rest perfect
    worse = score_answers(benches, lambda b, it: "a giraffe" if b.kind == "vqa" else _first_reference(b, it))
    better = score_answers(
        benches,
        lambda b, it: (
            max(set(it.reference), key=it.reference.count)
            if b.kind == "vqa"
            else _flip(it.reference)
            if b.kind in ("pope", "mme")
            else "zzz"
        ),
    )
    assert worse["docvqa/anls"] > better["docvqa/anls"] and worse["mme/perception"] > better["mme/perception"]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(tracking)
    run = c.create_run(c.create_experiment("gate", artifact_location=str(tmp_path / "art"))).info.run_id
    gates = [
        registry.register_and_gate(
            tracking,
            config.registered_model,
            f"/ckpt/{i}",
            run,
            config.primary_metric,
            metric_value(m, config.primary_metric),
            config.higher_is_better,
        )
        for i, m in enumerate((first, worse, better))
    ]
    assert [g["decision"] for g in gates] == ["promoted", "kept the current champion", "promoted"]
    assert [g["candidate_value"] for g in gates] == [first["textvqa/accuracy"], 0.0, better["textvqa/accuracy"]]
    assert gates[1]["champion_value"] == pytest.approx((1.0 + 0.6 + 0.3) / 3, abs=1e-12)
    version, value = registry.current_champion(tracking, config.registered_model)
    assert (int(version), value) == (3, 1.0) and [g["version"] for g in gates] == [1, 2, 3]
    assert registry.champion_source(tracking, config.registered_model) == "/ckpt/2"
