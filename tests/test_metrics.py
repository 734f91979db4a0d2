"""Benchmark metrics against worked examples from each benchmark's definition."""

from __future__ import annotations

import json
import math

import pytest

from convllava.metrics import (
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

# --- VQA / TextVQA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Two dogs.", "2 dogs"),
        ("1,000", "1000"),  # a comma inside a number is deleted, not turned into a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("it costs 3.", "it costs 3"),  # a period ending the sentence goes
        ("dont", "don't"),
        ("Couldnt've", "couldn't've"),
        ("youre right", "you're right"),
        ("Yes!", "yes"),
        ("black-and-white", "black and white"),  # a mark between letters becomes a space
        ("hello, world", "hello world"),  # a mark next to a space is deleted
        ("red/white", "red white"),
        ("an apple", "apple"),
        ("none", "0"),
        ("\tTen\n", "10"),
        ("", ""),
    ],
)
def test_vqa_normalisation_follows_the_official_script(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_is_the_leave_one_out_mean(k, expected):
    answers = ["two"] * k + ["three"] * (10 - k)
    # 10 subsets of 9: k of them lose a matching answer (k - 1 left), 10 - k keep all k.
    by_formula = (k * min(1.0, (k - 1) / 3) + (10 - k) * min(1.0, k / 3)) / 10 if k else 0.0
    assert by_formula == pytest.approx(expected)
    assert vqa_soft_accuracy("2", answers) == pytest.approx(expected)  # "two" normalises to "2"


def test_vqa_soft_accuracy_edge_cases():
    assert vqa_soft_accuracy("The cat.", ["cat"]) == 1.0  # one answer: exact match after normalisation
    assert vqa_soft_accuracy("dog", ["cat"]) == 0.0
    assert vqa_soft_accuracy("cat", []) == 0.0
    assert vqa_accuracy(["2", "dog"], [["two"] * 10, ["dog"] * 2 + ["cat"] * 8]) == pytest.approx((1.0 + 0.6) / 2)
    assert vqa_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="1 predictions but 2"):
        vqa_accuracy(["a"], [["a"], ["b"]])


# --- DocVQA ANLS -------------------------------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_anls_worked_examples_and_threshold():
    assert anls("Lodge", ["lodges"]) == pytest.approx(1 - 1 / 6)  # NL = 1/6
    assert anls("abcd", ["abcdef"]) == pytest.approx(2 / 3)  # NL = 2/6
    assert anls("abc", ["abcdef"]) == 0.0  # NL = 0.5 reaches the threshold: cut to 0
    assert anls("abcd", ["abcdef"], threshold=0.3) == 0.0
    assert anls("  The Cat ", ["the cat"]) == 1.0  # stripped and lowercased
    assert anls("lodge", ["xyz", "lodges"]) == pytest.approx(5 / 6)  # best answer counts
    assert anls("", [""]) == 1.0
    assert anls("x", []) == 0.0
    assert mean_anls(["Lodge", "abc"], [["lodges"], ["abcdef"]]) == pytest.approx(5 / 12)
    assert mean_anls([], []) == 0.0


# --- POPE --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("There is not a cat in the image.", "no"),
        ("Yes, there is a dog. No other animals are visible.", "yes"),  # only the first sentence counts
        ("no", "no"),
        ("NO", "yes"),  # POPE's rule is case-sensitive
        ("", "yes"),
    ],
)
def test_pope_parsing(text, expected):
    assert parse_pope_answer(text) == expected


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


def test_pope_metrics_edge_cases():
    empty = pope_metrics([], [])
    assert all(empty[k] == 0 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n"))
    all_no = pope_metrics(["No."] * 2, ["YES", "no"])  # labels in any case; no "yes" predicted: precision 0
    assert (all_no["accuracy"], all_no["precision"], all_no["recall"], all_no["f1"]) == (0.5, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="label 0"):
        pope_metrics(["yes"], ["maybe"])


# --- multiple choice ---------------------------------------------------------------------------------------------

OPTIONS = {"A": "dog", "B": "cat", "C": "horse", "D": "bird"}


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
        ("The animal is a Horse.", "C"),  # the reply uniquely contains an option text
        ("A cat", "B"),  # "A" followed by a word is the article
        ("A is right", "A"),  # "A" before a word, but no option text: the letter
        ("A or B", None),  # two letters
        ("a dog and a cat", None),  # two option texts
        ("E", None),  # not an option
        ("The answer is E", None),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_prefers_an_exact_option_text_and_refuses_ambiguity():
    options = {"A": "cat", "B": "black cat"}
    assert extract_choice("Black cat.", options) == "B"
    assert extract_choice("it is a cat", options) == "A"
    assert extract_choice("the black cat sits", options) is None  # contains both option texts


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


# --- MME ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("Not sure", "no"),
        ("Maybe", "other"),
        ("It is yes", "other"),
    ],
)
def test_mme_parsing(text, expected):
    assert parse_mme_answer(text) == expected


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
