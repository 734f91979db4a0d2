"""Benchmark metrics against worked examples and against the reference scripts behind published scores.

Where lmms-eval (the `eval` extra) implements a metric, its own functions are called here on the same inputs: the
hand-written edge cases and a few thousand seeded random ones must give the same normalised answers and exactly the
same scores. POPE, which lmms-eval reads differently from the published numbers, is checked against a transcription
of LLaVA's eval_pope.py.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import pytest
from lmms_eval.api.metrics import anls as lmms_anls
from lmms_eval.api.metrics import levenshtein_distance
from lmms_eval.api.metrics import mean as lmms_mean
from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator
from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results, parse_pred_ans
from lmms_eval.tasks.textvqa.utils import textvqa_process_results

from convllava.metrics import (
    CONTRACTIONS,
    GROUNDING_PROMPT,
    ChoicePass,
    MMERecord,
    anls,
    box_to_original,
    circular_accuracy,
    demo_accuracy,
    extract_choice,
    grounding_precision,
    iou,
    levenshtein,
    mean_anls,
    mme_scores,
    multiple_choice_accuracy,
    normalize_short_answer,
    normalize_vqa_answer,
    parse_box,
    parse_mme_answer,
    parse_pope_answer,
    pope_metrics,
    rotate_options,
    vqa_accuracy,
    vqa_soft_accuracy,
)

# --- generated inputs --------------------------------------------------------------------------------------------

# Tokens the reference normalisations treat specially: every contraction of the EvalAI table (spelling and restored
# form), its quirky entries, articles, number words, numbers with punctuation, possessives, yes/no words, Unicode.
TOKENS = (
    *EvalAIAnswerProcessor.CONTRACTIONS,
    *EvalAIAnswerProcessor.CONTRACTIONS.values(),
    *"Im im i'm Ive ive id've I'dve somebody'd somebodyd she's let's 'ows'at ow's'at y'allll DONT twas hes".split(),
    *"a an the A The THE zero one Two three four five six seven eight nine ten None eleven".split(),
    *"3 1,000 3.5 .5 3. 10,5 1.000,5 2-3 4/5 1:30 12.30pm 100% $5 man's it's 's its o'clock e.g. U.S.A.".split(),
    *"yes no not No y n cat Red black white dog café İstanbul Straße Ω ٣ ﬁne ｙｅｓ".split(),
)
MARKS = (*";/[]\"{}()=+\\_-><@`,?!.':*&#~|", "...")
SPACES = (" ", " ", " ", "  ", "\t", "\n", "\r", "\u00a0", "\u3000", " \t ")


def random_text(rng: random.Random, tokens: tuple[str, ...] = TOKENS, max_tokens: int = 6) -> str:
    """Up to `max_tokens` tokens in random case, some with a mark glued on, between random whitespace or marks."""
    text = rng.choice(("", "", " ", "\t", "\n"))
    for _ in range(rng.randint(0, max_tokens)):
        token = rng.choice(tokens)
        token = rng.choice((token, token, token, token.upper(), token.capitalize()))
        if rng.random() < 0.2:
            token += rng.choice(MARKS)
        if rng.random() < 0.1:
            token = rng.choice(MARKS) + token
        text += token + (rng.choice(SPACES) if rng.random() < 0.85 else rng.choice(MARKS))
    return text


def generated_questions(seed: int, n: int) -> list[tuple[str, list[str]]]:
    """(prediction, 10 answers) pairs whose answers repeat, so that 0 to 10 of them match the prediction."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        pool = [random_text(rng, max_tokens=3) for _ in range(3)]
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool)
        if rng.random() < 0.3:  # a variant that often normalises to the same answer
            prediction = rng.choice(("The ", "a ", " ", "")) + prediction.upper() + rng.choice((".", "!", " ", ""))
        questions.append((prediction, answers))
    return questions


def mutated(rng: random.Random, text: str, alphabet: str = "ab AB\t\n.-1ß") -> str:
    """`text` after up to 4 random insertions, deletions and substitutions."""
    chars = list(text)
    for _ in range(rng.randint(0, 4)):
        op, i = rng.random(), rng.randint(0, len(chars))
        if op < 0.4:
            chars.insert(i, rng.choice(alphabet))
        elif chars and op < 0.7:
            chars.pop(min(i, len(chars) - 1))
        elif chars:
            chars[min(i, len(chars) - 1)] = rng.choice(alphabet)
    return "".join(chars)


def generated_anls_questions(seed: int, n: int) -> list[tuple[str, list[str]]]:
    """(prediction, 1-3 answers), all edits of one short string: similarities around the 0.5 threshold are common."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        base = "".join(rng.choice("ab AB\t\n.-1ß") for _ in range(rng.randint(0, 8)))
        questions.append((mutated(rng, base), [mutated(rng, base) for _ in range(rng.randint(1, 3))]))
    return questions


def first_mismatches(pairs: list[tuple[object, object, object]], n: int = 5) -> list[tuple[object, object, object]]:
    """(input, ours, reference) of the first `n` pairs that disagree, for a readable assertion message."""
    return [p for p in pairs if p[1] != p[2]][:n]


# --- VQA / TextVQA ---------------------------------------------------------------------------------------------


def eval_ai(text: str) -> str:
    return EvalAIAnswerProcessor()(text)


def lmms_textvqa(prediction: str, answers: list[str]) -> float:
    return textvqa_process_results({"question_id": 0, "answers": list(answers)}, [prediction])["exact_match"]


def test_contractions_are_the_eval_ai_table_as_it_is():
    assert CONTRACTIONS == EvalAIAnswerProcessor.CONTRACTIONS
    assert CONTRACTIONS["Im"] == "I'm" and CONTRACTIONS["somebody'd"] == "somebodyd"  # dead and broken entries kept


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Two dogs.", "2 dogs"),
        ("1,000", "1000"),  # the tokenizer deletes every comma
        ("1,000,000", "1000000"),
        ("black,white", "blackwhite"),  # ... also between letters
        ("1, 2", "1 2"),
        ("3.5", "3.5"),  # a period before a digit stays
        (".5", ".5"),
        ("3.5.", "3.5"),
        ("it costs 3.", "it costs 3"),  # a period ending the sentence goes
        ("e.g.", "eg"),
        ("U.S.A.", "usa"),
        ("12.30pm", "12.30pm"),
        ("x" + "." * 40, "x" + "." * 8),  # only the first 32 such periods go (re.UNICODE passed as the count)
        ("3:30", "3:30"),  # colons, apostrophes, % and $ are not punctuation to it
        ("100%", "100%"),
        ("$5", "$5"),
        ("2-3", "2 3"),  # a mark between characters becomes a space
        ("10 - 5", "10 5"),  # a mark next to a space is deleted
        ("a-b -c", "ab c"),  # ... everywhere in the text once it is next to a space somewhere
        ("black-and-white", "black and white"),
        ("hello, world", "hello world"),
        ("red/white", "red white"),
        ("yes (no)", "yes no"),
        ('"quoted"', "quoted"),
        ("@home", "home"),
        ("Yes!", "yes"),
        ("why?", "why"),
        ("dont", "don't"),
        ("dont, stop", "don't stop"),
        ("cant-stop", "can't stop"),
        ("Couldnt've", "couldn't've"),
        ("youre right", "you're right"),
        ("hes", "he's"),
        ("HES", "he's"),
        ("wont", "won't"),
        ("twas", "'twas"),
        ("y'allll", "y'all'll"),
        ("Im", "im"),  # the table's "Im" key has a capital, so it never matches
        ("Ive", "ive"),
        ("id've", "id've"),
        ("I'm", "i'm"),
        ("somebody'd", "somebodyd"),  # the table's broken entry
        ("somebodyd", "somebodyd"),
        ("she's", "she 's"),  # the tokenizer splits "'s" off
        ("it's", "it 's"),
        ("its", "its"),
        ("man's hat", "man 's hat"),
        ("Let's go", "let 's go"),
        ("Yes, it's 3.5!", "yes it 's 3.5"),
        ("an apple", "apple"),
        ("a the an", ""),
        ("THE", ""),
        ("one two three", "1 2 3"),
        ("ten-four", "10 4"),
        ("zero.", "0"),
        ("ten.", "10"),
        ("none", "0"),
        ("None of them", "0 of them"),
        ("eleven", "eleven"),
        ("\tTen\n", "10"),
        ("The  cat\t\tsat\n\non", "cat sat on"),
        ("x\ry", "x y"),
        ("\u00a0yes\u3000", "yes"),  # Unicode whitespace splits words too
        ("Café", "café"),
        ("İ", "i̇"),  # Python's lowercase of the dotted capital I: two code points
        ("ｙｅｓ", "ｙｅｓ"),  # full-width letters stay what they are
        ("", ""),
        (" \t\n", ""),
    ],
)
def test_vqa_normalisation_is_the_eval_ai_processors(text, expected):
    assert normalize_vqa_answer(text) == expected
    assert eval_ai(text) == expected


def test_vqa_normalisation_matches_eval_ai_on_generated_answers():
    rng = random.Random(0)
    texts = [random_text(rng) for _ in range(5000)]
    pairs = [(t, normalize_vqa_answer(t), eval_ai(t)) for t in texts]
    assert not first_mismatches(pairs)
    assert sum(p[1] != p[0].strip().lower() for p in pairs) > 4000  # the normalisation did something to most


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_is_the_leave_one_out_mean(k, expected):
    answers = ["two"] * k + ["three"] * (10 - k)
    # 10 subsets of 9: k of them lose a matching answer (k - 1 left), 10 - k keep all k.
    by_formula = (k * min(1.0, (k - 1) / 3) + (10 - k) * min(1.0, k / 3)) / 10 if k else 0.0
    assert by_formula == pytest.approx(expected)
    assert vqa_soft_accuracy("2", answers) == pytest.approx(expected)  # "two" normalises to "2"
    assert vqa_soft_accuracy("2", answers) == lmms_textvqa("2", answers)


def test_vqa_soft_accuracy_edge_cases():
    # One answer: leaving it out leaves no human to agree with, so even a match scores 0, as in the reference.
    assert vqa_soft_accuracy("The cat.", ["cat"]) == 0.0 == lmms_textvqa("The cat.", ["cat"])
    assert vqa_soft_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3) == lmms_textvqa("cat", ["cat", "cat"])
    assert vqa_soft_accuracy("dog", ["cat"]) == 0.0
    assert vqa_soft_accuracy("cat", []) == 0.0  # the reference raises here
    assert vqa_soft_accuracy("I'm", ["Im"] * 10) == 0.0  # "im" is not restored to "i'm"
    assert vqa_soft_accuracy("she is", ["she's"] * 10) == 0.0  # "she 's"
    assert vqa_soft_accuracy("1000", ["1,000"] * 10) == 1.0
    assert vqa_accuracy(["2", "dog"], [["two"] * 10, ["dog"] * 2 + ["cat"] * 8]) == pytest.approx((1.0 + 0.6) / 2)
    assert vqa_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="1 predictions but 2"):
        vqa_accuracy(["a"], [["a"], ["b"]])


def test_vqa_soft_accuracy_matches_lmms_eval_textvqa_on_generated_questions():
    questions = generated_questions(seed=1, n=2000)
    pairs = [(q, vqa_soft_accuracy(*q), lmms_textvqa(*q)) for q in questions]
    assert not first_mismatches(pairs)
    assert {round(p[1], 2) for p in pairs} == {0.0, 0.3, 0.6, 0.9, 1.0}  # every step of the formula is exercised
    predictions, answers = zip(*questions, strict=True)
    assert vqa_accuracy(predictions, answers) == lmms_mean([p[2] for p in pairs])  # lmms-eval's "mean" aggregation


# --- DocVQA ANLS -------------------------------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0
    rng = random.Random(2)
    for _ in range(300):
        a, b = mutated(rng, "abcab"), mutated(rng, "bca")
        assert levenshtein(a, b) == levenshtein_distance(a, b)


def test_anls_worked_examples_and_threshold():
    assert anls("Lodge", ["lodges"]) == pytest.approx(1 - 1 / 6)  # NL = 1/6
    assert anls("abcd", ["abcdef"]) == pytest.approx(2 / 3)  # NL = 2/6
    assert anls("abc", ["abcdef"]) == 0.5  # similarity 0.5 reaches the threshold: kept
    assert anls("ab", ["abcdef"]) == 0.0  # similarity 1/3: cut
    assert anls("abcd", ["abcdef"], threshold=0.7) == 0.0  # the threshold applies to the similarity
    assert anls("abc", ["abcdef"], threshold=0.3) == 0.5
    assert anls("  The Cat ", ["the cat"]) == 1.0  # stripped and lowercased
    assert anls("lodge", ["xyz", "lodges"]) == pytest.approx(5 / 6)  # best answer counts
    assert anls("", [""]) == 1.0
    assert anls("x", []) == 0.0  # the reference raises here
    assert mean_anls(["Lodge", "abc"], [["lodges"], ["abcdef"]]) == pytest.approx((5 / 6 + 0.5) / 2)
    assert mean_anls([], []) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("abc", ["abcdef"], 0.5),  # exactly 0.5 counts
        ("ab", ["abcd"], 0.5),
        ("x", ["xy", "xyz"], 0.5),
        ("Lodge", ["LODGES"], 1 - 1 / 6),  # case
        ("a\tb\nc", ["A B C"], 1.0),  # tabs and newlines collapse to one space
        ("  ab", ["ab"], 1.0),
        (" a  b ", ["a b"], 1.0),
        (" a  b ", ["ab"], 1 - 1 / 6),  # 1 edit over the 6 characters of the prediction as given
        ("ab  ", ["abc"], 0.75),  # 1 edit over 4: lengths before stripping
        ("Straße", ["strasse"], 1 - 2 / 7),  # lengths of the uppercased strings: "STRASSE" is 7
        ("İ", ["i"], 0.0),  # lowercased it is 2 code points: 2 edits over 1 character, similarity < 0
        ("", [""], 1.0),
        ("", ["a"], 0.0),
        ("", ["", "a"], 1.0),
        ("   ", [""], 1.0),
        ("naïve", ["naive"], 0.8),
    ],
)
def test_anls_edge_cases_match_lmms_eval(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)
    assert anls(prediction, answers) == lmms_anls(answers, [prediction])["anls"]


def test_anls_matches_lmms_eval_on_generated_answers():
    questions = generated_anls_questions(seed=3, n=3000)
    pairs = [(q, anls(*q), lmms_anls(q[1], [q[0]])["anls"]) for q in questions]
    assert not first_mismatches(pairs)
    assert sum(p[2] == 0.5 for p in pairs) > 50  # the boundary is exercised
    predictions, answers = zip(*questions, strict=True)
    assert mean_anls(predictions, answers) == lmms_mean([p[2] for p in pairs])


# --- POPE --------------------------------------------------------------------------------------------------------


def eval_pope_reading(text: str) -> str:
    """The reading of one reply in LLaVA's llava/eval/eval_pope.py, transcribed."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def eval_pope_metrics(texts: list[str], labels: list[str]) -> dict[str, float]:
    """eval_pope.py's counts and ratios, transcribed (labels: anything but "no" is positive)."""
    pred = [0 if eval_pope_reading(t) == "no" else 1 for t in texts]
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold, strict=True))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold, strict=True))
    precision = float(tp) / float(tp + fp)
    recall = float(tp) / float(tp + fn)
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "yes_ratio": pred.count(1) / len(pred),
        **{"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("There is not a cat in the image.", "no"),
        ("Yes, there is a dog. No other animals are visible.", "yes"),  # only the first sentence counts
        ("no", "no"),
        (" no", "no"),
        ("no.", "no"),
        ("No,there", "yes"),  # the comma goes, leaving the word "Nothere"
        ("NO", "yes"),  # POPE's rule is case-sensitive
        ("Not at all", "yes"),
        ("There is\nno dog", "yes"),  # words are split at spaces only: "is\nno" is one word
        ("No\tdog", "yes"),
        ("nope", "yes"),
        ("", "yes"),
    ],
)
def test_pope_parsing_is_eval_popes(text, expected):
    assert parse_pope_answer(text) == expected
    assert eval_pope_reading(text) == expected


def test_pope_matches_eval_pope_on_generated_replies():
    rng = random.Random(4)
    words = "Yes yes No no not NO Not nope there is a dog cat in the image isn't".split()
    separators = (" ", " ", " ", " ", "  ", ", ", ",", ". ", ".", "\n", "\t", "\u00a0")
    texts = ["".join(rng.choice(words) + rng.choice(separators) for _ in range(rng.randint(0, 6))) for _ in range(3000)]
    texts = [t.rstrip() if rng.random() < 0.5 else t for t in texts]
    labels = [rng.choice(("yes", "no")) for _ in texts]
    assert not first_mismatches([(t, parse_pope_answer(t), eval_pope_reading(t)) for t in texts])
    ours = pope_metrics(texts, labels)
    assert {k: ours[k] for k in eval_pope_metrics(texts, labels)} == eval_pope_metrics(texts, labels)
    assert 0.3 < ours["yes_ratio"] < 0.9
    # Replies that a split at any whitespace would read differently are among them.
    any_space = ["no" if {"No", "no", "not"} & set(t.split(".")[0].replace(",", "").split()) else "yes" for t in texts]
    assert sum(a != parse_pope_answer(t) for a, t in zip(any_space, texts, strict=True)) > 20


def test_pope_metrics_from_a_confusion_matrix():
    # TP = 4, FN = 1, FP = 2, TN = 3
    labels = ["yes"] * 5 + ["no"] * 5
    predictions = ["Yes."] * 4 + ["No, there is not."] + ["Yes, there is."] * 2 + ["No."] * 3
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (4, 1, 2, 3, 10)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(2 * (4 / 6) * 0.8 / (4 / 6 + 0.8))
    assert m["f1"] == pytest.approx(8 / 11)
    assert m["yes_ratio"] == pytest.approx(0.6)
    assert {k: m[k] for k in eval_pope_metrics(predictions, labels)} == eval_pope_metrics(predictions, labels)


def test_pope_metrics_edge_cases():
    empty = pope_metrics([], [])
    assert all(empty[k] == 0 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n"))
    all_no = pope_metrics(["No."] * 2, ["YES", "no"])  # labels in any case; no "yes" predicted: precision 0
    assert (all_no["accuracy"], all_no["precision"], all_no["recall"], all_no["f1"]) == (0.5, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="label 0"):
        pope_metrics(["yes"], ["maybe"])


# --- multiple choice ---------------------------------------------------------------------------------------------

OPTIONS = {"A": "dog", "B": "cat", "C": "horse", "D": "bird"}


def lmms_mmbench_static(reply: str, options: dict[str, str]) -> str | None:
    """The letter lmms-eval's static MMBench evaluation reads from a reply (None: none, a wrong answer there)."""
    reply = reply.strip()  # as mmbench_process_results
    return MMBench_Evaluator().can_infer(reply, dict(options)) or extract_mcq_answer(reply, sorted(options)) or None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) cat", "B"),
        ("The answer is B", "B"),
        ("Answer: B", "B"),
        ("answer: (C).", "C"),
        ("I would pick D here", "D"),  # one option letter among the words
        ("A", "A"),
        ("cat", "B"),  # no letter: the option text
        ("The animal is a Horse.", "C"),  # the reply contains one option's text
        ("concatenate", "B"),  # ... as a substring
        ("A cat", "A"),  # a bare letter decides before any option text
        ("A is right", "A"),
        ("I think A is the one here", "A"),  # "A" in more than 3 words may be the article: no bare letter; ...
        ("A or B", "A"),  # ... extract_mcq_answer: the letter opening the reply outranks the one closing it ...
        ("B or A", "B"),
        ("The answer is A or B", "B"),  # ... which outranks the letter after "the answer is"
        ("(A) or (B)", "B"),  # two "(X)": the later one
        ("a dog and a cat", None),  # two option texts, no upper-case letter
        ("E", "E"),  # can_infer_option looks for A-E whatever the options: a wrong answer, not "none"
        ("The answer is E", "E"),
        ("F", None),
        ("Failed to obtain answer via API", "A"),  # the API-failure marker skips step 1; the "A" of "API", anywhere
        ("", None),
    ],
)
def test_extract_choice_is_lmms_evals_static_mmbench_reading(text, expected):
    assert extract_choice(text, OPTIONS) == expected
    assert lmms_mmbench_static(text, OPTIONS) == expected


def test_extract_choice_option_texts():
    options = {"A": "cat", "B": "black cat"}
    assert extract_choice("it is a cat", options) == "A"
    assert extract_choice("the black cat sits", options) is None  # contains both option texts, no letter
    assert extract_choice("Black cat.", options) == "B"  # both texts too, but "B" of "Black": anywhere
    assert extract_choice("dog", {"A": "cat", "B": "bird", "C": "dog", "D": ""}) is None  # "" is in every reply
    for text in ("it is a cat", "the black cat sits", "Black cat."):
        assert extract_choice(text, options) == lmms_mmbench_static(text, options)


def test_extract_choice_matches_lmms_eval_on_generated_replies():
    rng = random.Random(5)
    texts = ["dog", "cat", "horse", "bird", "black cat", "red", "a", "Dog", "two", "I"]
    letters = ("A", "B", "C", "D", "E", "(A)", "B.", "C)", "(D).", ":B", "A,", "b", "B:", "(c)", "E.")
    phrases = ("answer", "The answer is", "option", "Answer:", "I choose", "my answer is", "答案是")
    tokens = (*TOKENS[-40:], *letters * 4, *phrases, *texts)
    pairs = []
    for _ in range(3000):
        options = dict(zip("ABCD", rng.sample(texts, rng.randint(2, 4)), strict=False))
        reply = random_text(rng, tokens, max_tokens=5)
        pairs.append(((reply, options), extract_choice(reply, options), lmms_mmbench_static(reply, options)))
    assert not first_mismatches(pairs)
    assert len({p[1] for p in pairs}) == 6  # A-E and None all occur


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy(["A", None, "C"], ["A", "B", "D"]) == pytest.approx(1 / 3)
    assert multiple_choice_accuracy([], []) == 0.0


def test_rotate_options():
    options = {"A": "dog", "B": "cat", "C": "cow"}
    rotated, mapping = rotate_options(options, 1)
    assert rotated == {"A": "cat", "B": "cow", "C": "dog"}
    assert mapping == {"B": "A", "C": "B", "A": "C"}  # original letter → its letter in the rotated question
    assert all(rotated[mapping[k]] == v for k, v in options.items())
    assert rotate_options(options, 3) == (options, {"A": "A", "B": "B", "C": "C"})
    assert rotate_options(options, -1)[0] == {"A": "cow", "B": "dog", "C": "cat"}
    assert rotate_options({}, 2) == ({}, {})


def test_circular_eval_needs_every_rotation_right():
    options = {"A": "dog", "B": "cat", "C": "horse", "D": "bird"}
    passes = []
    for question, answer in (("q1", "B"), ("q2", "D")):
        for shift in range(len(options)):
            rotated, mapping = rotate_options(options, shift)
            reply = f"The answer is {mapping[answer]}"  # a model that knows the answer...
            if question == "q2" and shift == 2:
                reply = "A"  # ...except once
            passes.append(ChoicePass(question, shift, extract_choice(reply, rotated), mapping[answer]))
    assert circular_accuracy(passes) == 0.5
    assert multiple_choice_accuracy([p.prediction for p in passes], [p.answer for p in passes]) == 7 / 8
    # A model that always answers "A" is right once per question under rotation, so never circularly.
    always_a = [(q, i, "A", rotate_options(options, i)[1]["B"]) for q in ("q1", "q2") for i in range(4)]
    assert circular_accuracy(always_a) == 0.0
    assert circular_accuracy([("q", 0, None, "A")]) == 0.0
    assert circular_accuracy([]) == 0.0
    with pytest.raises(ValueError, match="pass 0 twice"):
        circular_accuracy([("q", 0, "A", "A"), ("q", 0, "A", "A")])


def test_circular_accuracy_matches_lmms_eval_static_mmbench():
    """MMBench's circular copies as lmms-eval stores them (index + k·10⁶, options rotated), scored by its own
    static evaluation, against `circular_accuracy` over `extract_choice`."""
    rng = random.Random(6)
    texts = ["dog", "cat", "horse", "bird", "cow"]
    rows, passes = [], []
    for index in range(200):
        options = dict(zip("ABCD", rng.sample(texts, rng.randint(2, 4)), strict=False))
        correct = rng.choice(list(options))
        for shift in range(len(options)):
            rotated, mapping = rotate_options(options, shift)
            answer = mapping[correct]
            reply = rng.choice((answer, f"The answer is {answer}.", rotated[answer], rng.choice(list(rotated)), "E"))
            if rng.random() < 0.1:
                reply = random_text(rng, (*texts, "A", "B", "(C)", "D."), max_tokens=3)
            rows.append(
                {"index": index + shift * 10**6, "question": "?", "answer": answer, "prediction": reply.strip()}
                | {"category": "c", "hint": "", "source": "", "split": "dev", "L2-category": "l2"}
                | {k: rotated.get(k, math.nan) for k in "ABCD"}
            )
            passes.append(ChoicePass(index, shift, extract_choice(reply, rotated), answer))
    overall, _, _ = MMBench_Evaluator().eval_result(rows, eval_method="static")
    assert circular_accuracy(passes) == pytest.approx(overall)
    assert 0.1 < overall < 0.9


# --- MME ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("Not sure", "no"),
        ("Maybe", "other"),
        ("It is yes", "other"),  # only the first 4 characters are looked at
        ("none", "no"),
        ("y", "yes"),  # single letters
        ("N", "no"),
        ("x", "other"),
        ("Y.", "yes"),  # periods are deleted first
        ("n.o", "no"),
        ("  yes\n", "yes"),
        ("NO!", "no"),
        ("unknown", "other"),
        ("", "other"),
    ],
)
def test_mme_parsing_is_lmms_evals(text, expected):
    assert parse_mme_answer(text) == expected
    assert parse_pred_ans(text) == expected


def test_mme_parsing_matches_lmms_eval_on_generated_replies():
    rng = random.Random(7)
    tokens = (*TOKENS, *"yes Yes no No NO not y n Y N yes. no. nope".split())
    texts = [random_text(rng, tokens, max_tokens=3) for _ in range(3000)]
    assert not first_mismatches([(t, parse_mme_answer(t), parse_pred_ans(t)) for t in texts])


def test_mme_acc_plus_and_scores():
    records = [
        MMERecord("existence", "1.jpg", "Yes", "Yes"),
        MMERecord("existence", "1.jpg", "No", "No"),
        MMERecord("existence", "2.jpg", "Yes", "Yes"),
        MMERecord("existence", "2.jpg", "Yes", "No"),  # wrong: image 2 loses acc+
        ("OCR", "3.jpg", "Not sure", "Yes"),  # "Not" reads as no: wrong
        ("OCR", "3.jpg", "No.", "No"),
        ("code_reasoning", "4.png", "yes", "Yes"),
        {"subtask": "code_reasoning", "image": "4.png", "prediction": "no", "answer": "No"},  # dicts work too
    ]
    scores = mme_scores(records)
    existence = scores["subtasks"]["existence"]
    assert (existence["accuracy"], existence["accuracy_plus"]) == (0.75, 0.5)
    assert existence["score"] == pytest.approx(125.0)
    assert (existence["questions"], existence["images"]) == (4, 2)
    assert scores["subtasks"]["OCR"]["score"] == pytest.approx(50.0)  # acc 0.5, acc+ 0
    assert scores["subtasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert scores["perception"] == pytest.approx(175.0)
    assert scores["cognition"] == pytest.approx(200.0)
    assert scores["total"] == pytest.approx(375.0)
    assert mme_scores([]) == {"subtasks": {}, "perception": 0.0, "cognition": 0.0, "total": 0.0}
    with pytest.raises(ValueError, match="label 0"):
        mme_scores([("color", "x", "yes", "perhaps")])


def test_mme_scores_match_lmms_eval_aggregation():
    rng = random.Random(8)
    subtasks = ["existence", "count", "OCR", "artwork", "code_reasoning", "text_translation"]
    replies = ("Yes", "No", "yes.", "no", "Not sure", "y", "N", "Maybe", "There is no dog", "Yes, there is.")
    records, by_key = [], defaultdict(list)
    for i in range(600):  # 2 questions per image, as MME has
        subtask = rng.choice(subtasks)
        for answer in ("Yes", "No"):
            record = MMERecord(subtask, f"{subtask}/{i}.jpg", rng.choice(replies), answer)
            records.append(record)
            doc = {"question_id": record.image, "category": subtask, "answer": answer}
            for key, value in mme_process_results(doc, [record.prediction]).items():
                by_key[key].append(value)
    ours = mme_scores(records)
    assert ours["perception"] == pytest.approx(mme_aggregate_results(by_key["mme_perception_score"]), rel=1e-12)
    assert ours["cognition"] == pytest.approx(mme_aggregate_results(by_key["mme_cognition_score"]), rel=1e-12)
    assert 0 < ours["cognition"] < 400 and 0 < ours["perception"] < 800


# --- grounding ---------------------------------------------------------------------------------------------------


def test_grounding_prompt_is_llava_15s():
    assert GROUNDING_PROMPT.format("the red circle") == (
        "Please provide the bounding box coordinate of the region this sentence describes: the red circle."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.1, 0.2, 0.5, 0.6]", [0.1, 0.2, 0.5, 0.6]),
        ("The box is [250, 250, 750, 750].", [250.0, 250.0, 750.0, 750.0]),
        ("0.1, 0.2, 0.3, 0.4", [0.1, 0.2, 0.3, 0.4]),
        ("[1, 2] and then [0.1,0.2,0.3,0.4,0.9]", [0.1, 0.2, 0.3, 0.4]),  # first bracket holding 4 numbers
        ("[0.1, 0.2, 0.3]", None),
        ("no box here", None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


def test_box_to_original_square_frame_undoes_centred_padding():
    # 200×100 image padded to S = 200: 50 px of padding above and below.
    assert box_to_original([0.25, 0.25, 0.75, 0.75], 200, 100) == [50.0, 0.0, 150.0, 100.0]
    assert box_to_original([250, 250, 750, 750], 200, 100) == [50.0, 0.0, 150.0, 100.0]  # sum ≥ 4: per mille
    # 100×200 image: the box reaches into the side padding and is clipped to the image.
    assert box_to_original([0.0, 0.0, 1.0, 1.0], 100, 200) == [0.0, 0.0, 100.0, 200.0]
    assert box_to_original([0.1, 0.0, 0.2, 0.2], 200, 100) == [20.0, 0.0, 40.0, 0.0]  # all in the padding


def test_box_to_original_original_frame_scales_by_width_and_height():
    assert box_to_original([0.25, 0.25, 0.75, 0.75], 200, 100, frame="original") == [50.0, 25.0, 150.0, 75.0]
    assert box_to_original([250, 250, 750, 750], 200, 100, frame="original") == [50.0, 25.0, 150.0, 75.0]
    with pytest.raises(ValueError, match="frame"):
        box_to_original([0, 0, 1, 1], 10, 10, frame="padded")
    with pytest.raises(ValueError, match="3 numbers"):
        box_to_original([0, 0, 1], 10, 10)


def test_iou():
    assert iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)  # half of each overlaps: 2 / (4 + 4 - 2)
    assert iou([0, 0, 2, 2], [0, 0, 1, 2]) == 0.5  # one holds the other, half its area
    assert iou([2, 0, 0, 2], [0, 0, 2, 2]) == 0.0  # x2 < x1
    assert iou([math.nan, 0, 1, 1], [0, 0, 1, 1]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_grounding_precision_counts_malformed_boxes_as_misses():
    predictions = [
        "[250, 250, 750, 750]",  # per mille → [50, 0, 150, 100]: hit
        [math.nan, 0.0, 1.0, 1.0],
        [0.0, math.inf, 1.0, 1.0],
        "I cannot see it",
        [0.6, 0.5, 0.4, 0.9],  # x2 < x1
        None,
        [0.1, 0.2],
        "[0.25, 0.25, 0.75, 0.75]",  # hit
    ]
    gts, sizes = [[50, 0, 150, 100]] * 8, [(200, 100)] * 8
    assert grounding_precision(predictions, gts, sizes) == pytest.approx(2 / 8)
    # In the original frame the same box is [50, 25, 150, 75]: IoU exactly 0.5 still counts (≥ threshold).
    assert grounding_precision(["[0.25, 0.25, 0.75, 0.75]"], gts[:1], sizes[:1], frame="original") == 1.0
    assert grounding_precision(["[0.25, 0.25, 0.75, 0.75]"], gts[:1], sizes[:1], 0.51, frame="original") == 0.0
    assert grounding_precision([], [], []) == 0.0
    with pytest.raises(ValueError, match="frame"):
        grounding_precision([], [], [], frame="padded")


# --- demo held-out sets ------------------------------------------------------------------------------------------


def test_normalize_short_answer():
    assert normalize_short_answer(" Three.") == "3"
    assert normalize_short_answer("Yes!") == "yes"
    assert normalize_short_answer("Light-Blue") == "light blue"
    assert normalize_short_answer("47") == "47"


def test_demo_accuracy_per_type_with_chance():
    box = {"width": 200, "height": 100, "bbox_pixels": [0, 80, 100, 90], "answer": [0.0, 0.8, 0.5, 0.9]}
    records = [
        {"id": "open-0", "type": "color", "answer": "red"},
        {"id": "open-1", "type": "shape", "answer": "circle"},
        {"id": "open-2", "type": "count", "answer": "3"},
        {"id": "pope-0", "type": "pope", "answer": "yes"},
        {"id": "pope-1", "type": "pope", "answer": "no"},
        {"id": "detail-0", "type": "detail", "answer": "47"},
        {"id": "grounding-0", "type": "grounding", **box},
    ]
    predictions = {
        "open-0": "Red.",
        "open-1": "Square",
        "open-2": "three",
        "pope-0": "Yes",  # pope-1 has no reply: wrong
        "detail-0": " 47 ",
        # In the original frame this is the target; read in the square frame it would fall into the padding.
        "grounding-0": "[0.00, 0.80, 0.50, 0.90]",
    }
    chance = {"color": 1 / 6, "shape": 1 / 3, "count": 0.25, "pope": 0.5, "detail": 1 / 90}
    result = demo_accuracy(records, predictions, chance)
    accuracy = {k: v["accuracy"] for k, v in result["per_type"].items()}
    assert accuracy == {"color": 1.0, "shape": 0.0, "count": 1.0, "pope": 0.5, "detail": 1.0, "grounding": 1.0}
    assert result["per_type"]["pope"] == {"accuracy": 0.5, "n": 2, "chance": 0.5}
    assert result["per_type"]["grounding"]["chance"] is None  # not in the chance mapping
    assert result["overall"] == pytest.approx(4.5 / 6)
    assert result["overall_chance"] is None  # grounding's chance is unknown, so the mean's is too
    assert result["n"] == 7
    assert demo_accuracy([], {}) == {"per_type": {}, "overall": None, "overall_chance": None, "n": 0}
    with pytest.raises(ValueError, match="'x-1'"):
        demo_accuracy([{"id": "x-1", "type": "caption", "answer": ""}], {})


def test_demo_accuracy_reads_the_generated_eval_files(tmp_path):
    from pipelines.demo_data import generate_demo_data

    generate_demo_data(tmp_path, seed=3, n_caption=0, n_instruct=0, n_eval=6, with_photos=False)
    records = [json.loads(line) for f in sorted((tmp_path / "eval").glob("*.jsonl")) for line in f.open()]
    chance = json.loads((tmp_path / "metadata.json").read_text())["chance"]
    # Replies in the training form: short answers as they are, grounding as "[x1, y1, x2, y2]" with 2 decimals.
    replies = {
        r["id"]: ("[" + ", ".join(f"{v:.2f}" for v in r["answer"]) + "]" if r["type"] == "grounding" else r["answer"])
        for r in records
    }
    result = demo_accuracy(records, replies, chance)
    assert set(result["per_type"]) == {"color", "shape", "count", "pope", "detail", "grounding"}
    assert all(v["accuracy"] == 1.0 for v in result["per_type"].values())
    assert result["per_type"]["pope"]["chance"] == 0.5 and result["per_type"]["grounding"]["n"] == 6
    assert result["overall"] == 1.0 and result["n"] == 24
    expected_chance = sum(chance[t] for t in result["per_type"]) / 6  # each type weighs the same, as in overall
    assert result["overall_chance"] == pytest.approx(expected_chance) and 0.2 < expected_chance < 0.25
    wrong = demo_accuracy(records, {r["id"]: "[0.9, 0.9, 1.0, 1.0]" for r in records}, chance)
    assert wrong["overall"] < 0.5
