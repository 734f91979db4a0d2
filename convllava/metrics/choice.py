"""Multiple-choice benchmarks (MMBench, SEED-Bench): option extraction, accuracy, MMBench's CircularEval."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import pairwise
from typing import NamedTuple

from convllava.metrics.text import _check_lengths

# "The answer is B", "Answer: (B)", "option C", "correct choice is D." — keyword case-insensitive, letter upper-case.
_STATED = re.compile(r"(?i:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*[(\[]?([A-Z])(?![A-Za-z0-9])")
# The reply starts with the letter: "B", "(B)", "[B]", "B.", "B)", "B:", "B) cat" — but not "A cat" (an article).
_LEADING = re.compile(r"[(\[]?([A-Z])(?:[)\].:](?=\s|$)|$)")
_TOKEN_MARKS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})  # the marks MMBench's can_infer_option blanks out


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text reply chooses, or None when it names none or several.

    Tried in order: a stated answer ("The answer is B", "Answer: B"); a reply that starts with the letter ("B",
    "(B)", "B.", "B) cat"); exactly one option letter among the reply's words, as MMBench's `can_infer_option`
    does; else the option whose text the reply is, or uniquely contains as whole words (case-insensitive), as
    MMBench's `can_infer_text` does. An "A" before a lower-case word ("A cat") may be the article: there an
    option text found in the reply wins over the letter.

    Args:
        text: the model's reply.
        options: letter → option text, e.g. {"A": "dog", "B": "cat"}; letters are single upper-case characters.
    """
    text = text.strip()
    for match in (_STATED.search(text), _LEADING.match(text)):
        if match and match.group(1) in options:
            return match.group(1)
    words = text.translate(_TOKEN_MARKS).split()
    found = {w for w in words if w in options}
    by_text = _match_text(text, options)
    if len(found) == 1:
        letter = found.pop()
        # "A cat": "A" before a lower-case word may be the article; an option text in the reply then decides.
        article = letter == "A" and any(w == "A" and n[:1].islower() for w, n in pairwise(words))
        return by_text if article and by_text else letter
    return by_text


def _match_text(text: str, options: Mapping[str, str]) -> str | None:
    """The option whose text the reply is, else the only one whose text it contains as whole words."""
    lowered = text.lower().rstrip(".!").strip()
    exact = [k for k, v in options.items() if str(v).strip().lower() == lowered]
    if len(exact) == 1:
        return exact[0]
    contained = [
        k
        for k, v in options.items()
        if str(v).strip() and re.search(rf"(?<!\w){re.escape(str(v).strip().lower())}(?!\w)", lowered)
    ]
    return contained[0] if len(contained) == 1 else None


def multiple_choice_accuracy(predictions: Sequence[str | None], answers: Sequence[str]) -> float:
    """Share of questions whose predicted letter (from `extract_choice`; None is wrong) equals the correct letter.

    0.0 for no questions; raises ValueError on a length mismatch."""
    _check_lengths(predictions, answers)
    hits = sum(p is not None and p == a for p, a in zip(predictions, answers, strict=True))
    return hits / len(answers) if answers else 0.0


def rotate_options(options: Mapping[str, str], shift: int) -> tuple[dict[str, str], dict[str, str]]:
    """The options of CircularEval pass `shift`: the letters stay in place, the texts move up by `shift`.

    With {"A": "dog", "B": "cat", "C": "cow"} and shift 1 the question shows {"A": "cat", "B": "cow", "C": "dog"}.

    Returns:
        (rotated options, mapping original letter → its letter in the rotated question), so the rotated
        question's correct letter is `mapping[correct_letter]`; invert the mapping to read a reply back.
    """
    letters = list(options)
    if not letters:
        return {}, {}
    n = len(letters)
    rotated = {letters[j]: options[letters[(j + shift) % n]] for j in range(n)}
    mapping = {letters[(j + shift) % n]: letters[j] for j in range(n)}
    return rotated, mapping


class ChoicePass(NamedTuple):
    """One asking of a CircularEval question: pass `pass_index` (0 = original order, i = `rotate_options(..., i)`),
    the letter extracted from the reply (None: no choice) and the correct letter in that pass's rotated options."""

    question_id: Hashable
    pass_index: int
    prediction: str | None
    answer: str


def circular_accuracy(passes: Iterable[ChoicePass | tuple[Hashable, int, str | None, str]]) -> float:
    """MMBench's CircularEval: a question with N options is asked N times, rotated; it scores only if every one of
    its passes is correct. Returns the share of questions that score (0.0 for none).

    Args:
        passes: one `ChoicePass` (or plain 4-tuple in its field order) per asking, in any order.

    Raises:
        ValueError: a question lists the same pass twice.
    """
    results: dict[Hashable, dict[int, bool]] = defaultdict(dict)
    for question_id, pass_index, prediction, answer in passes:
        if pass_index in results[question_id]:
            raise ValueError(f"question {question_id!r} has pass {pass_index} twice; give each rotation once")
        results[question_id][pass_index] = prediction is not None and prediction == answer
    return sum(all(r.values()) for r in results.values()) / len(results) if results else 0.0
