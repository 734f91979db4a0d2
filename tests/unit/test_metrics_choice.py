"""Multiple-choice metrics (option extraction, accuracy, CircularEval) against lmms-eval's static MMBench reading
and evaluation, on hand-written and seeded random replies."""

from __future__ import annotations

import math
import random

import pytest
from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer
from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator
from metrics_harness import TOKENS, first_mismatches, random_text

from convllava.metrics import ChoicePass, circular_accuracy, extract_choice, multiple_choice_accuracy, rotate_options

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
