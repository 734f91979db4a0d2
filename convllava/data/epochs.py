"""Training data plumbing that needs no cluster: the epoch plan (which samples form which micro-batch on which
rank at which step) and the collate function that turns shard rows into a model batch.

A plan is a pure function of (samples, sizes, seed, epoch), so every data-parallel rank computes the same plan
on its own, without talking to the others, and a restarted job recomputes it and skips the steps it already
took. Its guarantees, which the planners check by construction:
- every micro-batch holds exactly `micro_batch_size` samples of one resolution bucket (no image padding);
- a global step is `micro_batch_size × grad_accum × world_size` samples, always the configured global batch;
- every rank gets exactly `num_steps` steps (no rank waits at a collective that another rank never reaches);
- no sample appears twice in an epoch; samples that cannot fill a whole step are dropped (and counted).

Two planners give such plans. `plan_shard_epoch` (training's) knows where samples lie (`ShardLayout`: shard files
cut into row groups) and plans reads that scale with the data: shard files in a seeded order, dealt to ranks in
contiguous equal parts, samples shuffled inside a window of row groups, so a rank reads each row group of its share
once per epoch. `plan_epoch` shuffles each bucket globally (any sample next to any other), which costs a read per
micro-batch from files; it is the reference the shard-aware plan's padding and randomness are measured against.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from convllava.processing.buckets import Bucket, num_visual_tokens
from convllava.processing.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    ConvLlavaImageProcessor,
    ImageProcessorConfig,
    load_image,
)
from convllava.processing.labels import IGNORE_INDEX, pad_batch


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

    def padding_fractions(self, samples: Sequence[SampleInfo] | np.ndarray) -> np.ndarray:
        """Text-padding fraction of every micro-batch, (steps, grad_accum, world_size); see text_padding_fraction.
        `samples`: the plan's SampleInfos, or their lengths as an array."""
        if not isinstance(samples, np.ndarray):
            samples = np.fromiter((s.length for s in samples), dtype=np.int64, count=len(samples))
        lengths = samples.astype(np.int64)[self.batches]
        longest = lengths.max(axis=-1)  # (S, A, W)
        total = longest * self.micro_batch_size
        return np.where(total > 0, 1.0 - lengths.sum(axis=-1) / np.maximum(total, 1), 0.0)

    def for_world(self, world_size: int) -> EpochPlan:
        """The same global steps dealt to `world_size` ranks: a step's micro-batches, taken in order (accumulation
        index, then rank), go to rank j % world_size at accumulation index j // world_size. Every step trains the same
        samples whatever the size, so an elastic stage resumed at another size neither repeats nor skips one.

        Raises:
            ValueError: a step's micro-batches cannot be split evenly over `world_size` ranks.
        """
        per_step = self.grad_accum * self.world_size
        if world_size < 1 or per_step % world_size:
            raise ValueError(f"a step's {per_step} micro-batches cannot be dealt evenly to {world_size} ranks")
        flat = self.batches.reshape(self.num_steps, per_step, self.micro_batch_size)
        batches = flat.reshape(self.num_steps, per_step // world_size, world_size, self.micro_batch_size)
        return EpochPlan(batches.copy(), self.dropped, self.seed, self.epoch)

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
    _check_sizes(
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        megabatch_factor=megabatch_factor,
    )
    _check_seed(seed, epoch)

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
            idx = _grouped(idx, lengths, micro_batch_size, megabatch_factor)
        micro.append(idx.reshape(-1, micro_batch_size))

    per_step = grad_accum * world_size  # micro-batches per global step
    all_micro = np.concatenate(micro) if micro else np.empty((0, micro_batch_size), dtype=np.int64)
    num_steps = len(all_micro) // per_step
    if num_steps == 0:
        counts = {b: len(v) for b, v in sorted(by_bucket.items())}
        have = f"per bucket {counts} make only {len(all_micro)} complete micro-batches"
        raise ValueError(_too_little(per_step, micro_batch_size, grad_accum, world_size, len(samples), have))
    all_micro = all_micro[np.random.default_rng([seed, epoch]).permutation(len(all_micro))]
    dropped += (len(all_micro) - num_steps * per_step) * micro_batch_size
    # Micro-batch j of a step → (accum j // world_size, rank j % world_size), which is exactly this reshape.
    batches = all_micro[: num_steps * per_step].reshape(num_steps, grad_accum, world_size, micro_batch_size)
    return EpochPlan(batches, dropped, seed, epoch)


@dataclass(frozen=True)
class ShardLayout:
    """Where samples lie, for `plan_shard_epoch`: samples are numbered shard by shard (manifest order), rows in file
    order, so each row group of each shard file is a contiguous range of sample indices (a *piece*).

    Attributes:
        buckets: (N,) int16 code of each sample's bucket, an index into `bucket_names`.
        bucket_names: the bucket names, sorted.
        lengths: (N,) int32 tokens per sample (len(input_ids)).
        piece_starts: (P+1,) int64 first sample of each row group, then N.
        piece_shard: (P,) int32 the shard file of each row group (row groups of a file are consecutive).
    """

    buckets: np.ndarray
    bucket_names: tuple[str, ...]
    lengths: np.ndarray
    piece_starts: np.ndarray
    piece_shard: np.ndarray

    def __post_init__(self) -> None:
        n, p = len(self.buckets), len(self.piece_shard)
        if len(self.lengths) != n or len(self.piece_starts) != p + 1 or self.piece_starts[-1] != n:
            raise ValueError(
                f"ShardLayout: {n} buckets, {len(self.lengths)} lengths, {p} row groups with "
                f"{len(self.piece_starts)} starts ending at {self.piece_starts[-1] if p + 1 else None}"
            )

    @classmethod
    def of(cls, samples: Sequence[SampleInfo], shard_sizes: Sequence[int], row_group_rows: int) -> ShardLayout:
        """The layout of `samples` written in shard files of `shard_sizes` rows (in order), row groups of at most
        `row_group_rows` rows: for plans of samples that are not in files (tests, benchmarks)."""
        if sum(shard_sizes) != len(samples):
            raise ValueError(f"shard sizes add up to {sum(shard_sizes)}, not the {len(samples)} samples")
        names = tuple(sorted({s.bucket for s in samples}))
        code = {b: i for i, b in enumerate(names)}
        starts, shard_of, offset = [], [], 0
        for shard, rows in enumerate(shard_sizes):
            for start in range(0, rows, row_group_rows):
                starts.append(offset + start)
                shard_of.append(shard)
            offset += rows
        return cls(
            buckets=np.fromiter((code[s.bucket] for s in samples), dtype=np.int16, count=len(samples)),
            bucket_names=names,
            lengths=np.fromiter((s.length for s in samples), dtype=np.int32, count=len(samples)),
            piece_starts=np.asarray([*starts, len(samples)], dtype=np.int64),
            piece_shard=np.asarray(shard_of, dtype=np.int32),
        )

    def __len__(self) -> int:
        return len(self.buckets)

    @property
    def num_shards(self) -> int:
        return int(self.piece_shard.max()) + 1 if len(self.piece_shard) else 0

    @functools.cached_property
    def shard_pieces(self) -> np.ndarray:
        """(F+1,) the first row group (piece) of each shard file, then P: shard f's pieces are
        shard_pieces[f] .. shard_pieces[f + 1] - 1."""
        return np.searchsorted(self.piece_shard, np.arange(self.num_shards + 1), side="left")

    def piece_of(self, samples: np.ndarray) -> np.ndarray:
        """The row group (piece index) each of these sample indices lies in."""
        return np.searchsorted(self.piece_starts, samples, side="right") - 1

    def infos(self) -> list[SampleInfo]:
        """One SampleInfo per sample (Python objects: for small data and tests)."""
        return [SampleInfo(self.bucket_names[b], int(n)) for b, n in zip(self.buckets, self.lengths, strict=True)]


def _check_sizes(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_seed(seed: int, epoch: int) -> None:
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _grouped(idx: np.ndarray, lengths: np.ndarray, micro_batch_size: int, megabatch_factor: int) -> np.ndarray:
    """`idx` (a multiple of micro_batch_size long) sorted by length, longest first, inside each megabatch of
    micro_batch_size × megabatch_factor consecutive samples."""
    megabatch = np.arange(len(idx)) // (micro_batch_size * megabatch_factor)
    # lexsort is stable and sorts by the last key first: by megabatch, then longest first inside it.
    return idx[np.lexsort((-lengths[idx], megabatch))]


def _too_little(per_step: int, micro_batch_size: int, grad_accum: int, world_size: int, n: int, have: str) -> str:
    return (
        f"the data cannot fill one global step: a step needs {per_step} micro-batches of {micro_batch_size} "
        f"samples from one bucket (micro_batch_size {micro_batch_size} × grad_accum {grad_accum} × world_size "
        f"{world_size} = {per_step * micro_batch_size} samples), but the {n} samples {have}; add data or lower "
        "the batch sizes"
    )


def _rank_stream(
    windows: list[np.ndarray],
    rng: np.random.Generator,
    layout: ShardLayout,
    micro_batch_size: int,
    megabatch_factor: int,
    group_by_length: bool,
) -> tuple[np.ndarray, int]:
    """One rank's micro-batches, (K, micro_batch_size), and the samples it drops: the windows in a drawn order, each
    giving its buckets' whole megabatches (the rest carries on), then whole micro-batches of what is carried."""
    empty = np.empty(0, dtype=np.int64)
    unit = micro_batch_size * (megabatch_factor if group_by_length else 1)
    carry: dict[int, np.ndarray] = {}

    def cut(pools: dict[int, np.ndarray], size: int) -> np.ndarray:
        made = [np.empty((0, micro_batch_size), dtype=np.int64)]
        for b in sorted(pools):
            idx = rng.permutation(pools[b])
            keep = len(idx) // size * size
            carry[b], idx = idx[keep:], idx[:keep]
            if group_by_length and keep:
                idx = _grouped(idx, layout.lengths, micro_batch_size, megabatch_factor)
            made.append(idx.reshape(-1, micro_batch_size))
        out = np.concatenate(made)
        return out[rng.permutation(len(out))]  # the buckets' micro-batches interleaved

    micro = []
    for w in rng.permutation(len(windows)).tolist():
        codes = layout.buckets[windows[w]]
        pools = {b: np.concatenate([carry.get(b, empty), windows[w][codes == b]]) for b in np.unique(codes).tolist()}
        micro.append(cut(pools, unit))
    micro.append(cut({b: c for b, c in carry.items() if len(c)}, micro_batch_size))
    return np.concatenate(micro), sum(len(c) for c in carry.values())


def plan_shard_epoch(
    layout: ShardLayout,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    seed: int,
    epoch: int,
    window: int = 16,
    group_by_length: bool = True,
    megabatch_factor: int = 8,
) -> EpochPlan:
    """Plan one epoch so that each rank reads each row group of its share once, in a bounded window.

    1. The shard files are put in an order drawn from (seed, epoch); their samples, in that file order and file
       order inside each, are cut into `world_size` contiguous parts of equal size (±1): rank r's share. A part
       boundary may fall inside a row group, which the two ranks then both read (one extra row group per rank at
       most).
    2. Each rank cuts its share into windows of `window` consecutive row groups (pieces) and walks the windows
       in an order drawn from (seed, epoch, rank), as the rest of this step. Inside a window, per bucket, the window's samples and those left over from earlier windows are
       shuffled, cut into whole megabatches of micro_batch_size × megabatch_factor, each sorted by length (as
       `plan_epoch` does; without `group_by_length`, micro-batches), and the remainder carries on to the next window; the window's
       micro-batches are shuffled across buckets. What is left at the end of the share is dropped.
    3. Every rank gets the same number of steps, and every epoch too: the whole steps (grad_accum micro-batches)
       in the fewest micro-batches a share of ⌊N/W⌋ samples in B buckets can make, ⌈(⌊N/W⌋ − B·(M−1)) / M⌉; the
       micro-batches past that are dropped (at most B − 1 + grad_accum per rank more than the rank's own remainder). A rank's micro-batch k goes to (step k // grad_accum, accum
       k % grad_accum). Ranks may train different buckets in the same step.

    Randomness, as tested: the Spearman correlation between a sample's position in an epoch (global step order)
    and its position in the shard files is below 0.1 in absolute value when the epoch has ≥ 1,000 windows (its
    spread is about 1/√windows: 2M samples in 32-row row groups and windows of 16 make ~4,000), consecutive epochs
    order the samples differently, and a sample's neighbours in a micro-batch come from anywhere in its window.
    Memory: a rank's loader holds at most `window` row groups, what it prefetches and the carried samples (fewer
    than micro_batch_size × megabatch_factor per bucket).

    Args:
        layout: where the samples lie (ShardSet.layout); the plan holds indices into its samples.
        window: row groups a rank shuffles together (more: more randomness and memory).
        Others as in `plan_epoch`.

    Raises:
        ValueError: a non-positive size, a negative seed/epoch, or too little data for one global step.
    """
    _check_sizes(
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        window=window,
        megabatch_factor=megabatch_factor,
    )
    _check_seed(seed, epoch)
    n = len(layout)
    starts = layout.piece_starts
    # 1. shard order, then the pieces in that order; cumulative sample counts along it.
    first_piece = layout.shard_pieces
    order = np.random.default_rng([seed, epoch]).permutation(layout.num_shards)
    pieces = np.concatenate([np.arange(first_piece[f], first_piece[f + 1]) for f in order] or [np.empty(0, np.int64)])
    sizes = (starts[1:] - starts[:-1])[pieces]
    cum = np.concatenate([[0], np.cumsum(sizes)])

    streams: list[np.ndarray] = []
    dropped = 0
    for rank in range(world_size):
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        first, last = np.searchsorted(cum, lo, side="right") - 1, np.searchsorted(cum, hi, side="left")
        segments = [
            np.arange(starts[p] + max(lo, cum[k]) - cum[k], starts[p] + min(hi, cum[k + 1]) - cum[k])
            for k, p in zip(range(first, last), pieces[first:last], strict=True)
        ]
        rng = np.random.default_rng([seed, epoch, rank, 1])
        windows = [np.concatenate(segments[w : w + window]) for w in range(0, len(segments), window)]
        stream, left = _rank_stream(windows, rng, layout, micro_batch_size, megabatch_factor, group_by_length)
        dropped += left
        streams.append(stream)

    # The same number of steps every epoch (a run's schedule is set from epoch 0): the fewest micro-batches any
    # rank can get whatever its share, ⌈(⌊N/W⌋ − B·(M−1)) / M⌉ for B buckets, in whole steps.
    fewest = -(-(n // world_size - len(layout.bucket_names) * (micro_batch_size - 1)) // micro_batch_size)
    num_steps = max(0, fewest) // grad_accum
    per_step = grad_accum * world_size
    if num_steps == 0:
        counts = {layout.bucket_names[b]: int(c) for b, c in enumerate(np.bincount(layout.buckets, minlength=0))}
        raise ValueError(
            _too_little(
                per_step,
                micro_batch_size,
                grad_accum,
                world_size,
                n,
                f"per bucket {counts} give each rank a share of {n // world_size}, sure to make only "
                f"{max(0, fewest)} complete micro-batches in {len(layout.bucket_names)} buckets (each rank needs "
                f"{grad_accum})",
            )
        )
    used = num_steps * grad_accum
    dropped += sum(len(s) - used for s in streams) * micro_batch_size
    batches = np.stack([s[:used].reshape(num_steps, grad_accum, micro_batch_size) for s in streams], axis=2)
    return EpochPlan(batches.astype(np.int64), dropped, seed, epoch)


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
