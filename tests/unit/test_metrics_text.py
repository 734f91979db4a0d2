"""VQA / TextVQA soft accuracy and DocVQA ANLS against worked examples and against lmms-eval's own functions.

lmms-eval's functions (the `eval` extra) are called on the same inputs: the hand-written edge cases and a few thousand
seeded random ones must give the same normalised answers and exactly the same scores.
"""

from __future__ import annotations

import random

import pytest
from lmms_eval.api.metrics import anls as lmms_anls
from lmms_eval.api.metrics import levenshtein_distance
from lmms_eval.api.metrics import mean as lmms_mean
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from lmms_eval.tasks.textvqa.utils import textvqa_process_results
from metrics_harness import first_mismatches, generated_anls_questions, generated_questions, mutated, random_text

from convllava.metrics import (
    CONTRACTIONS,
    anls,
    levenshtein,
    mean_anls,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_soft_accuracy,
)

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
