"""The cluster config's eval gate on the paper's benchmarks (jobs/configs/cluster.yaml + suites/paper.yaml).

A miniature benchmark root in exactly the layout paper.yaml documents (TextVQA val, DocVQA val, POPE's three COCO
splits, MME's subtask folders), with real photos: the suite loads every file, its scorers report the cluster's
primary metric `textvqa/accuracy` with VQA soft accuracy's exact values, PipelineConfig refuses a primary metric
the suite does not report, and the registry's champion gate decides by that metric alone."""

from __future__ import annotations

import json

import pytest
from eval_gate_harness import score_answers

from jobs.evaluate.suite import load_suite, run_eval

# TextVQA: how many of the 10 annotators gave the first answer (the rest say "other"): k = 10, 2, 1 score
# 1.0, 0.6 and 0.3 when that answer is predicted.
EXPECTED_COUNTS = {"textvqa": 3, "docvqa": 2, "pope_adversarial": 4, "pope_popular": 3, "pope_random": 2, "mme": 8}

pytestmark = pytest.mark.integration


def test_convllava_eval_runs_the_tiny_model_over_the_paper_suite(paper_root, tmp_path, ray_local):
    import torch

    from convllava.modeling.checkpoint import save_checkpoint
    from convllava.modeling.config import ConvLlavaConfig
    from convllava.modeling.model import ConvLlavaForCausalLM
    from convllava.processing.processor import ConvLlavaProcessor

    torch.manual_seed(0)
    model_config = ConvLlavaConfig.from_preset("tiny")
    ckpt = save_checkpoint(
        ConvLlavaForCausalLM(model_config), ConvLlavaProcessor.for_model(model_config, "tiny"), tmp_path / "tiny"
    )
    out = run_eval(str(ckpt), "paper", tmp_path / "eval", data_root=str(paper_root), max_new_tokens=4)
    m = out.metrics
    for key, high in [
        ("textvqa/accuracy", 1),
        ("docvqa/anls", 1),
        ("pope_random/f1", 1),
        ("mme/perception", 400),
        ("mme/cognition", 200),
    ]:
        assert isinstance(m[key], float) and 0.0 <= m[key] <= high, (key, m[key])
    predictions = [json.loads(line) for line in (out.output / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == sum(EXPECTED_COUNTS.values()) and all(p["error"] is None for p in predictions)
    # metrics.json is the suite's scorers applied to the recorded predictions, nothing else.
    by_key = {(p["benchmark"], p["id"]): p["prediction"] for p in predictions}
    _, benches = load_suite("paper", data_root=str(paper_root))
    assert score_answers(benches, lambda b, it: by_key[(b.name, it.id)]) == json.loads(
        (out.output / "metrics.json").read_text()
    )
