"""The demo data generator: reproducible files, correct answers, balanced POPE, records our processor accepts."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from convllava.data.sample_images import sample_photos
from convllava.processing.image_processing import load_image
from pipelines.config import Mixture
from pipelines.demo.data import _caption, _qa, generate_demo_data
from pipelines.demo.scenes import COLORS, Scene, Shape
from pipelines.partition import iter_source

SMALL = {"n_caption": 40, "n_instruct": 40, "n_eval": 20}
EVAL_SETS = ("open", "pope", "grounding", "detail")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    summary = generate_demo_data(root, seed=0, **SMALL)
    captions = json.loads((root / "captions.json").read_text())
    instruct = _jsonl(root / "instruct.jsonl")
    evals = {name: _jsonl(root / "eval" / f"{name}.jsonl") for name in EVAL_SETS}
    return root, summary, captions, instruct, evals


def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo, tmp_path):
    root = demo[0]
    reference = _hashes(root)
    generate_demo_data(tmp_path / "again", seed=0, **SMALL)
    assert _hashes(tmp_path / "again") == reference
    # 149 scenes (one instruct record is text-only; POPE asks two questions per scene) + 8 photos + 8 text files
    assert len(reference) == 149 + 8 + 8

    other = _hashes(generate_demo_data(tmp_path / "other", seed=1, **SMALL).output)
    differing = {name for name in reference if other.get(name) != reference[name]}
    texts = {"captions.json", "instruct.jsonl", "metadata.json", *(f"eval/{name}.jsonl" for name in EVAL_SETS)}
    assert texts <= differing
    assert sum(name.startswith("images/scene_") for name in differing) == 149  # only the copied photos agree


def test_counts_match_the_summary_and_metadata(demo):
    root, summary, captions, instruct, evals = demo
    assert summary.output == root
    assert summary.records == {
        "captions.json": 48,
        "instruct.jsonl": 48,
        "eval/open.jsonl": 20,
        "eval/pope.jsonl": 20,
        "eval/grounding.jsonl": 20,
        "eval/detail.jsonl": 20,
        "images": 40 + 39 + 70 + 8,
    }
    assert (len(captions), len(instruct)) == (48, 48)
    assert {f"eval/{k}.jsonl": len(v) for k, v in evals.items()} == {
        k: v for k, v in summary.records.items() if k.startswith("eval/")
    }
    assert len([p for p in (root / "images").rglob("*") if p.is_file()]) == summary.records["images"]
    assert summary.question_types["captions.json"] == {"scene": 40, "photo": 8}
    assert summary.question_types["eval/open.jsonl"] == {"color": 7, "count": 6, "shape": 7}
    turns = [t for r in instruct for t in r["types"]]
    assert summary.question_types["instruct.jsonl"] == {t: turns.count(t) for t in sorted(set(turns))}
    assert turns.count("text") == 1 and turns.count("photo") == 8 and turns.count("detail") >= 3
    assert json.loads((root / "metadata.json").read_text()) == summary.to_json()
    chance = summary.chance
    assert (chance["color"], chance["shape"], chance["count"], chance["pope"]) == (1 / 6, 1 / 3, 1 / 3, 0.5)
    assert chance["detail"] == pytest.approx(1 / 90)
    assert 0 < chance["grounding"] < 0.05


def test_records_have_one_image_tag_on_the_first_turn_and_tokenize(demo, tiny_processor):
    _, _, captions, instruct, evals = demo
    for record in captions + instruct:
        conv = record["conversations"]
        tags = [turn["value"].count("<image>") for turn in conv]
        if "image" in record:
            assert tags[0] == 1 and sum(tags) == 1 and conv[0]["value"].startswith("<image>\n"), record["id"]
            sizes = [(256, 256)]
        else:
            assert sum(tags) == 0 and record["id"].startswith("text-"), record["id"]
            sizes = []
        assert len(conv) in ((2, 4, 6) if record in instruct else (2,))
        sample = tiny_processor.tokenize(conv, sizes, sample_id=record["id"])
        assert sample.num_image_tokens == 16 * len(sizes) and sample.num_label_tokens > 0
    for record in (r for records in evals.values() for r in records):
        assert "<image>" not in record["question"]
        conv = [
            {"from": "human", "value": f"<image>\n{record['question']}"},
            {"from": "gpt", "value": str(record["answer"])},
        ]
        tiny_processor.tokenize(conv, [(256, 256)], sample_id=record["id"])


def test_open_answers_follow_the_objects_and_conventions(demo):
    for record in demo[4]["open"]:
        objects = [name.split() for name in record["objects"]]
        assert record["question"].endswith("Answer with a single word.")
        if record["type"] == "count":
            assert record["answer"] == str(len(objects)) and 1 <= len(objects) <= 3
        elif record["type"] == "color":
            shape = re.match(r"What color is the (\w+)\?", record["question"]).group(1)
            assert [c for c, k in objects if k == shape] == [record["answer"]]
        else:
            color = re.match(r"What shape is the (\w+) object\?", record["question"]).group(1)
            assert [k for c, k in objects if c == color] == [record["answer"]]


def test_pope_is_balanced_and_negatives_are_adversarial(demo):
    pope = demo[4]["pope"]
    assert [r["answer"] for r in pope].count("yes") == [r["answer"] for r in pope].count("no") == 10
    for record in pope:
        color, shape = re.match(r"Is there an? (\w+) (\w+) in the image\?$", record["question"]).groups()
        assert (f"{color} {shape}" in record["objects"]) == (record["answer"] == "yes"), record
        if record["answer"] == "no":
            assert any(color in name or shape in name for name in record["objects"]), record


def test_grounding_boxes_are_normalised_unique_and_on_the_named_colour(demo):
    root, grounding = demo[0], demo[4]["grounding"]
    for record in grounding:
        x1, y1, x2, y2 = record["answer"]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        w, h = record["width"], record["height"]
        px1, py1, px2, py2 = record["bbox_pixels"]
        assert px2 - px1 == py2 - py1 and int(0.28 * min(w, h)) <= px2 - px1 <= 0.42 * min(w, h), record  # SHAPE_SIZE
        assert np.allclose([x1, y1, x2, y2], [px1 / w, py1 / h, px2 / w, py2 / h], atol=1e-3)
        name = re.match(r".*describes: the (\w+ \w+)\.$", record["question"]).group(1)
        assert record["objects"].count(name) == 1
        image = np.asarray(load_image(root / record["image"]), dtype=float)
        assert image.shape == (h, w, 3)
        pixel = image[(py1 + py2) // 2, (px1 + px2) // 2]
        distances = {c: np.linalg.norm(pixel - np.array(rgb)) for c, rgb in COLORS.items()}
        assert min(distances, key=distances.get) == name.split()[0] and distances[name.split()[0]] < 40, record


def test_detail_numbers_are_small_legible_and_trained(demo):
    root, _, _, instruct, evals = demo
    for record in evals["detail"]:
        assert record["answer"].isdigit() and 10 <= int(record["answer"]) <= 99
        assert 384 <= record["height"] and record["font_px"] <= max(10, 0.03 * record["height"] + 1)
        x1, y1, x2, y2 = record["bbox_pixels"]
        ink = np.asarray(load_image(root / record["image"]).convert("L"))[y1:y2, x1:x2]
        assert ink.min() < 100 and (x2 - x1) * (y2 - y1) < 0.005 * record["width"] * record["height"]
    detail_turns = [
        (q["value"], a["value"])
        for r in instruct
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2], strict=True)
        if "small number" in q["value"]
    ]
    assert detail_turns and all(a.isdigit() and len(a) == 2 for _, a in detail_turns)


def test_images_decode_vary_in_shape_and_eval_scenes_are_held_out(demo):
    root, _, captions, instruct, evals = demo
    train = {r["image"] for r in captions + instruct if "image" in r}
    held_out = {r["image"] for records in evals.values() for r in records}
    assert train.isdisjoint(held_out) and len(held_out) == 70
    sizes = []
    for name in sorted(train | held_out):
        image = load_image(root / name)
        if "photos/" not in name:
            w, h = image.size
            assert 192 <= min(w, h) and max(w, h) <= 768 and 1 / 3 <= w / h <= 3, name
            sizes.append((w, h))
    suffixes = [Path(n).suffix for n in train | held_out if "photos/" not in n]
    assert 0 < suffixes.count(".png") < suffixes.count(".jpg")
    assert len(set(sizes)) > 0.9 * len(sizes) and min(w / h for w, h in sizes) < 0.7 < 1.4 < max(
        w / h for w, h in sizes
    )


def test_photos_are_copied_with_captions_and_subjects(demo, tmp_path):
    root, _, captions, instruct, _ = demo
    for photo in sample_photos():
        image = f"images/photos/{photo.path.name}"
        assert (root / image).read_bytes() == photo.path.read_bytes()
        assert [r["conversations"][1]["value"] for r in captions if r["image"] == image] == [photo.caption]
        assert [r["conversations"][1]["value"] for r in instruct if r.get("image") == image] == [photo.subject]
    summary = generate_demo_data(tmp_path / "no-photos", n_caption=4, n_instruct=4, n_eval=2, with_photos=False)
    assert not (tmp_path / "no-photos" / "images" / "photos").exists()
    assert summary.records["captions.json"] == 4 and summary.question_types["captions.json"]["photo"] == 0


def test_mixture_loads_and_every_record_passes_the_preprocessing_reader(demo):
    root = demo[0]
    assert yaml.safe_load((root / "mixture.yaml").read_text())["sources"][0] == {
        "name": "captions",
        "annotations": "captions.json",
        "image_root": ".",
        "ratio": 1.0,
    }
    mixture = Mixture.from_yaml(root / "mixture.yaml")
    assert [(s.name, s.ratio, s.cap) for s in mixture.sources] == [("captions", 1.0, None), ("instruct", 1.0, None)]
    assert {Path(s.image_root) for s in mixture.sources} == {root.resolve()}
    records = [r for source in mixture.sources for r in iter_source(source)]
    assert len(records) == 48 + 48 and [r for r in records if r["category"]] == []
    assert (
        all(Path(r["image_uri"]).is_file() for r in records if r["image"]) and sum(not r["image"] for r in records) == 1
    )


def test_caption_names_shapes_left_to_right_with_position_words():
    shapes = (Shape("square", "orange", (200, 10, 250, 60)), Shape("circle", "red", (10, 100, 60, 150)))
    scene = Scene(0, 300, 300, (250, 250, 250), shapes)
    assert _caption(scene) == "Two shapes: a red circle on the left and an orange square at the top right."
    single = Scene(1, 300, 300, (250, 250, 250), (Shape("triangle", "blue", (120, 120, 180, 180)),))
    assert _caption(single) == "One shape: a blue triangle in the center."


def test_bad_arguments_and_foreign_folders_are_refused_and_reruns_replace(tmp_path):
    with pytest.raises(ValueError, match="eval must be even"):
        generate_demo_data(tmp_path / "a", n_eval=3)
    with pytest.raises(ValueError, match="captions must be >= 0"):
        generate_demo_data(tmp_path / "a", n_caption=-1)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no demo data set"):
        generate_demo_data(tmp_path / "foreign", n_caption=2, n_instruct=2, n_eval=2)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    generate_demo_data(tmp_path / "b", n_caption=10, n_instruct=10, n_eval=4, with_photos=False)
    summary = generate_demo_data(tmp_path / "b", n_caption=2, n_instruct=2, n_eval=2, with_photos=False)
    assert len(list((tmp_path / "b" / "images").iterdir())) == summary.records["images"] == 2 + 2 + (2 + 1 + 2 + 2)


def test_questions_about_a_scene_have_the_right_answers():
    shapes = (
        Shape("circle", "red", (10, 10, 60, 60)),
        Shape("square", "red", (200, 200, 260, 260)),
        Shape("square", "blue", (10, 200, 60, 250)),
    )
    scene = Scene(0, 300, 300, (250, 250, 250), shapes)
    rng = np.random.default_rng(0)
    expected = {
        ("color", "What color is the circle? Answer with a single word."): "red",
        ("shape", "What shape is the blue object? Answer with a single word."): "square",
        ("count", "How many shapes are in the image? Answer with a single word."): "3",
    }
    for (kind, question), answer in expected.items():
        assert _qa(kind, scene, rng, short=True) == (question, answer)
    assert _qa("color", scene, rng, short=False) == ("What color is the circle?", "The circle is red.")
    assert _qa("count", scene, rng, short=False)[1] == "There are 3 shapes."
    wheres = {_qa("where", scene, rng, short=False)[1] for _ in range(30)}
    assert wheres == {
        "The red circle is at the top left.",
        "The red square is at the bottom right.",
        "The blue square is at the bottom left.",
    }
    boxes = dict(_qa("grounding", scene, rng, short=False) for _ in range(30))
    prompt = "Please provide the bounding box coordinate of the region this sentence describes: the {}."
    assert boxes[prompt.format("red circle")] == "[0.03, 0.03, 0.20, 0.20]"
    assert boxes[prompt.format("blue square")] == "[0.03, 0.67, 0.20, 0.83]"
    for _ in range(30):
        question, answer = _qa("pope", scene, rng, short=False)
        name = question.removeprefix("Is there a ").removesuffix(" in the image?")
        assert (answer == "yes") == (name in {s.name for s in shapes})
    two_circles = Scene(1, 300, 300, (250, 250, 250), (shapes[0], Shape("circle", "blue", (200, 10, 250, 60))))
    assert _qa("color", two_circles, rng, short=True) is None  # "the circle" would be ambiguous
