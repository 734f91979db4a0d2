"""`convllava predict`: batch inference on Ray Data.

questions.jsonl (one `{"id", "question", "image"?}` per line) → answers.jsonl (the same ids, in input order,
each with `answer` or with `error`). The driver reads each image's size from its header (cheap), puts every
question in its bucket and cuts bucket-homogeneous batches sorted by prompt length, so no batch pads images to a
common shape and little text is padded. The model generates greedily unless told otherwise. Every input line ends
as exactly one output line.

Where the model runs (`replicas_for`): on a machine with at most one GPU that is not part of a cluster, in this
process, with all its cores: a second CPU replica would hold a second copy of the weights (28 GB at 7B in fp32) and
each replica costs a process start and a model load (~20 s on 2 cores for the tiny model). Otherwise on Ray Data,
an actor pool of one replica per GPU (per CPU on a cluster without GPUs), or `workers` replicas when given.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from convllava.io.storage import is_s3, read_bytes, write_bytes
from pipelines.ray_runtime import adopt_secrets, alive_nodes, ensure_ray, share_secrets, worker_runtime_env
from pipelines.sources import resolve_image


@dataclass
class Question:
    index: int
    id: str
    question: str
    image_uri: str | None
    bucket: str  # "HxW", or "text"
    error: str | None = None
    extra: dict | None = None


def read_questions(path: str, image_root: str | None, bucket_of) -> list[Question]:
    """Parse the questions file; bad lines become questions with an `error` (answered with that error)."""
    root = image_root or (path.rsplit("/", 1)[0] if is_s3(path) else str(Path(path).resolve().parent))
    out = []
    for n, line in enumerate(read_bytes(path).decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        q = Question(len(out), f"line-{n}", "", None, "text")
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
                raise ValueError("needs a non-empty 'question'")
            q.id, q.question = str(rec.get("id", q.id)), rec["question"]
            # The input may carry its ground truth as "answer": keep it, as "reference", apart from ours.
            q.extra = {("reference" if k == "answer" else k): v for k, v in rec.items() if k != "question"}
            if rec.get("image"):
                q.image_uri = resolve_image(root, rec["image"])
                q.bucket = bucket_of(q.image_uri)
        except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
            q.error = f"line {n}: {e}"
        out.append(q)
    return out


def make_batches(questions: list[Question], batch_size: int) -> list[list[Question]]:
    """Bucket-homogeneous batches; inside a bucket, questions of similar length go together."""
    by_bucket: dict[str, list[Question]] = {}
    for q in questions:
        if q.error is None:
            by_bucket.setdefault(q.bucket, []).append(q)
    batches = []
    for bucket in sorted(by_bucket):
        group = sorted(by_bucket[bucket], key=lambda q: (len(q.question), q.index))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


class Predictor:
    """One model replica (a Ray Data actor, or in the caller's process); answers a batch of same-bucket questions
    at a time."""

    def __init__(
        self, model: str, max_new_tokens: int, threads: int | None = None, secrets: dict[str, Any] | None = None
    ) -> None:
        import torch

        adopt_secrets(secrets)  # credentials for an s3:// model or image; see pipelines.ray_runtime

        from convllava.modeling.checkpoint import load_model
        from convllava.modeling.inference import GenerationOptions

        if threads is not None:  # an actor's share of its node; in the caller's process torch's default stays
            torch.set_num_threads(threads)
        self.model, self.processor = load_model(model)
        if torch.cuda.is_available():
            self.model = self.model.to("cuda", torch.bfloat16)
        self.options = GenerationOptions(max_new_tokens=max_new_tokens)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from convllava.modeling.inference import generate
        from convllava.processing.image_processing import ImageError, load_image

        batch = json.loads(row["batch"])
        results, ok = [], []
        for q in batch:
            try:
                image = load_image(read_bytes(q["image_uri"])) if q["image_uri"] else None
                ok.append((q, image))
            except (ImageError, OSError) as e:
                results.append({"index": q["index"], "error": f"image: {e}"})
        if ok:
            answers = generate(
                self.model, self.processor, [q["question"] for q, _ in ok], [im for _, im in ok], self.options
            )
            results += [{"index": q["index"], "answer": a} for (q, _), a in zip(ok, answers, strict=True)]
        return {"results": json.dumps(results)}


def image_bucket(processor_config: dict[str, Any]):
    """A function uri → bucket name that reads only the image header."""
    from convllava.processing.image_processing import ConvLlavaImageProcessor, ImageProcessorConfig

    proc = ConvLlavaImageProcessor(
        ImageProcessorConfig(resolution=processor_config["resolution"], mode=processor_config["mode"])
    )

    def bucket_of(uri: str) -> str:
        import io

        with Image.open(io.BytesIO(read_bytes(uri))) as im:  # the header only: no pixels decoded
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotations by 90° swap the sides
                w, h = h, w
        return proc.bucket_for(w, h).name

    return bucket_of


def replicas_for(workers: int | None, address: str | None) -> int:
    """How many model replicas answer: 0 for this process (see the module docstring), else the actor pool's size.
    Joins (or starts) Ray when the answer is a pool."""
    import ray

    if workers == 0:
        return 0
    if workers is None and not (address or os.environ.get("RAY_ADDRESS")):
        if ray.is_initialized():  # this process's Ray: one node with at most one GPU answers here
            nodes = alive_nodes()
            alone = len(nodes) == 1 and nodes[0]["Resources"].get("GPU", 0) <= 1
        else:
            import torch

            alone = torch.cuda.device_count() <= 1
        if alone:
            return 0
    ensure_ray(address)
    if workers:
        return workers
    gpu = bool(ray.available_resources().get("GPU"))
    return max(1, int(ray.available_resources().get("GPU" if gpu else "CPU", 1)))


def _answer_on_pool(items: list[dict[str, str]], model: str, max_new_tokens: int, replicas: int) -> list[dict]:
    """The batches answered by an actor pool of `replicas` (Ray Data, one GPU or CPU each)."""
    import ray
    from ray.data import ActorPoolStrategy

    gpu = bool(ray.available_resources().get("GPU"))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        Predictor,
        fn_constructor_kwargs={
            "model": model,
            "max_new_tokens": max_new_tokens,
            "threads": 1,
            "secrets": share_secrets(),
        },
        compute=ActorPoolStrategy(size=replicas),
        num_cpus=0 if gpu else 1,
        num_gpus=1 if gpu else 0,
        runtime_env=worker_runtime_env(),
    )
    return ds.take_all()


def run_predict(
    model: str,
    input: str,
    output: str,
    image_root: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    workers: int | None = None,
    address: str | None = None,
) -> str:
    """Answer every question in `input` into `output` (JSONL, input order). Returns a one-line summary.

    Args:
        workers: model replicas on Ray Data (actors); 0: in this process; None: see `replicas_for`.
    """
    from convllava.modeling.checkpoint import image_settings

    start = time.time()
    bucket_of = image_bucket(image_settings(model))

    def safe_bucket(uri: str) -> str:
        try:
            return bucket_of(uri)
        except FileNotFoundError:
            raise OSError(f"image {uri} not found") from None
        except Exception as e:  # noqa: BLE001 - any unreadable header becomes this question's error
            raise OSError(f"image {uri} is not readable ({type(e).__name__}: {e})") from None

    questions = read_questions(input, image_root, safe_bucket)
    batches = make_batches(questions, batch_size)
    results: dict[int, dict] = {}
    items = [
        {"batch": json.dumps([{"index": q.index, "question": q.question, "image_uri": q.image_uri} for q in b])}
        for b in batches
    ]
    replicas = min(replicas_for(workers, address), len(batches)) if batches else 0
    if not batches:
        rows = []
    elif replicas == 0:
        predictor = Predictor(model, max_new_tokens)
        rows = [predictor(item) for item in items]
    else:
        rows = _answer_on_pool(items, model, max_new_tokens, replicas)
    for row in rows:
        for r in json.loads(row["results"]):
            results[r["index"]] = r
    lines, answered, failed = [], 0, 0
    for q in questions:
        r = results.get(q.index, {"error": q.error or "not answered"})
        record = {**(q.extra or {}), "id": q.id, "question": q.question}
        if "answer" in r:
            record["answer"] = r["answer"]
            answered += 1
        else:
            record["error"] = r["error"]
            failed += 1
        lines.append(json.dumps(record, ensure_ascii=False))
    write_bytes(output, "".join(line + "\n" for line in lines).encode())
    elapsed = time.time() - start
    where = "in this process" if replicas == 0 else f"{replicas} replicas"
    return (
        f"predict: {len(questions)} questions → {answered} answered, {failed} errors, {len(batches)} batches "
        f"({where}), "
        f"{elapsed:.1f}s ({answered / elapsed:.2f} answers/s) → {output}"
    )
