"""`convllava predict` both ways: in this process (a machine alone, the default) and on a Ray Data actor pool."""

from __future__ import annotations

import json

import pytest

from convllava.io.storage import read_bytes
from convllava.modeling.checkpoint import image_settings, load_model, save_checkpoint
from convllava.modeling.inference import GenerationOptions, generate
from convllava.processing.image_processing import load_image
from pipelines.predict import image_bucket, make_batches, read_questions, replicas_for, run_predict

pytestmark = pytest.mark.integration


@pytest.fixture()
def questions(tmp_path, photos, tiny_model, tiny_processor):
    ckpt = save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt")
    for i, photo in enumerate(photos[:3]):
        (tmp_path / f"p{i}.png").write_bytes(photo.path.read_bytes())
    lines = [
        *(json.dumps({"id": f"q{i}", "question": f"What is in picture {i}?", "image": f"p{i}.png"}) for i in range(3)),
        json.dumps({"id": "text", "question": "Say hello."}),
        json.dumps({"id": "gone", "question": "And here?", "image": "missing.png"}),
        "not json",
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return ckpt, path


def test_alone_the_driver_answers_what_generate_answers(questions, tmp_path, ray_local):
    ckpt, path = questions
    assert replicas_for(None, None) == 0  # one node, no GPU: no actor, no second copy of the weights
    assert replicas_for(0, None) == 0 and replicas_for(2, None) == 2
    summary = run_predict(str(ckpt), str(path), str(tmp_path / "answers.jsonl"), max_new_tokens=6, batch_size=2)
    assert "(in this process)" in summary and "4 answered, 2 errors" in summary, summary
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["q0", "q1", "q2", "text", "gone", "line-6"]  # input order
    assert "not found" in answers[4]["error"] and answers[5]["error"].startswith("line 6:")
    # The same batches through `generate` here: the same answers, word for word.
    model, processor = load_model(ckpt)
    options = GenerationOptions(max_new_tokens=6)
    expected = {}
    asked = read_questions(str(path), None, image_bucket(image_settings(str(ckpt))))
    for batch in make_batches(asked, batch_size=2):
        images = [load_image(read_bytes(q.image_uri)) if q.image_uri else None for q in batch]
        replies = generate(model, processor, [q.question for q in batch], images, options)
        expected.update(zip((q.id for q in batch), replies, strict=True))
    assert {a["id"]: a["answer"] for a in answers if "answer" in a} == expected


def test_an_actor_pool_answers_every_line_too(questions, tmp_path, ray_local):
    ckpt, path = questions
    summary = run_predict(
        str(ckpt), str(path), str(tmp_path / "answers.jsonl"), max_new_tokens=6, batch_size=2, workers=2
    )
    assert "2 replicas" in summary and "4 answered, 2 errors" in summary, summary
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["q0", "q1", "q2", "text", "gone", "line-6"]
    assert all(isinstance(a["answer"], str) for a in answers[:4])
