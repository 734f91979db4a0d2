"""The lmms-eval and VLMEvalKit adapters on a tiny random-weight checkpoint and the demo data, offline.

lmms-eval runs for real: its own evaluator (`simple_evaluate`) in-process and its `lmms-eval` command in a
subprocess, which finds `--model convllava` through the `lmms_eval.models` entry point."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from convllava.metrics.demo import normalize_short_answer
from convllava.modeling.checkpoint import load_model
from convllava.modeling.inference import GenerationOptions, generate
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.image_processing import ImageError, load_image
from convllava.processing.processor import ConvLlavaProcessor

N_EVAL = 10


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> tuple[ConvLlavaForCausalLM, ConvLlavaProcessor]:
    """The checkpoint loaded independently of the adapters, for `convllava.modeling.inference.generate`."""
    return load_model(tiny_ckpt)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------- lmms-eval
def _evaluate(lm, task: str, include_path: Path) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    return simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True)


def _check_against_generate(results: dict, task: str, records: list[dict], image_root: Path, reference) -> None:
    """The evaluator saw every record once, its answers are `generate`'s, and its score is their exact match."""
    model, processor = reference
    assert results["n-samples"][task] == {"original": N_EVAL, "effective": N_EVAL}
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == N_EVAL
    options = GenerationOptions(max_new_tokens=16)  # the task's generation_kwargs (greedy)
    for sample, record in zip(samples, records, strict=True):
        assert sample["target"] == record["answer"]
        image = load_image(image_root / record["image"])
        expected = generate(model, processor, [record["question"]], [image], options)[0]
        assert sample["filtered_resps"][0] == expected.split("\n\n")[0]  # lmms-eval's default until: "\n\n"
    accuracy = results["results"][task]["exact_match,none"]
    assert 0.0 <= accuracy <= 1.0
    hits = [
        normalize_short_answer(s["filtered_resps"][0]) == normalize_short_answer(r["answer"])
        for s, r in zip(samples, records, strict=True)
    ]
    assert accuracy == pytest.approx(sum(hits) / N_EVAL)


def test_lmms_eval_simple_evaluate_runs_the_shipped_demo_task(tiny_ckpt, reference, demo_root, offline, monkeypatch):
    from convllava.integrations.lmms_eval import TASKS_DIR, ConvLlavaLmms

    monkeypatch.chdir(demo_root)  # the shipped YAML reads eval/open.jsonl and images/ relative to the data root
    lm = ConvLlavaLmms(pretrained=str(tiny_ckpt), device="cpu")
    results = _evaluate(lm, "convllava_demo_open", TASKS_DIR)
    assert results["higher_is_better"]["convllava_demo_open"] == {"exact_match": True}
    _check_against_generate(
        results, "convllava_demo_open", _records(demo_root / "eval" / "open.jsonl"), demo_root, reference
    )


def test_lmms_eval_write_task_runs_from_any_directory(tiny_ckpt, reference, demo_root, offline, monkeypatch):
    from convllava.integrations.lmms_eval import ConvLlavaLmms, write_task

    yaml_path = write_task(demo_root / "eval" / "pope.jsonl", offline / "tasks", "demo_pope", image_root=demo_root)
    assert yaml_path == offline / "tasks" / "demo_pope.yaml"
    copied = _records(offline / "tasks" / "demo_pope.jsonl")
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in copied)
    monkeypatch.chdir(offline)  # neither the data root nor the task folder
    results = _evaluate(ConvLlavaLmms(pretrained=str(tiny_ckpt), device="cpu"), "demo_pope", yaml_path.parent)
    _check_against_generate(results, "demo_pope", _records(demo_root / "eval" / "pope.jsonl"), demo_root, reference)


def test_lmms_eval_manifest_resolves_to_the_adapter_class():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from convllava.integrations import lmms_eval_manifest
    from convllava.integrations.lmms_eval import ConvLlavaLmms

    registry = ModelRegistryV2()
    registry.register_manifest(lmms_eval_manifest())
    assert registry.get_model_class("convllava") is ConvLlavaLmms  # also checks: an lmms subclass, is_simple


def _instance(request_type: str, arguments: tuple, doc_id: int = 0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type, arguments, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def lmms_adapter(tiny_ckpt):
    from convllava.integrations.lmms_eval import ConvLlavaLmms

    return ConvLlavaLmms(pretrained=str(tiny_ckpt), device="cpu", batch_size=2)


def test_lmms_eval_generate_until_keeps_order_across_settings_and_cuts_at_until(lmms_adapter, reference, photos):
    model, processor = reference
    docs = [{"image": photos[0].path, "q": "What is it?"}, {"image": None, "q": "Hello"}, {"image": photos[1].path}]
    lmms_adapter.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [load_image(doc["image"])] if doc["image"] else []  # noqa: E731
    settings = [{"max_new_tokens": 5, "temperature": 0}, {"max_new_tokens": 3}, {"max_new_tokens": 5, "until": "zz"}]
    questions = ["What is it?", "Hello", "Describe <image> briefly."]
    requests = [
        _instance("generate_until", (q, dict(s), visual, i, "t", "test"))
        for i, (q, s) in enumerate(zip(questions, settings, strict=True))
    ]
    answers = lmms_adapter.generate_until(requests)
    for i, (question, setting) in enumerate(zip(questions, settings, strict=True)):
        image = visual(docs[i])
        alone = generate(model, processor, [question], image or [None], GenerationOptions(setting["max_new_tokens"]))
        assert answers[i] == alone[0].split("zz")[0]

    # `until` cuts the reply at the first stop string: stop at a piece of the reply itself (a random model's reply
    # need not hold a space, so no word split).
    first = answers[0]
    assert len(first) >= 4, first
    stop = first[2:4]
    cut = lmms_adapter.generate_until(
        [_instance("generate_until", ("What is it?", {**settings[0], "until": [stop]}, visual, 0, "t", "test"))]
    )
    assert cut == [first[: first.index(stop)]] and len(cut[0]) < len(first)


def test_lmms_eval_loglikelihood_matches_a_direct_forward_pass(lmms_adapter, reference, photos):
    model, processor = reference
    doc = {"image": photos[0].path}
    lmms_adapter.task_dict = {"t": {"test": [doc]}}
    visual = lambda d: [load_image(d["image"])]  # noqa: E731
    batch = processor.prompts(["Is there a cat?"], [load_image(doc["image"])])
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[0, -1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    greedy_id = int(log_probs.argmax())
    other_id = processor.tokenizer(" yes", add_special_tokens=False)["input_ids"]
    assert len(other_id) == 1 and other_id[0] != greedy_id  # a one-token continuation that greedy would not pick
    greedy_text = processor.tokenizer.decode([greedy_id])
    assert processor.tokenizer(greedy_text, add_special_tokens=False)["input_ids"] == [greedy_id]

    requests = [
        _instance("loglikelihood", ("Is there a cat?", cont, visual, 0, "t", "test")) for cont in (greedy_text, " yes")
    ]
    (greedy_score, is_greedy), (yes_score, yes_greedy) = lmms_adapter.loglikelihood(requests)
    assert greedy_score == pytest.approx(float(log_probs[greedy_id]), abs=1e-4) and is_greedy
    assert yes_score == pytest.approx(float(log_probs[other_id[0]]), abs=1e-4) and not yes_greedy
    # Plain `loglikelihood` tasks pass doc_to_target (a function of the doc) as the continuation.
    by_target = _instance("loglikelihood", ("Is there a cat?", lambda d: " yes", visual, 0, "t", "test"))
    assert lmms_adapter.loglikelihood([by_target])[0][0] == pytest.approx(yes_score, abs=1e-5)


def test_lmms_eval_adapter_refuses_what_it_cannot_do(tiny_ckpt, lmms_adapter, monkeypatch, tmp_path):
    from convllava.integrations.lmms_eval import ConvLlavaLmms, generation_options, write_task

    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['conv_template'\]"):
        ConvLlavaLmms(pretrained=str(tiny_ckpt), conv_template="vicuna")
    with pytest.raises(ValueError, match="batch_size"):
        ConvLlavaLmms(pretrained=str(tiny_ckpt), batch_size="auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        ConvLlavaLmms(pretrained=str(tiny_ckpt))
    monkeypatch.delenv("WORLD_SIZE")

    lmms_adapter.task_dict = {"t": {"test": [{"video": "clip.mp4"}]}}
    video = _instance("generate_until", ("What happens?", {}, lambda d: [object()], 0, "t", "test"))
    with pytest.raises(ValueError, match="task t doc 0: doc_to_visual gave a object; convllava takes images only"):
        lmms_adapter.generate_until([video])
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lmms_adapter.generate_until_multi_round([])

    greedy, stops, unused = generation_options({"temperature": 0, "do_sample": True, "until": ["\n"], "x": 1}, 64)
    assert (greedy.do_sample, greedy.max_new_tokens, stops, unused) == (False, 64, ("\n",), ("x",))
    sampled, _, _ = generation_options({"temperature": 0.7, "do_sample": True, "top_p": 0.9}, 8)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.7, 0.9)

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What?", "answer": "x", "image": "missing.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"q\.jsonl:1: image .*missing\.png does not exist"):
        write_task(questions, tmp_path / "out")
    questions.write_text(json.dumps({"question": "What?", "answer": "x", "image": "../escape.png"}) + "\n")
    with pytest.raises(ValueError, match="leaves the image root"):
        write_task(questions, tmp_path / "out")
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        write_task(questions, tmp_path / "out", task="my task")


def test_lmms_eval_task_scoring_normalises_answers():
    from convllava.integrations.lmms_eval_tasks.utils import doc_to_text, doc_to_visual, process_results

    doc = {"question": "How many?", "answer": "3", "image": None}
    assert process_results(doc, [" Three."]) == {"exact_match": 1.0}
    assert process_results(doc, ["4"]) == {"exact_match": 0.0}
    assert doc_to_visual(doc) == []
    assert doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": " A:"}) == "Q: How many? A:"


# ---------------------------------------------------------------------------------------------------- VLMEvalKit
@pytest.fixture(scope="module")
def vlm(tiny_ckpt):
    from convllava.integrations.vlmevalkit import ConvLlavaVLMEvalKit

    return ConvLlavaVLMEvalKit(tiny_ckpt, device="cpu", max_new_tokens=6)


def test_vlmevalkit_base_class_and_prompt_defaults(vlm):
    from convllava.integrations.vlmevalkit import LocalBaseModel

    if importlib.util.find_spec("vlmeval") is None:
        assert isinstance(vlm, LocalBaseModel)
    else:
        from vlmeval.vlm.base import BaseModel

        assert isinstance(vlm, BaseModel)
    assert vlm.INTERLEAVE is True
    assert vlm.use_custom_prompt("MMBench_DEV_EN") is False
    assert vlm.build_prompt({"question": "?"}, "MMBench_DEV_EN") is None


@pytest.mark.parametrize(
    "message, question",
    [
        ([{"type": "text", "value": "Say hello."}], "Say hello."),
        ([{"type": "image", "value": "PHOTO"}, {"type": "text", "value": "What is it?"}], "What is it?"),
        (
            [
                {"type": "text", "value": "Look at this."},
                {"type": "image", "value": "PHOTO"},
                {"type": "text", "value": "What colour dominates?"},
            ],
            "Look at this.\n<image>\nWhat colour dominates?",
        ),
    ],
    ids=["text-only", "image-then-text", "text-image-text"],
)
def test_vlmevalkit_answers_like_generate(vlm, reference, photos, message, question):
    model, processor = reference
    path = str(photos[0].path)
    message = [{**item, "value": path} if item["value"] == "PHOTO" else item for item in message]
    has_image = any(item["type"] == "image" for item in message)
    answer = vlm.generate_inner(message, dataset="MMBench_DEV_EN")
    expected = generate(model, processor, [question], [load_image(path) if has_image else None], vlm.options)[0]
    assert isinstance(answer, str)
    assert answer == expected
    assert vlm.generate(message) == answer  # the framework's entry point checks, then calls generate_inner


def test_vlmevalkit_places_each_image_at_its_tag(vlm, photos):
    from convllava.integrations.vlmevalkit import message_to_prompt

    message = [
        {"type": "image", "value": str(photos[0].path)},
        {"type": "text", "value": "and"},
        {"type": "image", "value": str(photos[1].path)},
        {"type": "text", "value": "Which is brighter?"},
    ]
    text, images = message_to_prompt(message)
    assert text == "<image>\nand\n<image>\nWhich is brighter?"
    assert [im.size for im in images] == [load_image(photos[i].path).size for i in (0, 1)]
    assert isinstance(vlm.generate_inner(message), str)


def test_vlmevalkit_bad_messages_say_what_is_wrong(vlm, tmp_path):
    missing = tmp_path / "nope.jpg"
    cases = [
        ([], ValueError, "non-empty list"),
        ([{"type": "video", "value": "clip.mp4"}], ValueError, "message item 0: unknown type 'video'"),
        ([{"type": "text"}], ValueError, "message item 0: expected a dict with 'type' and 'value'"),
        (
            [{"type": "text", "value": "a"}, {"type": "image", "value": str(missing)}],
            ImageError,
            f"message item 1: {missing}: file not found",
        ),
        ([{"type": "image", "value": "https://example.com/a.jpg"}], ValueError, "message item 0: .* is a URL"),
        ([{"type": "text", "value": "<image> what?"}], ValueError, "pass images as"),
    ]
    for message, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            vlm.generate_inner(message)
