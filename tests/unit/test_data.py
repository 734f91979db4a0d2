"""The training data path: epoch plans (buckets, global batch, ranks, determinism, length grouping), the
text-padding metric, collate, and ShardSet on real preprocessing output (local and S3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from convllava.data.epochs import SampleInfo, ShardLayout, collate, plan_epoch, plan_shard_epoch, text_padding_fraction
from convllava.processing.image_processing import CLIP_MEAN, CLIP_STD

SIZES = {"micro_batch_size": 4, "grad_accum": 2, "world_size": 3}
# ---------------------------------------------------------------------------------------------------- ShardSet


def skewed_samples(counts: dict[str, int], seed: int = 0) -> list[SampleInfo]:
    """Most samples short (40..120 tokens), one in five long (600..1500): the shape of caption + instruct data."""
    rng = np.random.default_rng(seed)
    out = []
    for bucket, n in counts.items():
        long = rng.random(n) < 0.2
        lengths = np.where(long, rng.integers(600, 1500, n), rng.integers(40, 120, n))
        out.extend(SampleInfo(bucket, int(n)) for n in lengths)
    order = rng.permutation(len(out))  # buckets interleaved in sample-index order, as in real shards
    return [out[i] for i in order]


SAMPLES = skewed_samples({"256x256": 500, "192x320": 301, "320x192": 123, "text": 37})


# ---------------------------------------------------------------------------------------------------- plan_epoch
def test_every_micro_batch_is_one_bucket_of_exact_size():
    plan = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0)
    assert plan.batches.shape == (plan.num_steps, 2, 3, 4)
    for step in range(plan.num_steps):
        for rank in range(3):
            micro = plan.micro_batches(rank, step)
            assert len(micro) == 2
            for mb in micro:
                assert len(mb) == 4
                assert len({SAMPLES[i].bucket for i in mb}) == 1
    # All four buckets appear somewhere (the small text bucket fills 9 micro-batches).
    assert {SAMPLES[int(mb[0])].bucket for mb in plan.batches.reshape(-1, 4)} == {
        "256x256",
        "192x320",
        "320x192",
        "text",
    }


def test_global_batch_is_exact_and_every_rank_has_the_same_steps():
    plan = plan_epoch(SAMPLES, **SIZES, seed=1, epoch=0)
    assert plan.global_batch_size == 4 * 2 * 3 == 24
    # 961 samples: 125 + 75 + 30 + 9 = 239 micro-batches of 4 (5 samples left over in buckets), 6 per step.
    assert plan.num_steps == 239 // 6 == 39
    assert plan.num_samples == 39 * 24 == 936
    steps_per_rank = [len(list(plan.rank_steps(rank))) for rank in range(3)]
    assert steps_per_rank == [39, 39, 39]
    for step in range(plan.num_steps):
        step_samples = [i for rank in range(3) for mb in plan.micro_batches(rank, step) for i in mb]
        assert len(step_samples) == len(set(step_samples)) == 24


def test_micro_batch_j_goes_to_rank_j_mod_world_size():
    plan = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0)
    flat = plan.batches.reshape(plan.num_steps, -1, 4)  # micro-batches of a step in dealing order j
    for step in (0, 7, plan.num_steps - 1):
        for j in range(6):
            assert plan.micro_batches(j % 3, step)[j // 3] == flat[step, j].tolist()


def test_no_sample_twice_and_dropped_count():
    plan = plan_epoch(SAMPLES, **SIZES, seed=3, epoch=2)
    used = plan.batches.ravel().tolist()
    assert len(used) == len(set(used)) == 936
    assert plan.dropped == len(SAMPLES) - 936 == 25
    assert set(used) <= set(range(len(SAMPLES)))


def test_dropped_arithmetic_worked_example():
    # a: 10 → 5 micro-batches; b: 7 → 3 (1 dropped); c: 3 → 1 (1 dropped). 9 micro-batches, 4 per step:
    # 2 steps, 1 micro-batch (2 samples) left → 4 dropped, 16 used.
    samples = [SampleInfo("a", 10)] * 10 + [SampleInfo("b", 10)] * 7 + [SampleInfo("c", 10)] * 3
    plan = plan_epoch(samples, micro_batch_size=2, grad_accum=2, world_size=2, seed=0, epoch=0)
    assert (plan.num_steps, plan.dropped, plan.num_samples) == (2, 4, 16)
    assert plan.num_samples + plan.dropped == len(samples)


def test_plan_is_deterministic_per_seed_and_epoch():
    a = plan_epoch(SAMPLES, **SIZES, seed=7, epoch=1)
    b = plan_epoch(list(SAMPLES), **SIZES, seed=7, epoch=1)
    assert np.array_equal(a.batches, b.batches) and a.digest == b.digest and a.dropped == b.dropped
    other_epoch = plan_epoch(SAMPLES, **SIZES, seed=7, epoch=2)
    other_seed = plan_epoch(SAMPLES, **SIZES, seed=8, epoch=1)
    for other in (other_epoch, other_seed):
        assert other.digest != a.digest
        # Not just a reordering of the same micro-batches: most micro-batches are new groupings.
        before = {tuple(sorted(mb)) for mb in a.batches.reshape(-1, 4).tolist()}
        after = {tuple(sorted(mb)) for mb in other.batches.reshape(-1, 4).tolist()}
        assert len(before & after) < 0.1 * len(before)


def test_resume_replays_the_remaining_steps():
    plan = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0)
    again = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0)  # what a restarted job computes
    resumed = list(again.rank_steps(rank=2, start_step=30))
    assert [s for s, _ in resumed] == list(range(30, 39))
    assert [mb for _, mb in resumed] == [plan.micro_batches(2, s) for s in range(30, 39)]
    assert list(again.rank_steps(rank=0, start_step=39)) == []


def test_length_grouping_cuts_padding():
    grouped = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0)
    random = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0, group_by_length=False)
    pg, pr = grouped.padding_fractions(SAMPLES).mean(), random.padding_fractions(SAMPLES).mean()
    # With one long sample in five, a random micro-batch of 4 usually holds one and is mostly padding;
    # sorted megabatches of 32 put the long ones together.
    assert pr > 0.45
    assert pg < 0.2
    assert pr - pg > 0.3
    # A larger megabatch pads less; factor 1 (sorting inside a micro-batch only) pads exactly like random batching.
    wide = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0, megabatch_factor=32).padding_fractions(SAMPLES).mean()
    assert wide <= pg
    one = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0, megabatch_factor=1).padding_fractions(SAMPLES).mean()
    assert one == pytest.approx(pr)


def test_micro_batches_are_sorted_longest_first_and_padding_matches_the_metric():
    plan = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0)
    fractions = plan.padding_fractions(SAMPLES)
    assert fractions.shape == (plan.num_steps, 2, 3)
    for step in (0, 11):
        for rank in range(3):
            for a, mb in enumerate(plan.micro_batches(rank, step)):
                lengths = [SAMPLES[i].length for i in mb]
                assert lengths == sorted(lengths, reverse=True)
                assert fractions[step, a, rank] == pytest.approx(text_padding_fraction(lengths))


def test_too_little_data_says_what_exists_and_what_is_needed():
    samples = [SampleInfo("256x256", 10)] * 7 + [SampleInfo("text", 5)] * 3
    with pytest.raises(ValueError, match="cannot fill one global step") as e:
        plan_epoch(samples, micro_batch_size=4, grad_accum=2, world_size=2, seed=0, epoch=0)
    msg = str(e.value)
    assert "{'256x256': 7, 'text': 3}" in msg and "= 16 samples" in msg and "only 1 complete micro-batches" in msg
    with pytest.raises(ValueError, match="cannot fill one global step"):
        plan_epoch([], micro_batch_size=1, grad_accum=1, world_size=1, seed=0, epoch=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("micro_batch_size", 0),
        ("grad_accum", -1),
        ("world_size", 0),
        ("megabatch_factor", 0),
        ("seed", -1),
        ("epoch", -2),
        ("micro_batch_size", 2.0),
        ("world_size", True),
    ],
)
def test_bad_sizes_name_the_field(field, value):
    kwargs = {**SIZES, "seed": 0, "epoch": 0, field: value}
    with pytest.raises(ValueError, match=f"^{field} must be"):
        plan_epoch(SAMPLES, **kwargs)


def test_out_of_range_rank_or_step():
    plan = plan_epoch(SAMPLES, **SIZES, seed=0, epoch=0)
    with pytest.raises(IndexError, match="rank 3 out of range for world_size 3"):
        plan.micro_batches(3, 0)
    with pytest.raises(IndexError, match="step -1 out of range"):
        plan.micro_batches(0, -1)
    with pytest.raises(IndexError, match="step 39 out of range: the epoch has 39 steps"):
        plan.micro_batches(0, 39)


# ---------------------------------------------------------------------------------------------------- plan_shard_epoch
# SAMPLES written in 10 shard files of ~96 rows, row groups of 16 rows (61 row groups).
LAYOUT = ShardLayout.of(SAMPLES, [96] * 9 + [len(SAMPLES) - 9 * 96], 16)


def spearman(order: np.ndarray) -> float:
    """Rank correlation between position in the epoch and position in the files (sample indices are distinct)."""
    ranks = np.argsort(np.argsort(order)).astype(float)
    return float(np.corrcoef(np.arange(len(order), dtype=float), ranks)[0, 1])


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_shard_plan_trains_each_kept_sample_once_in_whole_one_bucket_micro_batches(world_size):
    plan = plan_shard_epoch(LAYOUT, micro_batch_size=4, grad_accum=2, world_size=world_size, seed=0, epoch=0, window=4)
    assert plan.batches.shape == (plan.num_steps, 2, world_size, 4)
    used = plan.batches.ravel()
    assert len(used) == len(set(used.tolist())) == plan.num_samples
    assert plan.num_samples + plan.dropped == len(SAMPLES)
    for mb in plan.batches.reshape(-1, 4):
        assert len({SAMPLES[i].bucket for i in mb}) == 1
    # Drops as plan_epoch's: per rank, fewer than a micro-batch per bucket, and micro-batches past the fewest
    # whole steps any rank has (ranks get equal shares, so at most a micro-batch per bucket and a step's worth).
    buckets = len(LAYOUT.bucket_names)
    assert plan.dropped <= world_size * (buckets * 3 + (buckets + 1) * 4)
    # Every epoch has the same steps (the schedule is set once): other shares, other remainders, the same count.
    epochs = [
        plan_shard_epoch(LAYOUT, micro_batch_size=4, grad_accum=2, world_size=world_size, seed=0, epoch=e, window=4)
        for e in range(6)
    ]
    assert {p.num_steps for p in epochs} == {plan.num_steps}


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_shard_plan_reads_each_row_group_of_a_ranks_share_once_in_bounded_windows(world_size):
    window, rows_per_group = 4, 16
    plan = plan_shard_epoch(
        LAYOUT, micro_batch_size=4, grad_accum=1, world_size=world_size, seed=3, epoch=1, window=window
    )
    total = 0
    shares = []
    for rank in range(world_size):
        stream = plan.batches[:, :, rank, :].reshape(-1, 4)
        pieces = LAYOUT.piece_of(stream.ravel())
        shares.append(set(pieces.tolist()))
        total += len(shares[-1])
        # What a loader that reads a row group when it is first needed holds: never more than the window's row
        # groups plus the samples carried between windows (< one megabatch of 32 per bucket).
        first_use = {p: i for i, p in reversed(list(enumerate(pieces.tolist())))}
        last_use = {p: i for i, p in enumerate(pieces.tolist())}
        held = 0
        for i in range(len(pieces)):
            rows_open = sum(
                int(((pieces == p) & (np.arange(len(pieces)) >= i)).sum())
                for p in first_use
                if first_use[p] <= i <= last_use[p]
            )
            held = max(held, rows_open)
        assert held <= window * rows_per_group + len(LAYOUT.bucket_names) * 32
    # Shares meet inside at most world_size - 1 row groups: the whole epoch reads each row group about once.
    assert total <= len(LAYOUT.piece_shard) + world_size - 1
    assert sum(len(a & b) for i, a in enumerate(shares) for b in shares[i + 1 :]) <= world_size - 1


def test_shard_plan_is_random_as_stated_and_deterministic():
    big = skewed_samples({"256x256": 12000, "192x320": 8000, "320x192": 4000, "text": 1000}, seed=1)
    layout = ShardLayout.of(big, [250] * 100, 8)  # 3,200 row groups; windows of 2: 1,600 windows
    for world_size in (1, 2, 8):
        plans = [
            plan_shard_epoch(layout, micro_batch_size=4, grad_accum=2, world_size=world_size, seed=5, epoch=e, window=2)
            for e in (0, 1)
        ]
        for plan in plans:  # the stated criterion: |Spearman| < 0.1 between epoch order and file order
            assert abs(spearman(plan.batches.ravel())) < 0.1
        # Two epochs: other micro-batches, not the same ones reordered.
        before = {tuple(sorted(mb)) for mb in plans[0].batches.reshape(-1, 4).tolist()}
        after = {tuple(sorted(mb)) for mb in plans[1].batches.reshape(-1, 4).tolist()}
        assert len(before & after) < 0.05 * len(before)
        if world_size == 8:  # a rank's share of the files is drawn again every epoch (the file order is)
            shares = [set(plan.batches[:, :, 0, :].ravel().tolist()) for plan in plans]
            assert len(shares[0] & shares[1]) < 0.5 * len(shares[0])
        again = plan_shard_epoch(
            ShardLayout.of(list(big), [250] * 100, 8),
            micro_batch_size=4,
            grad_accum=2,
            world_size=world_size,
            seed=5,
            epoch=1,
            window=2,
        )
        assert again.digest == plans[1].digest  # a pure function of (seed, epoch, layout, sizes)
        resumed = list(again.rank_steps(rank=world_size - 1, start_step=again.num_steps - 3))
        assert [mb for _, mb in resumed] == [
            plans[1].micro_batches(world_size - 1, s) for s in range(again.num_steps - 3, again.num_steps)
        ]
    # Inside a window, a micro-batch's samples come from different row groups (not file neighbours).
    plan = plan_shard_epoch(layout, micro_batch_size=4, grad_accum=1, world_size=1, seed=0, epoch=0, window=8)
    mixed = np.mean([len(set(layout.piece_of(mb).tolist())) > 1 for mb in plan.batches.reshape(-1, 4)])
    assert mixed > 0.9


def test_shard_plan_pads_as_little_as_the_global_plan():
    for world_size in (1, 2):
        sizes = {"micro_batch_size": 4, "grad_accum": 2, "world_size": world_size}
        shard = plan_shard_epoch(LAYOUT, **sizes, seed=0, epoch=0, window=4).padding_fractions(LAYOUT.lengths).mean()
        whole = plan_epoch(SAMPLES, **sizes, seed=0, epoch=0).padding_fractions(SAMPLES).mean()
        random = plan_epoch(SAMPLES, **sizes, seed=0, epoch=0, group_by_length=False).padding_fractions(SAMPLES).mean()
        assert abs(shard - whole) < 0.01 and random - shard > 0.3


def test_shard_plan_errors_name_the_field_and_the_data():
    with pytest.raises(ValueError, match="^window must be a positive integer"):
        plan_shard_epoch(LAYOUT, **SIZES, seed=0, epoch=0, window=0)
    small = ShardLayout.of(SAMPLES[:20], [10, 10], 4)
    with pytest.raises(ValueError, match=r"cannot fill one global step.*each rank needs 2"):
        plan_shard_epoch(small, micro_batch_size=4, grad_accum=2, world_size=3, seed=0, epoch=0)
    with pytest.raises(ValueError, match="shard sizes add up to 19, not the 20 samples"):
        ShardLayout.of(SAMPLES[:20], [10, 9], 4)


# ---------------------------------------------------------------------------------------------------- padding metric
@pytest.mark.parametrize(
    "lengths, expected",
    [
        ([4, 2], 0.25),
        ([3, 3, 3], 0.0),
        ([10, 5, 5, 0], 0.5),
        ([7], 0.0),
        ([100, 1], 99 / 200),
        ([], 0.0),
        ([0, 0], 0.0),
    ],
)
def test_text_padding_fraction(lengths, expected):
    assert text_padding_fraction(lengths) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------- collate
def png(colour: tuple[int, int, int], width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")  # lossless: exact pixel values
    return buf.getvalue()


def row(key: str, bucket: str, image: bytes | None, input_ids: list[int], labels: list[int], **extra) -> dict:
    return {"key": key, "bucket": bucket, "image": image, "input_ids": input_ids, "labels": labels, **extra}


def test_collate_image_batch():
    colour = (255, 0, 128)
    rows = [
        row("a", "64x128", png(colour, 128, 64), [1, 5, 5, 7, 8], [-100, -100, -100, 7, 8], num_image_tokens=2),
        row("b", "64x128", png(colour, 128, 64), [1, 5, 9], [-100, -100, 9], num_image_tokens=2),
    ]
    batch = collate(rows, pad_token_id=0)
    assert batch["pixel_values"].shape == (2, 3, 64, 128) and batch["pixel_values"].dtype == torch.float32
    want = [(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD, strict=True)]
    for ch in range(3):
        assert torch.allclose(batch["pixel_values"][:, ch], torch.tensor(want[ch]), atol=1e-6)
    assert batch["input_ids"].tolist() == [[1, 5, 5, 7, 8], [1, 5, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8], [-100, -100, 9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["stats"] == {
        "num_tokens": 8,
        "num_visual_tokens": 4,  # (64/64)·(128/64) = 2 per image
        "num_label_tokens": 3,
        "text_padding_fraction": pytest.approx(0.2),
    }


def test_collate_custom_mean_std_and_text_only():
    rows = [row("t1", "text", None, [3, 4], [-100, 4]), row("t2", "text", None, [3, 4, 5, 6], [-100, 4, 5, 6])]
    batch = collate(rows, pad_token_id=2)
    assert batch["pixel_values"] is None
    assert batch["input_ids"].tolist() == [[3, 4, 2, 2], [3, 4, 5, 6]]
    assert batch["stats"] == {
        "num_tokens": 6,
        "num_visual_tokens": 0,
        "num_label_tokens": 4,
        "text_padding_fraction": 0.25,
    }
    grey = collate([row("g", "64x64", png((128, 128, 128), 64, 64), [1], [1])], 0, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.allclose(grey["pixel_values"], torch.full((1, 3, 64, 64), (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_collate_matches_the_processor(tiny_processor, photos):
    """Shard rows collate to the same text tensors as ConvLlavaProcessor's own collate."""
    convs = [
        [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A photo."}],
        [{"from": "human", "value": "<image>\nDescribe it in detail, please."}, {"from": "gpt", "value": "No."}],
    ]
    samples = [tiny_processor.tokenize(c, [(64, 64)]) for c in convs]
    rows = [row(str(i), "64x64", png((9, 9, 9), 64, 64), s.input_ids, s.labels) for i, s in enumerate(samples)]
    ours, theirs = collate(rows, tiny_processor.tokenizer.pad_token_id), tiny_processor.collate(samples)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], theirs[key])
    assert ours["stats"]["num_label_tokens"] == sum(s.num_label_tokens for s in samples)
    assert ours["stats"]["num_visual_tokens"] == sum(s.num_image_tokens for s in samples) == 2


def test_collate_refuses_mixed_or_inconsistent_batches():
    a = row("a", "64x128", png((1, 2, 3), 128, 64), [1, 2], [1, 2])
    b = row("b", "128x64", png((1, 2, 3), 64, 128), [1, 2], [1, 2])
    t = row("t", "text", None, [1, 2], [1, 2])
    with pytest.raises(ValueError, match=r"one bucket, got buckets \['128x64', '64x128'\]"):
        collate([a, b], 0)
    with pytest.raises(ValueError, match=r"one bucket, got buckets \['64x128', 'text'\]"):
        collate([a, t], 0)
    with pytest.raises(ValueError, match="mixes 1 image rows with 1 text-only rows"):
        collate([a, {**t, "bucket": "64x128"}], 0)
    with pytest.raises(ValueError, match=r"bucket '64x128' holds images of size\(s\) 128x64 \(HxW\)"):
        collate([{**b, "bucket": "64x128"}], 0)
    with pytest.raises(ValueError, match="sample a has 2 input_ids but 1 labels"):
        collate([{**a, "labels": [1]}], 0)
    with pytest.raises(ValueError, match="sample a has 5 image placeholders but its 64x128 image gives 2"):
        collate([{**a, "num_image_tokens": 5}], 0)
    with pytest.raises(ValueError, match="empty micro-batch"):
        collate([], 0)
