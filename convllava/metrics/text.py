"""Open-ended answer metrics: VQA / TextVQA soft accuracy and DocVQA ANLS, as the scripts behind published scores
compute them.

- VQA soft accuracy follows the EvalAI answer processor (facebookresearch/mmf `EvalAIAnswerProcessor`, which LLaVA's
  `m4c_evaluator.py` and lmms-eval's `textvqa` task use: `lmms_eval.tasks._task_utils.vqa_eval_metric`) and
  lmms-eval's `textvqa_process_results`. (lmms-eval's `vqav2` task runs only the processor's later steps, as the
  original vqaEval.py does, so commas, "?" and "'s" reach the punctuation step there. The published ConvLLaVA
  numbers are TextVQA's; we apply the EvalAI processor to every VQA set.)
- ANLS follows the DocVQA / InfographicVQA challenge script as lmms-eval's `anls` metric has it
  (`lmms_eval.api.metrics.anls`).

Both are reproduced with their quirks, so that our numbers equal theirs answer for answer; each quirk is named where
it is implemented. tests/unit/test_metrics_text.py checks both against lmms-eval on hand-written and generated
answers.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

# The EvalAI processor's contraction table exactly as it stands, one "spelling restored-form" pair per entry. Quirks
# kept: keys with capitals ("Im", "Ive", "Id've", "I'dve") never match, because answers are lowercased first, so
# "im" stays "im"; keys holding "'s" ("she's", "let's", "ow's'at", "'ow'sat") never match either, because the
# tokenizer has already split "'s" off; "somebody'd" is "restored" to "somebodyd".
_CONTRACTION_PAIRS = """
aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't
couldn'tve couldn't've  couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't
hadnt hadn't  hadnt've hadn't've  hadn'tve hadn't've  hasnt hasn't  havent haven't  hed he'd
hed've he'd've  he'dve he'd've  hes he's  howd how'd  howll how'll  hows how's  Id've I'd've
I'dve I'd've  Im I'm  Ive I've  isnt isn't  itd it'd  itd've it'd've  it'dve it'd've
itll it'll  let's let's  maam ma'am  mightnt mightn't  mightnt've mightn't've
mightn'tve mightn't've  mightve might've  mustnt mustn't  mustve must've  neednt needn't
notve not've  oclock o'clock  oughtnt oughtn't  ow's'at 'ow's'at  'ows'at 'ow's'at
'ow'sat 'ow's'at  shant shan't  shed've she'd've  she'dve she'd've  she's she's
shouldve should've  shouldnt shouldn't  shouldnt've shouldn't've  shouldn'tve shouldn't've
somebody'd somebodyd  somebodyd've somebody'd've  somebody'dve somebody'd've
somebodyll somebody'll  somebodys somebody's  someoned someone'd  someoned've someone'd've
someone'dve someone'd've  someonell someone'll  someones someone's  somethingd something'd
somethingd've something'd've  something'dve something'd've  somethingll something'll
thats that's  thered there'd  thered've there'd've  there'dve there'd've  therere there're
theres there's  theyd they'd  theyd've they'd've  they'dve they'd've  theyll they'll
theyre they're  theyve they've  twas 'twas  wasnt wasn't  wed've we'd've  we'dve we'd've
weve we've  werent weren't  whatll what'll  whatre what're  whats what's  whatve what've
whens when's  whered where'd  wheres where's  whereve where've  whod who'd  whod've who'd've
who'dve who'd've  wholl who'll  whos who's  whove who've  whyll why'll  whyre why're
whys why's  wont won't  wouldve would've  wouldnt wouldn't  wouldnt've wouldn't've
wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll  yall'd've y'all'd've
y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd  youd've you'd've  you'dve you'd've
youll you'll  youre you're  youve you've
""".split()
CONTRACTIONS: dict[str, str] = dict(zip(_CONTRACTION_PAIRS[::2], _CONTRACTION_PAIRS[1::2], strict=True))
NUMBER_WORDS: dict[str, str] = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
_VQA_NUMBERS = {"none": "0", **NUMBER_WORDS}  # the processor's NUMBER_MAP also reads "none" as 0
_ARTICLES = frozenset({"a", "an", "the"})
# Deleted or turned into a space by `_process_punctuation`; the apostrophe, colon and period are not among them.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
# The reference's pattern `(?!<=\d)(\.)(?!\d)` meant a look-behind but reads as "a period not followed by a digit":
# "3.5" and ".5" keep their period, "yes." and the "3." ending a sentence lose it.
_PERIOD = re.compile(r"\.(?!\d)")
# The reference passes `re.UNICODE` (= 32) where `sub` takes its count, so only the first 32 such periods go.
_PERIODS_REMOVED = 32


def _process_punctuation(text: str) -> str:
    """The processor's `process_punctuation`: a mark that has a space next to it somewhere in the text is deleted
    everywhere ("a-b -c" → "ab c"), any other mark becomes a space ("black-and-white" → "black and white"); then
    periods go.

    The reference also deletes every mark when the text holds a comma between digits, but its tokenizer has
    removed all commas before this step, so that branch never fires and is left out."""
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI answer normalisation (mmf's `EvalAIAnswerProcessor.__call__`), step by step:

    1. lowercase; delete every "," and "?" ("1,000" → "1000", "black,white" → "blackwhite"); split "'s" off the
       word before it ("man's" → "man 's", "she's" → "she 's"); strip; tabs and newlines become spaces; strip.
    2. `_process_punctuation`.
    3. split on whitespace; number words zero..ten and "none" become digits; "a", "an", "the" go; `CONTRACTIONS`
       restores apostrophes ("dont" → "don't", but "im" stays "im"); words joined by one space.

    E.g. "The Two dogs." → "2 dogs", "Yes, it's 3.5!" → "yes it 's 3.5".
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _process_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]  # lowered again, as the reference does
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQA v2 / TextVQA), as lmms-eval's
    `textvqa_process_results` computes it.

    Both sides are normalised (`normalize_vqa_answer`). For each answer i, the other answers that equal the
    prediction count k_i, scoring min(1, k_i / 3); the question scores their exact mean (`statistics.mean`, as the
    reference). With 10 answers of which k match, k = 0, 1, 2, 3, ≥4 give 0, 0.3, 0.6, 0.9, 1.0. Like the
    reference, a lone answer scores 0.0 even when matched (no other human agrees); no answers score 0.0 (the
    reference raises).
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    matched = [normalize_vqa_answer(a) == pred for a in answers]
    matches = sum(matched)
    # Leaving out answer i leaves `matches - matched[i]` agreeing humans.
    return float(statistics.mean(min(1.0, (matches - m) / 3) for m in matched))


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


def _collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's Average Normalized Levenshtein Similarity for one question, as the challenge script (and lmms-eval's
    `anls`) computes it.

    Both strings are lowercased with their whitespace stripped and collapsed to single spaces; for each answer,
    NL = levenshtein(pred, answer) / max(len(pred), len(answer)), where the lengths are those of the strings as
    given (uppercased, so "ß" counts 2), not of the collapsed ones. The question scores 1 − the smallest NL, cut to
    0 when that is below `threshold`: similarity 0.5 exactly is kept. E.g. "Lodge" vs "lodges": 0.833; "abc" vs
    "abcdef": 0.5; " a  b " vs "ab": 1 − 1/6. No answers score 0.0 (the reference raises).
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    pred = _collapse(prediction)
    distances = []
    for answer in answers:
        longest = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(_collapse(answer), pred) / longest if longest else 0.0)
    similarity = 1 - min(distances)
    return similarity if similarity >= threshold else 0.0


def mean_anls(predictions: Sequence[str], answers: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """ANLS over a data set: the mean of `anls` per question (0.0 for none). Raises ValueError on a length mismatch."""
    _check_lengths(predictions, answers)
    return _mean([anls(p, a, threshold) for p, a in zip(predictions, answers, strict=True)])


def _check_lengths(predictions: Sequence[object], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; pass one per question")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
