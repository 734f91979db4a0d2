"""Training data plumbing that needs no cluster: the epoch plan (which samples form which micro-batch on which
rank at which step) and the collate function that turns shard rows into a model batch.

The plan is a pure function of (samples, sizes, seed, epoch), so every data-parallel rank computes the same plan
on its own, without talking to the others, and a restarted job recomputes it and skips the steps it already
took. Its guarantees, which `plan_epoch` checks by construction:
- every micro-batch holds exactly `micro_batch_size` samples of one resolution bucket (no image padding);
- a global step is `micro_batch_size × grad_accum × world_size` samples, always the configured global batch;
- every rank gets exactly `num_steps` steps (no rank waits at a collective that another rank never reaches);
- no sample appears twice in an epoch; samples that cannot fill a whole step are dropped (and counted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from convllava.buckets import Bucket, num_visual_tokens
from convllava.image_processing import CLIP_MEAN, CLIP_STD, ConvLlavaImageProcessor, ImageProcessorConfig, load_image
from convllava.labels import IGNORE_INDEX, pad_batch


@dataclass(frozen=True)
class SampleInfo:
    """What the planner needs to know about one sample: its bucket and its token count (len(input_ids))."""

    bucket: str
    length: int


class EpochPlan:
    """The batches of one epoch: `batches[step, accum, rank]` is one micro-batch of sample indices.

    Micro-batch j of a global step goes to rank j % world_size at accumulation index j // world_size.
    """

    def __init__(self, batches: np.ndarray, dropped: int, seed: int, epoch: int) -> None:
        if batches.ndim != 4:
            raise ValueError(f"batches must be (steps, grad_accum, world_size, micro_batch_size), got {batches.shape}")
        self.batches = batches  # (S, A, W, M) int64 sample indices
        self.batches.setflags(write=False)  # the plan is shared by reference; nobody may edit it in place
        self.dropped = dropped
        self.seed = seed
        self.epoch = epoch

    @property
    def num_steps(self) -> int:
        return self.batches.shape[0]

    @property
    def grad_accum(self) -> int:
        return self.batches.shape[1]

    @property
    def world_size(self) -> int:
        return self.batches.shape[2]

    @property
    def micro_batch_size(self) -> int:
        return self.batches.shape[3]

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks: micro_batch_size × grad_accum × world_size."""
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def num_samples(self) -> int:
        """Samples the epoch trains on (the dropped ones excluded)."""
        return self.num_steps * self.global_batch_size

    def micro_batches(self, rank: int, step: int) -> list[list[int]]:
        """The grad_accum micro-batches (lists of sample indices) that `rank` runs at `step`, in order.

        Raises:
            IndexError: rank or step out of range (numpy would silently wrap negative values).
        """
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range for world_size {self.world_size}")
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range: the epoch has {self.num_steps} steps")
        return self.batches[step, :, rank, :].tolist()

    def rank_steps(self, rank: int, start_step: int = 0) -> Iterator[tuple[int, list[list[int]]]]:
        """(step, micro-batches) for `rank` from `start_step` on; a resumed job passes the steps it already took."""
        if not 0 <= start_step <= self.num_steps:
            raise IndexError(f"start_step {start_step} out of range: the epoch has {self.num_steps} steps")
        for step in range(start_step, self.num_steps):
            yield step, self.micro_batches(rank, step)

    def padding_fractions(self, samples: Sequence[SampleInfo]) -> np.ndarray:
        """Text-padding fraction of every micro-batch, (steps, grad_accum, world_size); see text_padding_fraction."""
        lengths = np.fromiter((s.length for s in samples), dtype=np.int64, count=len(samples))[self.batches]
        longest = lengths.max(axis=-1)  # (S, A, W)
        total = longest * self.micro_batch_size
        return np.where(total > 0, 1.0 - lengths.sum(axis=-1) / np.maximum(total, 1), 0.0)

    @property
    def digest(self) -> str:
        """sha256 of the plan; a checkpoint can record it so that a resume can prove it replays the same plan."""
        h = hashlib.sha256(str(self.batches.shape).encode())
        h.update(np.ascontiguousarray(self.batches, dtype="<i8").tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"EpochPlan(epoch={self.epoch}, seed={self.seed}, num_steps={self.num_steps}, "
            f"global_batch_size={self.global_batch_size}, dropped={self.dropped})"
        )


def _bucket_seed(bucket: str) -> int:
    # Python's hash() of a str changes per process; ranks and restarts must agree, so hash the bytes.
    return int.from_bytes(hashlib.sha256(bucket.encode("utf-8")).digest()[:8], "little")


def plan_epoch(
    samples: Sequence[SampleInfo],
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    megabatch_factor: int = 8,
) -> EpochPlan:
    """Plan one epoch: bucket-homogeneous micro-batches, length-grouped, dealt out to ranks in whole global steps.

    Per bucket (in sorted order) the sample indices are shuffled with a generator seeded by (seed, epoch, bucket),
    and the bucket's last incomplete micro-batch is dropped; with `group_by_length`, the shuffled list is cut into
    megabatches of micro_batch_size × megabatch_factor, each sorted by length (descending, stable), so that a
    micro-batch holds samples of similar length while the order stays random at the megabatch scale. All
    micro-batches are then shuffled across buckets (seeded by (seed, epoch)) and dealt out in global steps of
    grad_accum × world_size micro-batches; the incomplete last step is dropped.

    Args:
        samples: one SampleInfo per sample; the plan holds indices into this sequence.
        micro_batch_size, grad_accum, world_size: the batch geometry (all positive).
        seed, epoch: the plan is a pure function of these (and of samples and sizes); both non-negative.
        group_by_length: False gives random micro-batches inside each bucket (the baseline for padding).
        megabatch_factor: micro-batches per length-sorted megabatch; larger means less padding, less randomness.

    Raises:
        ValueError: a non-positive size, a negative seed/epoch, or too little data for one global step.
    """
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("grad_accum", grad_accum),
        ("world_size", world_size),
        ("megabatch_factor", megabatch_factor),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")

    lengths = np.fromiter((s.length for s in samples), dtype=np.int64, count=len(samples))
    by_bucket: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_bucket.setdefault(s.bucket, []).append(i)

    dropped = 0
    micro: list[np.ndarray] = []
    for bucket in sorted(by_bucket):
        idx = np.random.default_rng([seed, epoch, _bucket_seed(bucket)]).permutation(
            np.asarray(by_bucket[bucket], dtype=np.int64)
        )
        # Drop the remainder before sorting by length: the dropped samples are then random ones, not always
        # the shortest of the last megabatch (same count as dropping the last incomplete micro-batch).
        keep = len(idx) // micro_batch_size * micro_batch_size
        dropped += len(idx) - keep
        idx = idx[:keep]
        if group_by_length and keep:
            megabatch = np.arange(keep) // (micro_batch_size * megabatch_factor)
            # lexsort is stable and sorts by the last key first: by megabatch, then longest first inside it.
            idx = idx[np.lexsort((-lengths[idx], megabatch))]
        micro.append(idx.reshape(-1, micro_batch_size))

    per_step = grad_accum * world_size  # micro-batches per global step
    all_micro = np.concatenate(micro) if micro else np.empty((0, micro_batch_size), dtype=np.int64)
    num_steps = len(all_micro) // per_step
    if num_steps == 0:
        counts = {b: len(v) for b, v in sorted(by_bucket.items())}
        raise ValueError(
            f"the data cannot fill one global step: a step needs {per_step} micro-batches of {micro_batch_size} "
            f"samples from one bucket (micro_batch_size {micro_batch_size} × grad_accum {grad_accum} × world_size "
            f"{world_size} = {per_step * micro_batch_size} samples), but the {len(samples)} samples per bucket "
            f"{counts} make only {len(all_micro)} complete micro-batches; add data or lower the batch sizes"
        )
    all_micro = all_micro[np.random.default_rng([seed, epoch]).permutation(len(all_micro))]
    dropped += (len(all_micro) - num_steps * per_step) * micro_batch_size
    # Micro-batch j of a step → (accum j // world_size, rank j % world_size), which is exactly this reshape.
    batches = all_micro[: num_steps * per_step].reshape(num_steps, grad_accum, world_size, micro_batch_size)
    return EpochPlan(batches, dropped, seed, epoch)


def text_padding_fraction(lengths: Sequence[int]) -> float:
    """Padded positions / all positions when sequences of these lengths are right-padded to the longest.

    >>> text_padding_fraction([4, 2])  # 8 positions, 2 of them padding
    0.25

    An empty batch or one of empty sequences has no positions and gives 0.0.
    """
    if not len(lengths):
        return 0.0
    total = max(lengths) * len(lengths)
    return (total - sum(lengths)) / total if total else 0.0


@lru_cache(maxsize=8)
def _image_processor(mean: tuple[float, ...], std: tuple[float, ...]) -> ConvLlavaImageProcessor:
    # Only its `normalize` is used (images in shards are already at bucket size); cached because it builds buckets.
    return ConvLlavaImageProcessor(ImageProcessorConfig(mean=mean, std=std))


def collate(
    rows: Sequence[dict[str, Any]],
    pad_token_id: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> dict[str, Any]:
    """Shard rows of one micro-batch → a right-padded model batch.

    Args:
        rows: shard rows (`image` bytes or None, `input_ids`, `labels`, `bucket`; `key` and `num_image_tokens`
            are used in errors and checks when present), all of one bucket.
        pad_token_id: fills input_ids past each sequence's end (labels get IGNORE_INDEX there).
        mean, std: image normalisation (the model's; CLIP's by default).

    Returns:
        input_ids (B, T) long, labels (B, T) long, attention_mask (B, T) long, pixel_values (B, 3, H, W) float32
        or None for a text-only batch, and `stats`: num_tokens (non-pad), num_visual_tokens, num_label_tokens,
        text_padding_fraction. Pop `stats` before calling the model with the batch.

    Raises:
        ValueError: an empty batch, mixed buckets, image rows mixed with text-only rows, images whose size is not
            their bucket's, or a row whose labels and input_ids differ in length.
    """
    if not rows:
        raise ValueError("collate: empty micro-batch")
    buckets = sorted({str(r["bucket"]) for r in rows})
    if len(buckets) > 1:
        raise ValueError(f"collate: a micro-batch must hold one bucket, got buckets {buckets}")
    bucket = buckets[0]
    has_image = [r.get("image") is not None for r in rows]
    if any(has_image) and not all(has_image):
        raise ValueError(
            f"collate: bucket {bucket!r} mixes {sum(has_image)} image rows with {len(rows) - sum(has_image)} "
            "text-only rows; a bucket is either image-sized or text-only"
        )

    pixel_values, visual_tokens = None, 0
    if all(has_image):
        processor = _image_processor(tuple(float(m) for m in mean), tuple(float(s) for s in std))
        images = [processor.normalize(load_image(r["image"])) for r in rows]  # each (3, H, W)
        sizes = sorted({tuple(x.shape[-2:]) for x in images})
        try:
            expected = Bucket.parse(bucket)
        except ValueError:
            raise ValueError(f"collate: image rows in bucket {bucket!r}, which is not an HxW bucket name") from None
        if sizes != [(expected.height, expected.width)]:
            shown = ", ".join(f"{h}x{w}" for h, w in sizes)
            raise ValueError(f"collate: bucket {bucket!r} holds images of size(s) {shown} (HxW); expected {bucket}")
        per_image = num_visual_tokens(expected.height, expected.width)
        for r in rows:
            if r.get("num_image_tokens") is not None and r["num_image_tokens"] != per_image:
                raise ValueError(
                    f"collate: sample {r.get('key', '?')} has {r['num_image_tokens']} image placeholders but its "
                    f"{bucket} image gives {per_image} visual tokens; re-run preprocess"
                )
        pixel_values = torch.stack(images)  # (B, 3, H, W)
        visual_tokens = per_image * len(rows)

    lengths = [len(r["input_ids"]) for r in rows]
    for r, n in zip(rows, lengths, strict=True):
        if len(r["labels"]) != n:
            raise ValueError(
                f"collate: sample {r.get('key', '?')} has {n} input_ids but {len(r['labels'])} labels; re-run preprocess"
            )
    padded = pad_batch([r["input_ids"] for r in rows], [r["labels"] for r in rows], pad_token_id)
    input_ids, labels, attention_mask = padded["input_ids"], padded["labels"], padded["attention_mask"]

    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "stats": {
            "num_tokens": int(sum(lengths)),
            "num_visual_tokens": visual_tokens,
            "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
            "text_padding_fraction": text_padding_fraction(lengths),
        },
    }
