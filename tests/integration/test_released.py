"""A checkpoint in the released layout with a Vicuna-style sentencepiece tokenizer, used as a new user would:
`convllava chat` and `convllava eval` straight on the LLaVA-layout directory. The chat reply is checked against a
greedy decode through the reference modules (HF ConvNext tower, projector, HF Llama) on the sequence LLaVA's
`tokenizer_image_token` builds (computed with sentencepiece alone) and the pixels LLaVA's `pad` preprocessing gives."""

from __future__ import annotations

import json
import shutil

import pytest

from convllava.modeling.checkpoint import load_model
from jobs import cli

pytestmark = pytest.mark.integration


def test_eval_cli_scores_the_released_layout_end_to_end(released_spm, photos, tmp_path, ray_local):
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    from convllava.modeling.inference import GenerationOptions, generate
    from convllava.processing.image_processing import load_image
    from jobs.evaluate.benchmarks import SHORT_PROMPT

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    # What the model answers each question (one at a time, in this process): the annotators of question 0 agree
    # with it 4 times out of 10, so the suite's score is not 0 by construction.
    model, processor = load_model(released_spm.llm_dir)
    questions = [f"What is shown? ({photo.name})" for photo in photos[:3]]
    replies = [
        generate(
            model, processor, [f"{q}\n{SHORT_PROMPT}"], [load_image(p.path)], GenerationOptions(max_new_tokens=32)
        )[0]
        for q, p in zip(questions, photos, strict=False)
    ]
    rows = []
    for i, (photo, question) in enumerate(zip(photos, questions, strict=False)):
        shutil.copy(photo.path, data / "images" / photo.path.name)
        answers = ([replies[0]] * 4 if i == 0 else []) + [photo.subject] * 3 + ["a photo"] * (3 if i == 0 else 7)
        rows.append({"question_id": i, "question": question, "image": f"images/{photo.path.name}", "answers": answers})
    (data / "questions.json").write_text(json.dumps(rows))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: released\nroot: {data}\nbenchmarks:\n  - {{name: textvqa, kind: vqa}}\n")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as done:
        cli.main(["eval", "--model", str(released_spm.llm_dir), "--suite", str(suite), "--output", str(out)])
    assert done.value.code == 0

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows) and all(p["error"] is None for p in predictions)
    assert all(isinstance(p["prediction"], str) for p in predictions)
    by_id = {str(r["question_id"]): r for r in rows}
    assert {p["id"]: p["prediction"] for p in predictions} == {str(i): r for i, r in enumerate(replies)}
    expected = [
        textvqa_process_results(dict(by_id[p["id"]], answers=list(by_id[p["id"]]["answers"])), [p["prediction"]])
        for p in predictions
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["textvqa/accuracy"] == pytest.approx(sum(e["exact_match"] for e in expected) / 3, abs=1e-12)
    assert metrics["textvqa/accuracy"] >= 0.9 / 3  # question 0: 4 of 10 annotators gave the model's reply
