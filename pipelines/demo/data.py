"""A seeded, reproducible LLaVA-format demo data set that a tiny ConvLLaVA model can learn on a CPU.

Scenes of `pipelines.demo.scenes` (1–3 flat shapes on light canvases of varied size and aspect ratio) plus the
real photos of `convllava.data.sample_images`, with captions, questions and held-out eval sets about them.
Same seed → byte-identical files; a different seed → different data.

Layout of OUTPUT:
    images/scene_NNNNNN.{jpg,png}   rendered scenes (JPEG quality 90; about 10% PNG)
    images/photos/*.{png,jpg}       the sample photos, copied as they are (with_photos)
    captions.json                   LLaVA JSON list, one caption turn per image (stages 1–2)
    instruct.jsonl                  2–3 Q/A turns per scene, ~2% text-only records, one Q/A per photo (stage 3);
                                    each record's extra `types` key lists its turns' question types
    eval/{open,pope,grounding,detail}.jsonl   held-out scenes: {"id", "image", "question", "answer", "type",
                                    "objects" (the scene's "colour shape" names), ...}; questions carry no <image> tag
    mixture.yaml                    the two training sources with sampling ratios
    metadata.json                   seed, record counts, chance level per eval type (DemoDataSummary, no path)

Answer conventions (training replies to the eval-style questions use exactly the same forms):
    color / shape: one lowercase word ("red", "circle"); count: digits ("3"); pope: "yes" / "no";
    detail: the two-digit number ("47", chance 1/90); grounding: [x1, y1, x2, y2] normalised to [0, 1] in
    the original image frame (eval: 3 decimals plus `bbox_pixels`, `width`, `height`; training: 2 decimals).

mixture.yaml follows `pipelines.config.Mixture`: `sources`, a list of `{name, annotations, image_root, ratio}`
with paths relative to the YAML's folder; `ratio` ∈ (0, 1] is the share of a source's records used (1.0: all).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import model_validator

from convllava.data.sample_images import sample_photos
from convllava.io.config import ConfigModel
from convllava.metrics import GROUNDING_PROMPT
from pipelines.demo.scenes import COLORS, MAX_SHAPES, SHAPES, Scene, random_scene, render

NUMBER_WORDS = ("zero", "one", "two", "three")
DETAIL_FRACTION = 0.25  # instruct scenes that carry a small number and a question about it
TEXT_ONLY_FRACTION = 0.02
INSTRUCT_TYPES = ("color", "shape", "count", "pope", "where", "grounding")  # plus "detail" on number scenes

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this image?",
    "Give a short description of the picture.",
    "Write a caption for this image.",
)
SINGLE_WORD = "Answer with a single word."
DETAIL_QUESTION = "What is the small number written in the image? Answer with the number."
PHOTO_QUESTION = "What is the main subject of this photo? Answer with one word."
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple"}


class DemoDataConfig(ConfigModel):
    """How much demo data to generate: the defaults of `generate_demo_data`, `convllava demo-data` and a pipeline
    config's `demo_data` section.

    Args:
        seed: every file is a pure function of the seed and the counts.
        captions: caption records on rendered scenes (each photo adds one more).
        instruct: instruct records, ~2% of them text-only (each photo adds one more).
        eval: records in each eval file (open, pope, grounding, detail); even, so POPE is exactly 50% yes.
        with_photos: copy the sample photos and add a caption and a subject Q/A record for each.
    """

    seed: int = 0
    captions: int = 1200
    instruct: int = 1200
    eval: int = 200
    with_photos: bool = True

    @model_validator(mode="after")
    def _check(self) -> DemoDataConfig:
        for name in ("captions", "instruct", "eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo data: {name} must be >= 0, got {getattr(self, name)}")
        if self.eval % 2:
            why = "POPE pairs one yes with one no question per scene"
            raise ValueError(f"demo data: eval must be even ({why}), got {self.eval}")
        return self

    def generate(self, output: str | Path) -> DemoDataSummary:
        """Write this demo data set into `output` (see `generate_demo_data`)."""
        return generate_demo_data(output, self.seed, self.captions, self.instruct, self.eval, self.with_photos)


DEFAULTS = DemoDataConfig()


@dataclass(frozen=True)
class DemoDataSummary:
    """What `generate_demo_data` wrote; `metadata.json` holds every field but `output` (so seeds compare)."""

    output: Path
    seed: int
    records: dict[str, int]  # file (relative to output) → records; "images" → image files
    question_types: dict[str, dict[str, int]]  # file → type → records (instruct.jsonl: Q/A turns)
    chance: dict[str, float | None]  # eval type → accuracy of uniform guessing
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["output"]
        return {"generator": "pipelines.demo.data", **data}


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _caption(scene: Scene) -> str:
    """'Two shapes: a red circle on the left and an orange square at the top right.' (left to right)."""
    shapes = sorted(scene.shapes, key=lambda s: (s.box[0] + s.box[2], s.box[1]))
    parts = [f"{_a(s.name)} {scene.where(s)}" for s in shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBER_WORDS[len(shapes)].capitalize()} shape{'s' if len(shapes) > 1 else ''}: {listed}."


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _pope_pair(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    """(a present "colour shape", an absent one sharing its colour or shape with the scene, both if possible)."""
    present = list(dict.fromkeys(s.name for s in scene.shapes))
    colors, kinds = {s.color for s in scene.shapes}, {s.kind for s in scene.shapes}
    absent = [(c, k) for c in COLORS for k in SHAPES if f"{c} {k}" not in present]
    swapped = [f"{c} {k}" for c, k in absent if c in colors and k in kinds]
    near = swapped or [f"{c} {k}" for c, k in absent if c in colors or k in kinds]
    return _pick(rng, present), _pick(rng, near)


def _pope_question(name: str) -> str:
    return f"Is there {_a(name)} in the image?"


def _qa(kind: str, scene: Scene, rng: np.random.Generator, short: bool) -> tuple[str, str] | None:
    """One (question, answer) of `kind` about `scene`, or None where the question would be ambiguous.

    `short` asks for the eval form (a single lowercase word or digits); otherwise a sentence answers.
    """
    if kind == "color" and (kinds := scene.unique("kind")):
        shape = _pick(rng, kinds)
        color = next(s.color for s in scene.shapes if s.kind == shape)
        q = f"What color is the {shape}?"
        return (f"{q} {SINGLE_WORD}", color) if short else (q, f"The {shape} is {color}.")
    if kind == "shape" and (colors := scene.unique("color")):
        color = _pick(rng, colors)
        shape = next(s.kind for s in scene.shapes if s.color == color)
        q = f"What shape is the {color} object?"
        return (f"{q} {SINGLE_WORD}", shape) if short else (q, f"The {color} object is a {shape}.")
    if kind == "count":
        n = len(scene.shapes)
        q, sentence = "How many shapes are in the image?", f"There are {n} shapes." if n > 1 else "There is 1 shape."
        return (f"{q} {SINGLE_WORD}", str(n)) if short else (q, sentence)
    if kind == "pope":
        yes, no = _pope_pair(rng, scene)
        return (_pope_question(yes), "yes") if rng.random() < 0.5 else (_pope_question(no), "no")
    if kind == "where" and (names := scene.unique("name")):
        name = _pick(rng, names)
        return f"Where is the {name}?", f"The {name} is {scene.where(scene.shape(name))}."
    if kind == "grounding" and (names := scene.unique("name")):
        name = _pick(rng, names)
        box = ", ".join(f"{v:.2f}" for v in scene.normalized_box(scene.shape(name), 2))
        return GROUNDING_PROMPT.format(f"the {name}"), f"[{box}]"
    return None


def _conversation(turns: list[tuple[str, str]], image: bool = True) -> list[dict[str, str]]:
    """LLaVA turns; only the first human turn carries the `<image>` tag."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if image and i == 0 else ""
        messages += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return messages


def _text_only(rng: np.random.Generator, i: int) -> tuple[str, str]:
    if i % 2 == 0:
        a, b = (int(v) for v in rng.integers(1, 10, size=2))
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    (first, second), mix = list(MIXES.items())[int(rng.integers(len(MIXES)))]
    return f"What color do you get by mixing {first} and {second} paint?", f"Mixing {first} and {second} gives {mix}."


def _random_box_hit_rate(boxes: list[list[float]], rng: np.random.Generator, draws: int = 4096) -> float | None:
    """Mean probability that a box with uniform random corners reaches IoU ≥ 0.5 with the target box."""
    if not boxes:
        return None
    rates = []
    for x1, y1, x2, y2 in boxes:
        xs, ys = np.sort(rng.random((draws, 2)), axis=1), np.sort(rng.random((draws, 2)), axis=1)
        inter = np.clip(np.minimum(xs[:, 1], x2) - np.maximum(xs[:, 0], x1), 0, None) * np.clip(
            np.minimum(ys[:, 1], y2) - np.maximum(ys[:, 0], y1), 0, None
        )
        union = (xs[:, 1] - xs[:, 0]) * (ys[:, 1] - ys[:, 0]) + (x2 - x1) * (y2 - y1) - inter
        rates.append(float(np.mean(inter / union >= 0.5)))
    return round(float(np.mean(rates)), 5)


class _Builder:
    """Draws scenes from one seeded generator and renders those it keeps, numbered in keeping order."""

    def __init__(self, output: Path, seed: int) -> None:
        self.output, self.rng, self.scenes = output, np.random.default_rng(seed), []

    def scene(self, detail: bool = False) -> Scene:
        return random_scene(self.rng, len(self.scenes), detail)

    def keep(self, scene: Scene) -> Scene:
        render(scene, self.output)
        self.scenes.append(scene)
        return scene

    def captions(self, n: int) -> list[dict]:
        records = []
        for _ in range(n):
            s = self.keep(self.scene())
            conv = _conversation([(_pick(self.rng, list(CAPTION_PROMPTS)), _caption(s))])
            records.append({"id": f"caption-{s.index:06d}", "image": s.image, "conversations": conv})
        return records

    def instruct(self, n: int) -> list[dict]:
        """n records: 2–3 Q/A turns per scene (one about the small number where there is one), ~2% text-only."""
        n_text, records = round(n * TEXT_ONLY_FRACTION), []
        for _ in range(n - n_text):
            s = self.keep(self.scene(detail=self.rng.random() < DETAIL_FRACTION))
            wanted, turns = int(self.rng.integers(2, 4)) - (s.number is not None), []
            for kind in (str(k) for k in self.rng.permutation(INSTRUCT_TYPES)):
                if len(turns) < wanted and (qa := _qa(kind, s, self.rng, short=self.rng.random() < 0.5)):
                    turns.append((kind, *qa))
            if s.number is not None:
                turns.insert(int(self.rng.integers(len(turns) + 1)), ("detail", DETAIL_QUESTION, s.number))
            conv = _conversation([(q, a) for _, q, a in turns])
            types = [t for t, _, _ in turns]
            records.append({"id": f"instruct-{s.index:06d}", "image": s.image, "conversations": conv, "types": types})
        for i in range(n_text):
            conv = _conversation([_text_only(self.rng, i)], image=False)
            records.append({"id": f"text-{i:04d}", "conversations": conv, "types": ["text"]})
        return records

    def photos(self) -> tuple[list[dict], list[dict]]:
        """Copy the sample photos unchanged; one caption record and one subject Q/A record for each."""
        (self.output / "images" / "photos").mkdir()
        captions, instruct = [], []
        for photo in sample_photos():
            image = f"images/photos/{photo.path.name}"
            shutil.copyfile(photo.path, self.output / image)
            conv = _conversation([(_pick(self.rng, list(CAPTION_PROMPTS)), photo.caption)])
            captions.append({"id": f"photo-{photo.name}-caption", "image": image, "conversations": conv})
            conv = _conversation([(PHOTO_QUESTION, photo.subject)])
            instruct.append(
                {"id": f"photo-{photo.name}-subject", "image": image, "conversations": conv, "types": ["photo"]}
            )
        return captions, instruct

    @staticmethod
    def _record(name: str, i: int, s: Scene, question: str, answer: object, kind: str, **extra: object) -> dict:
        objects = [shape.name for shape in s.shapes]
        record = {"id": f"{name}-{i:05d}", "image": s.image, "question": question, "answer": answer, "type": kind}
        return {**record, "objects": objects, **extra}

    def evals(self, n: int) -> dict[str, list[dict]]:
        """n records per eval set, each on fresh scenes; POPE asks one yes and one no question per scene."""
        sets: dict[str, list[dict]] = {"open": [], "pope": [], "grounding": [], "detail": []}
        for i in range(n):
            kind = ("color", "shape", "count")[i % 3]
            while (qa := _qa(kind, s := self.scene(), self.rng, short=True)) is None:
                pass
            sets["open"].append(self._record("open", i, self.keep(s), *qa, kind))
        for i in range(0, n, 2):
            s = self.keep(self.scene())
            pair = list(zip(_pope_pair(self.rng, s), ("yes", "no"), strict=True))
            for j, (name, answer) in enumerate(pair if self.rng.random() < 0.5 else pair[::-1]):
                sets["pope"].append(self._record("pope", i + j, s, _pope_question(name), answer, "pope"))
        for i in range(n):
            while not (names := (s := self.scene()).unique("name")):
                pass
            target = self.keep(s).shape(_pick(self.rng, names))
            question, box = GROUNDING_PROMPT.format(f"the {target.name}"), s.normalized_box(target, 3)
            extra = {"bbox_pixels": list(target.box), "width": s.width, "height": s.height}
            sets["grounding"].append(self._record("grounding", i, s, question, box, "grounding", **extra))
        for i in range(n):
            s = self.keep(self.scene(detail=True))
            extra = {"bbox_pixels": list(s.number_box), "font_px": s.number_size, "width": s.width, "height": s.height}
            sets["detail"].append(self._record("detail", i, s, DETAIL_QUESTION, s.number, "detail", **extra))
        return sets


def _prepare(output: Path) -> None:
    """Make OUTPUT ready: new or empty, or a previous demo data set (whose files are replaced)."""
    if output.exists() and any(output.iterdir()):
        try:
            ours = json.loads((output / "metadata.json").read_text()).get("generator") in (
                "pipelines.demo.data",
                "pipelines.demo_data",
            )  # (its name before the move)
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(
                f"{output} is not empty and holds no demo data set (no metadata.json from pipelines.demo.data); "
                "choose a new or empty folder"
            )
        for name in ("images", "eval"):
            shutil.rmtree(output / name, ignore_errors=True)
        for name in ("captions.json", "instruct.jsonl", "mixture.yaml", "metadata.json"):
            (output / name).unlink(missing_ok=True)
    (output / "images").mkdir(parents=True, exist_ok=True)
    (output / "eval").mkdir(exist_ok=True)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _type_counts(records: list[dict], key: str) -> dict[str, int]:
    values = [v for r in records for v in (r[key] if isinstance(r[key], list) else [r[key]])]
    return {v: values.count(v) for v in sorted(set(values))}


def generate_demo_data(
    output: str | Path,
    seed: int = DEFAULTS.seed,
    n_caption: int = DEFAULTS.captions,
    n_instruct: int = DEFAULTS.instruct,
    n_eval: int = DEFAULTS.eval,
    with_photos: bool = DEFAULTS.with_photos,
) -> DemoDataSummary:
    """Write the demo data set into `output` (see the module docstring for layout and conventions).

    Args:
        output: a new or empty folder, or one holding an earlier demo data set (replaced).
        seed, n_caption, n_instruct, n_eval, with_photos: as `DemoDataConfig`'s seed, captions, instruct, eval and
            with_photos.

    Raises:
        ValueError: a negative count or an odd n_eval (named as DemoDataConfig's field).
        FileExistsError: `output` is not empty and is not an earlier demo data set.
    """
    # the checks, in one place
    DemoDataConfig(seed=seed, captions=n_caption, instruct=n_instruct, eval=n_eval, with_photos=with_photos)
    output = Path(output)
    _prepare(output)
    builder = _Builder(output, seed)
    captions, instruct = builder.captions(n_caption), builder.instruct(n_instruct)
    photo_captions, photo_instruct = builder.photos() if with_photos else ([], [])
    captions += photo_captions
    instruct = [(instruct + photo_instruct)[i] for i in builder.rng.permutation(len(instruct) + len(photo_instruct))]
    evals = builder.evals(n_eval)

    (output / "captions.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in captions) + "\n]\n")
    _write_jsonl(output / "instruct.jsonl", instruct)
    for name, records in evals.items():
        _write_jsonl(output / "eval" / f"{name}.jsonl", records)
    sources = [("captions", "captions.json"), ("instruct", "instruct.jsonl")]
    mixture = {"sources": [{"name": n, "annotations": a, "image_root": ".", "ratio": 1.0} for n, a in sources]}
    header = f"# Demo data mixture written by pipelines.demo.data.generate_demo_data(seed={seed}).\n"
    (output / "mixture.yaml").write_text(header + yaml.safe_dump(mixture, sort_keys=False))

    chance = {
        "color": 1 / len(COLORS),
        "shape": 1 / len(SHAPES),
        "count": 1 / MAX_SHAPES,
        "pope": 0.5,
        "detail": 1 / 90,
    }
    grounding_chance = _random_box_hit_rate([r["answer"] for r in evals["grounding"]], np.random.default_rng([seed, 1]))
    summary = DemoDataSummary(
        output=output,
        seed=seed,
        records={
            "captions.json": len(captions),
            "instruct.jsonl": len(instruct),
            **{f"eval/{name}.jsonl": len(records) for name, records in evals.items()},
            "images": len(builder.scenes) + len(photo_captions),
        },
        question_types={
            "captions.json": {"scene": n_caption, "photo": len(photo_captions)},
            "instruct.jsonl": _type_counts(instruct, "types"),
            **{f"eval/{name}.jsonl": _type_counts(records, "type") for name, records in evals.items()},
        },
        chance={**chance, "grounding": grounding_chance},
        notes={
            "grounding_chance": "mean over grounding records of P(IoU >= 0.5) for a box whose x and y corners are "
            "two sorted uniform draws in [0, 1] (4096 draws per record); None without grounding records",
            "answers": "color/shape: one lowercase word; count: digits; pope: yes/no; detail: two digits (10-99); "
            "grounding: [x1, y1, x2, y2] in [0, 1] of the original image",
            "eval_questions": "carry no <image> tag; prepend '<image>\\n' (ConvLlavaProcessor.prompts does)",
        },
    )
    (output / "metadata.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
