"""Benchmark adapters: each reads one benchmark in its usual on-disk layout into questions, and scores answers.

| kind | layout read | metrics |
|---|---|---|
| `demo` | the demo data's eval/*.jsonl (`id, image, question, answer, type`) | accuracy per question type, chance |
| `vqa` | TextVQA/VQAv2 JSON: `{"data": [{question_id, question, image, answers: [10]}]}` | VQA soft accuracy |
| `docvqa` | DocVQA JSON: `{"data": [{questionId, question, image, answers}]}` | ANLS (τ = 0.5) |
| `pope` | POPE JSONL: `{question_id, image, text, label}` | accuracy, precision, recall, F1, yes-ratio |
| `mme` | MME folders: `SUBTASK/images/*` + `SUBTASK/questions_answers_YN/*.txt` (`question\\tYes/No`) | acc, acc+, score |
| `mmbench` | MMBench TSV: `index, question, A.., answer, image` (base64) | accuracy, circular accuracy |
| `refcoco` | JSON list: `{id, image, expression, bbox: [x, y, w, h], width, height}` | Precision@IoU 0.5 |
"""

from __future__ import annotations

import base64
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convllava import metrics

CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_PROMPT = "Answer the question using a single word or phrase."


@dataclass
class Item:
    id: str
    question: str
    image: str | None  # relative to the benchmark's root (predict refuses paths that escape it)
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    kind: str
    root: Path
    annotations: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def items(self) -> list[Item]:
        return LOADERS[self.kind](self)

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        return SCORERS[self.kind](self, items, answers)

    def path(self, rel: str | Path) -> str:
        """Image path relative to the root (absolute paths under the root are made relative)."""
        p = Path(rel)
        return str(p.resolve().relative_to(self.root.resolve())) if p.is_absolute() else str(rel)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- demo
def _load_demo(b: Benchmark) -> list[Item]:
    files = [b.annotations] if b.annotations else sorted(p.name for p in (b.root / "eval").glob("*.jsonl"))
    items = []
    for name in files:
        path = b.root / name if b.annotations else b.root / "eval" / name
        for r in _jsonl(path):
            items.append(Item(r["id"], r["question"], b.path(r["image"]), r["answer"], r))
    return items


def _score_demo(b: Benchmark, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
    chance = {}
    meta = b.root / "metadata.json"
    if meta.is_file():
        chance = json.loads(meta.read_text()).get("chance", {})
    result = metrics.demo_accuracy([i.meta for i in items], answers, chance)
    flat = {f"{t}/accuracy": v["accuracy"] for t, v in result["per_type"].items()}
    flat.update({f"{t}/chance": v["chance"] for t, v in result["per_type"].items() if v.get("chance") is not None})
    flat["overall"] = result["overall"] or 0.0
    if result["overall_chance"] is not None:
        flat["overall/chance"] = result["overall_chance"]
    return flat


# ---------------------------------------------------------------- VQA / DocVQA
def _load_vqa(b: Benchmark) -> list[Item]:
    data = json.loads((b.root / (b.annotations or "questions.json")).read_text())
    rows = data["data"] if isinstance(data, dict) else data
    out = []
    for r in rows:
        qid = str(r.get("question_id", r.get("questionId")))
        image = r.get("image") or f"{b.options.get('image_dir', 'images')}/{r['image_id']}.jpg"
        refs = [a["answer"] if isinstance(a, dict) else a for a in r["answers"]]  # VQAv2: [{"answer": ...}]
        if b.kind == "vqa" and len(refs) < 2:
            raise ValueError(
                f"{b.root / (b.annotations or 'questions.json')}: question {qid} has {len(refs)} answer(s); VQA soft "
                "accuracy (EvalAI's formula, as lmms-eval computes it) compares each prediction with the other "
                "annotators' answers (10 in VQAv2/TextVQA), so with one answer every prediction scores 0"
            )
        out.append(Item(qid, f"{r['question']}\n{SHORT_PROMPT}", b.path(image), refs))
    return out


def _score_vqa(b: Benchmark, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
    scores = [metrics.vqa_soft_accuracy(answers.get(i.id, ""), i.reference) for i in items]
    return {"accuracy": sum(scores) / len(scores) if scores else 0.0}


def _score_docvqa(b: Benchmark, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
    scores = [metrics.anls(answers.get(i.id, ""), i.reference) for i in items]
    return {"anls": sum(scores) / len(scores) if scores else 0.0}


# ---------------------------------------------------------------- POPE
def _load_pope(b: Benchmark) -> list[Item]:
    return [
        Item(
            str(r["question_id"]),
            r["text"],
            b.path(b.options.get("image_dir", "images") + "/" + r["image"]),
            r["label"],
        )
        for r in _jsonl(b.root / (b.annotations or "pope.jsonl"))
    ]


def _score_pope(b: Benchmark, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
    return metrics.pope_metrics([answers.get(i.id, "") for i in items], [i.reference for i in items])


# ---------------------------------------------------------------- MME
def _load_mme(b: Benchmark) -> list[Item]:
    items = []
    for task in sorted(p for p in b.root.iterdir() if p.is_dir()):
        qa_dir = task / "questions_answers_YN" if (task / "questions_answers_YN").is_dir() else task
        img_dir = task / "images" if (task / "images").is_dir() else task
        for txt in sorted(qa_dir.glob("*.txt")):
            image = next((p for p in img_dir.iterdir() if p.stem == txt.stem and p.suffix != ".txt"), None)
            for n, line in enumerate(txt.read_text().splitlines()):
                if not line.strip():
                    continue
                question, answer = line.rsplit("\t", 1)
                items.append(
                    Item(
                        f"{task.name}/{txt.stem}/{n}",
                        question,
                        b.path(image) if image else None,
                        answer.strip(),
                        {"subtask": task.name, "image_id": txt.stem},
                    )
                )
    return items


def _score_mme(b: Benchmark, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
    records = [
        {
            "subtask": i.meta["subtask"],
            "image": i.meta["image_id"],
            "prediction": answers.get(i.id, ""),
            "answer": i.reference,
        }
        for i in items
    ]
    result = metrics.mme_scores(records)
    flat = {
        f"{task}/{k}": v[k] for task, v in result["subtasks"].items() for k in ("accuracy", "accuracy_plus", "score")
    }
    flat.update({k: result[k] for k in ("perception", "cognition", "total") if result.get(k) is not None})
    return flat


# ---------------------------------------------------------------- MMBench (TSV, base64 images)
def _load_mmbench(b: Benchmark) -> list[Item]:
    path = b.root / (b.annotations or "mmbench.tsv")
    image_dir = b.root / ".images"
    image_dir.mkdir(exist_ok=True)
    items = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            options = {k: row[k] for k in "ABCDEFGH" if row.get(k) not in (None, "", "nan")}
            image = image_dir / f"{row['index']}.png"
            if not image.exists():
                image.write_bytes(base64.b64decode(row["image"]))
            rotations = range(len(options)) if b.options.get("circular", True) else range(1)
            for shift in rotations:
                rotated, mapping = metrics.rotate_options(options, shift)
                text = "\n".join([row["question"], *(f"{k}. {v}" for k, v in rotated.items()), CHOICE_PROMPT])
                items.append(
                    Item(
                        f"{row['index']}/{shift}",
                        text,
                        b.path(image),
                        mapping[row["answer"]],
                        {"question_id": row["index"], "shift": shift, "options": rotated},
                    )
                )
    return items


def _score_mmbench(b: Benchmark, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
    groups = [
        (
            i.meta["question_id"],
            i.meta["shift"],
            metrics.extract_choice(answers.get(i.id, ""), i.meta["options"]),
            i.reference,
        )
        for i in items
    ]
    first = [g for g in groups if g[1] == 0]
    return {
        "accuracy": sum(p == c for _, _, p, c in first) / len(first) if first else 0.0,
        "circular_accuracy": metrics.circular_accuracy(groups),
    }


# ---------------------------------------------------------------- RefCOCO/+/g
def _load_refcoco(b: Benchmark) -> list[Item]:
    rows = json.loads((b.root / (b.annotations or "refcoco.json")).read_text())
    out = []
    for r in rows:
        x, y, w, h = r["bbox"]
        out.append(
            Item(
                str(r["id"]),
                metrics.GROUNDING_PROMPT.format(r["expression"]),
                b.path(r["image"]),
                [x, y, x + w, y + h],
                {"width": r["width"], "height": r["height"]},
            )
        )
    return out


def _score_refcoco(b: Benchmark, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
    frame = b.options.get("frame", "square")
    precision = metrics.grounding_precision(
        [answers.get(i.id, "") for i in items],
        [i.reference for i in items],
        [(i.meta["width"], i.meta["height"]) for i in items],
        frame=frame,
    )
    return {"precision@0.5": precision}


LOADERS = {
    "demo": _load_demo,
    "vqa": _load_vqa,
    "docvqa": _load_vqa,
    "pope": _load_pope,
    "mme": _load_mme,
    "mmbench": _load_mmbench,
    "refcoco": _load_refcoco,
}
SCORERS = {
    "demo": _score_demo,
    "vqa": _score_vqa,
    "docvqa": _score_docvqa,
    "pope": _score_pope,
    "mme": _score_mme,
    "mmbench": _score_mmbench,
    "refcoco": _score_refcoco,
}
