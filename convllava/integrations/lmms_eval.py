"""ConvLLaVA as an lmms-eval model.

    lmms-eval --model convllava --model_args pretrained=CKPT[,dtype=bfloat16,system=...] \\
        --tasks convllava_demo_open --include_path convllava/integrations/lmms_eval_tasks

Registration. lmms-eval (0.6+) finds external models through the Python entry-point group `lmms_eval.models`;
our package declares `convllava = "convllava.integrations:lmms_eval_manifest"` there, so `--model convllava`
works once convllava is installed, without touching lmms-eval. The class also carries lmms-eval's legacy
`@register_model("convllava")`. In Python, `simple_evaluate(model=ConvLlavaLmms(pretrained=...), ...)` needs
neither.

Requests. `generate_until` answers with the greedy decoding of `convllava.modeling.inference.generate` (sampling when a
task asks for `do_sample` with a temperature > 0) and cuts the answer at the task's `until` strings.
`loglikelihood` (multiple-choice tasks) scores the continuation appended to the generation prompt
(`... ASSISTANT:` + continuation, tokenized on its own, as lm-eval's Hugging Face models do). Every image the
task's `doc_to_visual` returns fills one `<image>` tag of the question, in order; tags are prepended when the
question has none. Videos, audio and multi-round generation are not supported and say so.

One process: lmms-eval shards requests over ranks when launched with several processes, and this adapter
places the model on one device, so it refuses WORLD_SIZE > 1.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from convllava.integrations import (
    LMMS_EVAL_MODEL_NAME,
    as_image,
    generate_interleaved,
    load_for_eval,
)
from convllava.modeling.inference import GenerationOptions

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "convllava.integrations.lmms_eval needs lmms-eval: pip install 'convllava[eval]' (or lmms-eval==0.7.3)"
    ) from e

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("lmms_eval_tasks")
# Generation keys some lmms-eval tasks set that mean nothing for this model: ignored without a warning.
_SILENTLY_IGNORED = {"image_aspect_ratio"}


def generation_options(
    gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int
) -> tuple[GenerationOptions, tuple[str, ...], tuple[str, ...]]:
    """lmms-eval `generation_kwargs` → (GenerationOptions, stop strings, the keys this model does not use).

    lmms-eval's convention: `temperature: 0` means greedy, whatever `do_sample` says.
    """
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    if until is None:
        stops: tuple[str, ...] = ()
    elif isinstance(until, str):
        stops = (until,)
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        stops = tuple(until)
    else:
        raise ValueError(f"generation_kwargs.until: expected a string or a list of strings, got {until!r}")
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
    options = GenerationOptions(
        max_new_tokens=int(kwargs.pop("max_new_tokens", default_max_new_tokens)),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=float(kwargs.pop("top_p", None) or 1.0),
        num_beams=int(kwargs.pop("num_beams", 1) or 1),
    )
    return options, stops, tuple(sorted(set(kwargs) - _SILENTLY_IGNORED))


def _flatten(visuals) -> list:
    """doc_to_visual's result as a flat list (tasks return None, one visual, a list, or nested lists)."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for item in visuals for v in _flatten(item)]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first occurrence of any non-empty stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


@register_model(LMMS_EVAL_MODEL_NAME)
class ConvLlavaLmms(lmms):
    """A ConvLLaVA checkpoint (our format, local or `s3://`) behind lmms-eval's simple-model interface.

    Args (all `--model_args` keys):
        pretrained: the checkpoint directory.
        device: "cuda", "cuda:1", "cpu"; defaults to cuda when available.
        dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16".
        batch_size: questions answered together (those with the same generation settings).
        max_new_tokens: for tasks whose generation_kwargs set none.
        attn_implementation: "sdpa", "eager", "flash_attention_2"; default: the checkpoint's.
        system: system prompt; default: the conversation template's.
        max_batch_size: accepted (lmms-eval passes it) and unused.

    lmms-eval's evaluator frees the model when a run ends (`lmms.clean`): build a new adapter for each
    `simple_evaluate` call.

    Raises:
        ValueError: an unknown argument (named), or a launch with several processes.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 64,
        attn_implementation: str | None = None,
        system: str | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"convllava model_args: unknown argument(s) {sorted(unknown)}; expected pretrained, device, dtype, "
                "batch_size, max_new_tokens, attn_implementation, system"
            )
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            raise ValueError(
                f"convllava: launched with WORLD_SIZE={world_size}; this adapter runs in one process (use batch_size)"
            )
        if str(batch_size).isdigit() and int(batch_size) >= 1:
            self.batch_size = int(batch_size)
        else:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.model, self.processor = load_for_eval(pretrained, device, dtype, attn_implementation)
        self.max_new_tokens = int(max_new_tokens)
        self.system = system

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ request plumbing
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual, doc: dict, where: str) -> list[Image.Image]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        images = []
        for visual in _flatten(visuals):
            if not isinstance(visual, (Image.Image, str, os.PathLike)):
                raise ValueError(
                    f"{where}: doc_to_visual gave a {type(visual).__name__}; convllava takes images only "
                    "(PIL images or image paths), not video or audio"
                )
            images.append(as_image(visual))
        return images

    # ------------------------------------------------------------------ lmms interface
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests with equal generation settings are batched."""
        groups: dict[tuple, list[int]] = {}  # (GenerationOptions, stops) → request indices
        ignored: set[str] = set()
        for i, request in enumerate(requests):
            options, stops, unused = generation_options(request.args[1], self.max_new_tokens)
            groups.setdefault((options, stops), []).append(i)
            ignored.update(unused)
        if ignored:
            logger.warning("convllava: ignoring generation_kwargs %s (not supported by this model)", sorted(ignored))

        answers: list[str] = [""] * len(requests)
        for (options, stops), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts, where = [], []
                for i in chunk:  # images are loaded per batch, not for the whole task at once
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    where.append(f"task {task} doc {doc_id}")
                    prompts.append((context, self._images(doc_to_visual, self._doc(task, split, doc_id), where[-1])))
                replies = generate_interleaved(
                    self.model, self.processor, prompts, options, system=self.system, sample_ids=where
                )
                for i, reply in zip(chunk, replies, strict=True):
                    answers[i] = cut_at_stops(reply, stops)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation | context, images), whether greedy decoding would produce the continuation)."""
        results = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            where = f"task {task} doc {doc_id}"
            doc = self._doc(task, split, doc_id)
            if callable(continuation):  # plain `loglikelihood` tasks pass doc_to_target
                continuation = continuation(doc)
            images = self._images(doc_to_visual, doc, where)
            results.append(self._score(str(context), str(continuation), images, where))
        return results

    def _score(self, context: str, continuation: str, images: list[Image.Image], where: str) -> tuple[float, bool]:
        processor = self.processor
        prompt, pixels = processor.generation_sample(context, images, self.system, sample_id=where)
        target = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"{where}: the continuation {continuation!r} tokenizes to nothing")
        input_ids = torch.tensor([prompt.input_ids + target], device=self.device)  # (1, T)
        stacked = processor.stack_images(pixels)
        if isinstance(stacked, torch.Tensor):
            stacked = stacked.to(self.device)
        elif stacked is not None:
            stacked = [x.to(self.device) for x in stacked]
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, pixel_values=stacked).logits  # (1, T, V)
        n = len(target)
        # Position t predicts token t+1: the continuation's n tokens are predicted by the n positions before them.
        log_probs = torch.log_softmax(logits[0, -n - 1 : -1].float(), dim=-1)  # (n, V)
        target_ids = input_ids[0, -n:]
        score = log_probs.gather(-1, target_ids.unsqueeze(-1)).sum().item()
        greedy = bool((log_probs.argmax(-1) == target_ids).all())
        return score, greedy

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "convllava does not implement lmms-eval's generate_until_multi_round (multi-round tasks); "
            "use single-round generate_until tasks"
        )


def write_task(
    questions: str | os.PathLike,
    output_dir: str | os.PathLike,
    task: str = "convllava_vqa",
    image_root: str | os.PathLike | None = None,
) -> Path:
    """Write an lmms-eval task for a local questions JSONL; pass `output_dir` as lmms-eval's `--include_path`.

    The JSONL has one record per line: "question", "answer", and optionally "image" (a path relative to
    `image_root`), "id" and "type" (carried through to the logged samples). The task copies the records with
    absolute image paths into `<output_dir>/<task>.jsonl` and writes `<output_dir>/<task>.yaml`, which includes
    the shipped `convllava_demo_open.yaml` (prompt, exact-match scoring, generation settings) and points at that
    copy, so it runs from any directory.

    Args:
        questions: the JSONL file (the demo data's `eval/open.jsonl` has this shape).
        image_root: what relative image paths are relative to; default: the JSONL's folder.

    Returns:
        The YAML file.

    Raises:
        ValueError: a task name other than letters, digits and underscores; a record without a question or
            answer, an unreadable line, or an image path that leaves its root (the message names the line).
        FileNotFoundError: an image that does not exist (the message names the line).
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", task):
        raise ValueError(f"task: use letters, digits and underscores only, got {task!r}")
    questions = Path(questions)
    root = Path(image_root) if image_root is not None else questions.parent
    root = root.resolve()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for n, line in enumerate(questions.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{questions}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(record, dict) or not str(record.get("question", "")).strip() or "answer" not in record:
            raise ValueError(f"{where}: a record needs a non-empty 'question' and an 'answer'")
        image = record.get("image")
        if image:
            path = (root / image).resolve()
            if Path(image).is_absolute() or not path.is_relative_to(root):
                raise ValueError(f"{where}: image path {image!r} leaves the image root {root}")
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image {path} does not exist (image root {root})")
            image = str(path)
        records.append(
            {
                "id": str(record.get("id", f"line-{n}")),
                "question": record["question"],
                "answer": str(record["answer"]),
                "image": image or None,
                "type": str(record.get("type", "")),
            }
        )
    if not records:
        raise ValueError(f"{questions}: no records")
    (out / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    yaml_path = out / f"{task}.yaml"
    # JSON strings are YAML strings: paths with spaces or colons stay intact.
    yaml_path.write_text(
        f"# lmms-eval --model convllava --model_args pretrained=CKPT --tasks {task} --include_path {out}\n"
        f"include: {json.dumps(str(TASKS_DIR / 'convllava_demo_open.yaml'))}\n"
        f"task: {json.dumps(task)}\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(task + '.jsonl')}\n"
    )
    return yaml_path
