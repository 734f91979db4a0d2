import math

import pytest

from convllava.processing.buckets import (
    Bucket,
    check_size,
    fit_in_canvas,
    make_buckets,
    nearest_bucket,
    num_visual_tokens,
)


@pytest.mark.parametrize(
    ("h", "w", "tokens"), [(768, 768, 144), (1024, 1024, 256), (1536, 1536, 576), (1536, 2048, 768)]
)
def test_visual_token_counts_match_the_paper(h, w, tokens):
    assert num_visual_tokens(h, w) == tokens


@pytest.mark.parametrize(("h", "w"), [(700, 768), (768, 100), (0, 64)])
def test_sizes_off_the_stride_are_refused_with_the_size(h, w):
    with pytest.raises(ValueError, match=f"{h}x{w}"):
        check_size(h, w)


@pytest.mark.parametrize("resolution", [256, 768, 1024, 1536])
def test_buckets_respect_stride_budget_and_aspect_range(resolution):
    budget = (resolution // 64) ** 2
    buckets = make_buckets(resolution)
    assert Bucket(resolution, resolution) in buckets
    for b in buckets:
        assert b.height % 64 == 0 and b.width % 64 == 0
        assert b.tokens() <= budget
        assert 0.25 <= b.aspect <= 4.0
    aspects = sorted(b.aspect for b in buckets)
    assert aspects[0] == pytest.approx(0.25, abs=0.05) and aspects[-1] == pytest.approx(4.0, abs=0.1)
    if resolution >= 768:  # enough tokens that every bucket spends ≥ 85% of the budget
        assert min(b.tokens() for b in buckets) >= 0.85 * budget


def test_nearest_bucket_and_fit():
    buckets = make_buckets(1536)
    wide = nearest_bucket(2000, 1000, buckets)
    assert abs(math.log(wide.aspect / 2.0)) < 0.05
    assert nearest_bucket(1000, 1000, buckets) == Bucket(1536, 1536)
    p = fit_in_canvas(2000, 1000, wide.height, wide.width)
    assert p.content_width <= wide.width and p.content_height <= wide.height
    assert p.padded_fraction < 0.05
    assert p.offset_y == (wide.height - p.content_height) // 2
    assert Bucket.parse(wide.name) == wide


def test_bucket_padding_is_small_across_aspect_ratios_where_square_pads_a_lot():
    buckets = make_buckets(1536)
    ratios = [0.3, 0.5, 0.66, 0.75, 1.0, 1.33, 1.5, 1.78, 2.0, 3.0]
    bucket_pad = [
        fit_in_canvas(int(1000 * r), 1000, *_hw(nearest_bucket(int(1000 * r), 1000, buckets))).padded_fraction
        for r in ratios
    ]
    square_pad = [1 - min(r, 1 / r) for r in ratios]
    assert max(bucket_pad) <= 0.05 + 1e-9
    assert sum(bucket_pad) / len(ratios) < 0.03 < 0.25 < sum(square_pad) / len(ratios)


def _hw(b: Bucket) -> tuple[int, int]:
    return b.height, b.width
