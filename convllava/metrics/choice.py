"""Multiple-choice benchmarks (MMBench, SEED-Bench): option extraction, accuracy, MMBench's CircularEval.

Replies are read as lmms-eval's offline ("static") MMBench evaluation reads them (`lmms_eval.tasks.mmbench`):
first `MMBench_Evaluator.can_infer`, VLMEvalKit's deterministic matching that also runs before the GPT judge behind
published MMBench / SEED scores; where it finds nothing, `extract_mcq_answer`
(`lmms_eval.tasks._task_utils.mcq_extract`), which lmms-eval uses instead of the judge.
tests/unit/test_metrics_choice.py checks `extract_choice` against both on hand-written and generated replies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple

from convllava.metrics.text import _check_lengths

# can_infer_option looks for these letters whatever the options are (its num_choice=5): a reply "E" to a question
# with options A-D is read as E, a wrong answer, not as "no answer" (MMBench's judge prompt uses E for "none").
_INFER_LETTERS = "ABCDE"
# The (prefix, suffix) around a letter that can_infer_option tries, in its order, when no bare letter decides.
_WRAPPED = (
    *(("", s) for s in (".", ",", ":", ")", ").")),
    ("(", ")"),
    ("(", ")."),
    *((":", s) for s in ("", ",", ".", ")", ").")),
)
# extract_mcq_answer's answer phrases, in its order (it scans for the letter after each phrase found).
_ANSWER_PHRASES = (
    "the answer is",
    "answer is",
    "the correct answer is",
    "correct answer is",
    "the best answer is",
    "best answer is",
    "the correct option is",
    "correct option is",
    "the best option is",
    "best option is",
    "the choice is",
    "choice is",
    "the correct choice is",
    "correct choice is",
    "i choose",
    "i select",
    "i pick",
    "my answer is",
    "my choice is",
    "옵션",
    "정답은",
    "답은",
    "답:",
    "答案是",
    "答案为",
    "选",
    "答えは",
)
# extract_mcq_answer's ranking of the forms a letter is found in; the highest wins, then the latest position.
_FORM_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "(X)": 6, "X.": 5, "X:": 4, "X)": 3, "X ": 2, "anywhere": 0}


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The letter a free-text reply chooses, or None when it names none (a wrong answer in scoring).

    Follows lmms-eval's static MMBench evaluation, in order (the reply stripped first, as its `process_results`):

    1. can_infer_option: among the reply's whitespace-separated words, exactly one bare letter A-E ("B", "I pick D
       here") — unless "A" is a word of a reply longer than 3 words (it may be the article); else exactly one
       letter in one of the forms "X." "X," "X:" "X)" "X)." "(X)" "(X)." ":X" ":X," ":X." ":X)" ":X).", tried in
       that order. The letter may be E even with 4 options. "A cat" reads A.
    2. can_infer_text: the only option whose lowercased text is a substring of the lowercased reply ("cat" also
       matches "concatenate"; an empty option text matches everything).
    3. extract_mcq_answer (where published scores ask a GPT judge): the option letters found as "(X)", "X.", "X:",
       "X)", "X " (after stripping the reply and its leading and trailing ,.!?;:'" marks, one mark at a time), after
       an answer phrase ("the answer is ...") or opening or closing the reply before a non-letter; the best-ranked
       form wins ("A or B" reads A), then the later position; with none of these, the last option letter anywhere.

    Args:
        text: the model's reply.
        options: letter → option text, e.g. {"A": "dog", "B": "cat"}; letters are single upper-case characters.
            Letters beyond E are looked for in step 1 as well (MMBench has at most 4 options).
    """
    text = text.strip()
    letters = "".join(dict.fromkeys(_INFER_LETTERS + "".join(options)))
    return _infer_option(text, letters) or _infer_text(text, options) or _extract_mcq(text, sorted(options))


def _infer_option(text: str, letters: str) -> str | None:
    """can_infer_option (lmms-eval's `MMBench_Evaluator`)."""
    if "Failed to obtain answer via API" in text:  # its API-failure marker
        return None
    words = text.split()

    def wrapped(prefix: str, suffix: str) -> list[str]:
        return [c for c in letters if f"{prefix}{c}{suffix}" in words]

    bare = wrapped("", "")
    if len(bare) == 1 and not ("A" in words and len(words) > 3):
        return bare[0]
    for prefix, suffix in _WRAPPED:
        found = wrapped(prefix, suffix)
        if len(found) == 1:
            return found[0]
    return None


def _infer_text(text: str, options: Mapping[str, str]) -> str | None:
    """can_infer_text (lmms-eval's `MMBench_Evaluator`)."""
    lowered = text.lower()
    found = [k for k, v in options.items() if str(v).lower() in lowered]
    return found[0] if len(found) == 1 else None


def _extract_mcq(reply: str, letters: Sequence[str]) -> str | None:
    """extract_mcq_answer (lmms-eval's `_task_utils.mcq_extract`) with the option letters as its choices."""
    if not reply.strip():
        return None
    letters = letters or "ABCDEFGH"  # its default choices
    text = reply.strip()
    for mark in ",.!?;:'\"":  # one mark after the other, as the reference: ".,A" keeps its ","
        text = text.strip(mark)
    text = f" {text} "  # spaces at both ends, so "X " and " X" also match at the edges
    found: list[tuple[str, int, str]] = []  # (letter, position, form)
    for form in ("(X)", "X.", "X:", "X)", "X "):
        for c in letters:
            pattern = form.replace("X", c)
            if pattern in text:
                found.append((c, text.rfind(pattern), form))
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at != -1:
            for c in letters:
                # The position found in the lowercased text is used in the original, as the reference does.
                position = text.find(c, at + len(phrase))
                if position != -1:
                    found.append((c, position, "phrase"))
    stripped = text.strip()
    found += [(c, 0, "start") for c in letters if stripped.startswith(c) and not stripped[1:2].isalpha()]
    found += [(c, len(text) - 1, "end") for c in letters if stripped.endswith(c) and not stripped[-2:-1].isalpha()]
    if not found:
        found = [(c, text.rfind(c), "anywhere") for c in letters if c in text]
    if not found:
        return None
    # The reference sorts by (priority, position) descending, stably; max keeps the first of equal keys likewise.
    return max(found, key=lambda f: (_FORM_PRIORITY[f[2]], f[1]))[0]


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
