"""Labelled token sequences: IGNORE_INDEX masking, `TokenizedSample`, the errors that refuse a bad sample, and
padding samples into a batch."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

IGNORE_INDEX = -100


class SequenceTooLongError(ValueError):
    """A sample longer than max_length under the `error` policy, or one whose image would be cut."""


class PreflightError(ValueError):
    """A sample that would train on nothing or whose labels disagree with its template."""


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    num_image_tokens: int
    truncated: bool = False
    sample_id: str = "?"
    # (token index, token text) pairs whose character span crosses a reply boundary.
    boundary_conflicts: list[tuple[int, str]] = field(default_factory=list)
    # The learned text the template rendered (for the decode check).
    learned_text: str = ""

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def reply_membership(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[tuple[bool, bool]]:
    """For each token's character range `(start, end)`: (inside, crosses) — whether it lies inside one of `spans`
    (the replies, disjoint character ranges: the tokens to learn) and, if not, whether it overlaps one (a token
    across a reply's boundary). A token with an empty range (BOS, a dummy-prefix `▁`) is neither.

    Sorted by start, disjoint spans have sorted ends too: the span that may hold a token is the last one starting at
    or before it, and the one it may cross is the last one starting before its end (two bisections a token; the
    scan of every span for every token cost a quarter of preprocessing's tokenization)."""
    spans = sorted(spans)
    starts, ends = [a for a, _ in spans], [b for _, b in spans]
    out = []
    for start, end in offsets:
        inside = crosses = False
        if start < end:
            j = bisect_right(starts, start) - 1
            inside = j >= 0 and end <= ends[j]
            k = bisect_left(starts, end) - 1
            crosses = not inside and k >= 0 and ends[k] > start
        out.append((inside, crosses))
    return out


def pad_batch(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, torch.Tensor]:
    """Token lists → (B, T) input_ids (padded with pad_token_id), labels (IGNORE_INDEX) and attention_mask.

    Raises:
        ValueError: a sample whose labels and input_ids differ in length.
    """
    width = max(len(ids) for ids in input_ids)
    out_ids = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    out_labels = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
        n = len(ids)
        if len(row_labels) != n:
            raise ValueError(f"row {row}: {n} input_ids but {len(row_labels)} labels")
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        out_ids[row, cols] = torch.as_tensor(ids, dtype=torch.long)
        out_labels[row, cols] = torch.as_tensor(row_labels, dtype=torch.long)
        attention_mask[row, cols] = 1
    return {"input_ids": out_ids, "attention_mask": attention_mask, "labels": out_labels}
