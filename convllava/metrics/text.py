"""Open-ended answer metrics: VQA / TextVQA soft accuracy and DocVQA ANLS."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Contractions that the official VQA eval (vqaEval.py) restores, each written once in its full form; every
# spelling that drops one or more of its apostrophes maps back to it ("dont" → "don't", "couldnt've" →
# "couldn't've"). Forms whose apostrophe-free spelling is an English word (it's, we'll, I'd, she'd, ...) are
# left out, as the official table leaves them out; its broken entries ("Im", "somebody'd" → "somebodyd") are fixed.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _dropped_apostrophes(word: str) -> set[str]:
    """Every spelling of `word` with at least one of its apostrophes removed."""
    parts = word.split("'")
    gaps = len(parts) - 1
    spellings = set()
    for kept in range(2**gaps - 1):  # bit i set: apostrophe i kept; all bits set is the word itself
        spellings.add(parts[0] + "".join(("'" if kept >> i & 1 else "") + p for i, p in enumerate(parts[1:])))
    return spellings


CONTRACTIONS: dict[str, str] = {s: word for word in _CONTRACTED for s in _dropped_apostrophes(word)}
NUMBER_WORDS: dict[str, str] = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
_VQA_NUMBERS = {"none": "0", **NUMBER_WORDS}  # the official manualMap also reads "none" as 0
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern `(?!<=\d)(\.)(?!\d)` meant a look-behind but acts as "a period not followed by a digit";
# we reproduce what it does: "3.5" and ".5" keep their period, "yes." and the "3." ending a sentence lose it.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _strip_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any mark in text with a number like "1,000") is
    deleted, any other mark becomes a space ("black-and-white" → "black and white"); then periods go."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        delete = delete_all or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation: lowercase, punctuation, number words → digits, no articles,
    contractions restored. E.g. "The Two dogs." → "2 dogs", "1,000" → "1000", "dont" → "don't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    words = [_VQA_NUMBERS.get(w, w) for w in _strip_punctuation(text).split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQA v2 / TextVQA).

    Both sides are normalised (`normalize_vqa_answer`, as LLaVA's TextVQA evaluator does). The score is the mean,
    over the leave-one-out subsets of the answers, of min(#answers in the subset equal to the prediction / 3, 1):
    with 10 answers of which k match, k = 0, 1, 2, 3, ≥4 give 0, 0.3, 0.6, 0.9, 1.0. A single answer is scored
    by exact match (leave-one-out would leave nothing); no answers score 0.0.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(gts[0] == pred)
    matches = sum(g == pred for g in gts)
    # Leaving out answer i leaves `matches - (answer i matched)` agreeing humans.
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_soft_accuracy` over questions (0.0 for none). Raises ValueError on a length mismatch."""
    _check_lengths(predictions, answers)
    return _mean([vqa_soft_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)])


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's Average Normalized Levenshtein Similarity for one question.

    For each ground-truth answer, NL = levenshtein(pred, gt) / max(len(pred), len(gt)) on stripped, lowercased
    strings; the answer scores 1 - NL when NL < threshold and 0 otherwise. The question scores the best answer
    (0.0 without answers). E.g. "Lodge" vs "lodges": NL = 1/6 → 0.833; "abc" vs "abcdef": NL = 0.5 → 0.
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = prediction.strip().lower()
    best = 0.0
    for answer in answers:
        gt = answer.strip().lower()
        longest = max(len(pred), len(gt))
        nl = levenshtein(pred, gt) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def mean_anls(predictions: Sequence[str], answers: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """ANLS over a data set: the mean of `anls` per question (0.0 for none). Raises ValueError on a length mismatch."""
    _check_lengths(predictions, answers)
    return _mean([anls(p, a, threshold) for p, a in zip(predictions, answers, strict=True)])


def _check_lengths(predictions: Sequence[object], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; pass one per question")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
