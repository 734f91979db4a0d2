"""A checkpoint in the released layout with a Vicuna-style sentencepiece tokenizer, used as a new user would:
`convllava chat` and `convllava eval` straight on the LLaVA-layout directory. The chat reply is checked against a
greedy decode through the reference modules (HF ConvNext tower, projector, HF Llama) on the sequence LLaVA's
`tokenizer_image_token` builds (computed with sentencepiece alone) and the pixels LLaVA's `pad` preprocessing gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_checkpoint import TOWER, hf_convnext, randomize_, reference_logits, write_llava_llm, write_tower
from test_image_processing import llava_pad_reference
from test_processor import IMAGE_INDEX, expand_images, tokenizer_image_token
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from convllava.buckets import num_visual_tokens
from convllava.checkpoint import load_model
from convllava.templates import VICUNA_SYSTEM
from jobs import cli

RESOLUTION = 256  # the tower config's image_size
QUESTION = "What is in the picture?"


class ReleasedSpm:
    """Tower, projector and a Llama LM over the sentencepiece vocabulary, written in the released layout."""

    def __init__(self, root: Path, tokenizer_dir: Path) -> None:
        vocab = len(
            __import__("sentencepiece").SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
        )
        self.image_token_id = vocab  # `<image>` is added after the vocabulary, as LLaVA keeps it outside
        self.tower = hf_convnext()
        llm_config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, attn_implementation="eager")  # fmt: skip
        self.llm = randomize_(LlamaForCausalLM(llm_config), seed=1)
        self.projector = randomize_(
            nn.Sequential(nn.Linear(TOWER["hidden_sizes"][-1], 64), nn.GELU(), nn.Linear(64, 64)), 2
        )
        self.tower_dir = write_tower(self.tower, root / "tower")
        self.llm_dir = write_llava_llm(root / "llm", self.llm, self.projector, self.tower_dir)
        config = json.loads((self.llm_dir / "config.json").read_text())
        # The weights here are float32 (so the reference comparison is exact up to kernels); "auto" keeps them so.
        (self.llm_dir / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32"}, indent=2))
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, self.llm_dir / f.name)
        assert not (self.llm_dir / "tokenizer.json").exists()  # as vicuna-7b-v1.5 ships it

    @torch.no_grad()
    def greedy(self, input_ids: list[int], pixels: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
        ids = torch.tensor([input_ids])
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = reference_logits(self.tower, self.projector, self.llm, ids, pixels, self.image_token_id)
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return new


@pytest.fixture(scope="module")
def released_spm(tmp_path_factory, vicuna_tokenizer_dir) -> ReleasedSpm:
    return ReleasedSpm(tmp_path_factory.mktemp("released-spm"), vicuna_tokenizer_dir)


def test_load_model_reads_the_released_layout_with_llava_tokenization(released_spm):
    model, processor = load_model(released_spm.llm_dir)
    assert processor.config.tokenization == "llava"
    assert processor.tokenizer.is_fast and processor.image_token_id == released_spm.image_token_id
    assert processor.config.image.mode == "square" and processor.config.image.resolution == RESOLUTION
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # config.json's torch_dtype ("auto")


def test_chat_cli_answers_as_the_reference_modules_do(released_spm, llama_reference, photos, capsys):
    photo = photos[0]
    max_new = 6
    cli_args = ["chat", "--model", str(released_spm.llm_dir), "--image", str(photo.path),
                "--max-new-tokens", str(max_new), QUESTION]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        cli.main(cli_args)
    assert done.value.code == 0
    reply = capsys.readouterr().out.strip()

    # The released models' inputs, computed without our code: LLaVA's prompt for a first turn with an image,
    # tokenizer_image_token over sentencepiece, and LLaVA's pad preprocessing through CLIPImageProcessorPil.
    prompt = f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    ids = tokenizer_image_token(prompt, llama_reference.encode)
    assert llama_reference.sp.id_to_piece(ids[ids.index(IMAGE_INDEX) + 1]) == "▁"  # the dummy prefix after the image
    ids = expand_images(ids, released_spm.image_token_id, [num_visual_tokens(RESOLUTION, RESOLUTION)])
    pixels = llava_pad_reference(Image.open(photo.path).convert("RGB"), RESOLUTION)[None]
    new = released_spm.greedy(ids, pixels, max_new, eos=llama_reference.sp.eos_id())
    assert new, "the reference decode produced no token; pick another seed"
    assert reply == llama_reference.sp.decode(new).strip()

    # The same through the library: the prompt our processor builds is exactly that sequence.
    _, processor = load_model(released_spm.llm_dir)
    sample = processor.tokenize([{"role": "user", "content": f"<image>\n{QUESTION}"}], [(RESOLUTION, RESOLUTION)],
                                add_generation_prompt=True, check=False)  # fmt: skip
    assert sample.input_ids == ids


@pytest.mark.integration
def test_eval_cli_scores_the_released_layout_end_to_end(released_spm, photos, tmp_path, ray_local):
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    from convllava.image_processing import load_image
    from convllava.inference import GenerationOptions, generate
    from jobs.benchmarks import SHORT_PROMPT

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    # What the model answers each question (one at a time, in this process): the annotators of question 0 agree
    # with it 4 times out of 10, so the suite's score is not 0 by construction.
    model, processor = load_model(released_spm.llm_dir)
    questions = [f"What is shown? ({photo.name})" for photo in photos[:3]]
    replies = [generate(model, processor, [f"{q}\n{SHORT_PROMPT}"], [load_image(p.path)],
                        GenerationOptions(max_new_tokens=32))[0] for q, p in zip(questions, photos, strict=False)]  # fmt: skip
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
