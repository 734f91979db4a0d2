"""`convllava eval`: run a suite of benchmark adapters over a checkpoint through batch prediction.

Writes OUTPUT/metrics.json (flat `benchmark/metric → number`), OUTPUT/predictions.jsonl (one line per question:
id, benchmark, question, prediction or error, reference) and OUTPUT/report.md, and logs all three to MLflow when
a run is given.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from convllava.io.config import ConfigModel
from jobs.evaluate.benchmarks import LOADERS, Benchmark
from jobs.tracking.vocabulary import (
    ARTIFACT_ACCURACY_CHART,
    ARTIFACT_EVAL_DIR,
    ARTIFACT_SAMPLES,
    EVAL_METRICS_FILE,
    EVAL_OUTPUT_FILES,
    EVAL_PREDICTIONS_FILE,
    EVAL_REPORT_FILE,
    TAG_NOTE,
    eval_metric,
)

SUITE_DIR = Path(__file__).parents[1] / "configs" / "suites"


class EvalError(RuntimeError):
    """Too many questions failed (missing images, unreadable files) for the metrics to mean anything."""


@dataclass
class EvalResult:
    metrics: dict[str, float]
    report: str
    output: Path


class BenchmarkSpec(ConfigModel):
    """One benchmark of a suite YAML: its adapter (`kind`), files under the suite's root, adapter options."""

    kind: str
    name: str | None = None  # default: the kind
    root: str = "."
    annotations: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in LOADERS:
            raise ValueError(f"unknown kind {kind!r} (kinds: {sorted(LOADERS)})")
        return kind


class SuiteConfig(ConfigModel):
    """A suite YAML (jobs/configs/suites/): benchmarks whose files lie under `root`."""

    benchmarks: list[BenchmarkSpec]
    name: str | None = None  # default: the file's name
    root: str = "."

    @field_validator("benchmarks")
    @classmethod
    def _some(cls, benchmarks: list[BenchmarkSpec]) -> list[BenchmarkSpec]:
        if not benchmarks:
            raise ValueError("no benchmarks")
        return benchmarks


def load_suite(suite: str, data_root: str | None = None) -> tuple[str, list[Benchmark]]:
    """A suite by name (jobs/configs/suites/NAME.yaml) or path. `root` is relative to the working directory."""
    path = Path(suite) if Path(suite).suffix in (".yaml", ".yml") else SUITE_DIR / f"{suite}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))
        raise ValueError(f"unknown suite {suite!r}: no {path}; built-in suites: {known}")
    config = SuiteConfig.from_yaml(path)
    root = Path(data_root or config.root)
    benches = [
        Benchmark(b.name or b.kind, b.kind, root / b.root, b.annotations, dict(b.options)) for b in config.benchmarks
    ]
    return config.name or path.stem, benches


def fixed_metric_names(benches: list[Benchmark]) -> list[str]:
    """The metric names `run_eval` reports for these benchmarks whatever their data: each scorer's keys for no
    questions, as `benchmark/metric`. Scorers also report names per group that the data decides
    (`mme/<subtask>/score`, `demo/<type>/accuracy`); those cannot be listed without the data."""
    return sorted(f"{b.name}/{key}" for b in benches for key in b.score([], {}))


def run_eval(
    model: str,
    suite: str,
    output: str | Path,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    address: str | None = None,
    limit: int | None = None,
    data_root: str | None = None,
    max_new_tokens: int = 32,
    max_error_fraction: float = 0.1,
) -> EvalResult:
    from pipelines.predict import run_predict

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    suite_name, benches = load_suite(suite, data_root)
    items = {b.name: b.items()[:limit] if limit else b.items() for b in benches}
    answers, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for b in benches:  # one batch-prediction job per benchmark: its images are relative to its root
            questions, answers_path = Path(tmp) / f"{b.name}.jsonl", Path(tmp) / f"{b.name}.answers.jsonl"
            with open(questions, "w") as f:
                for it in items[b.name]:
                    rec = {"id": f"{b.name}::{it.id}", "question": it.question}
                    if it.image:
                        rec["image"] = it.image
                    f.write(json.dumps(rec) + "\n")
            summaries.append(
                run_predict(
                    model,
                    str(questions),
                    str(answers_path),
                    image_root=str(b.root),
                    max_new_tokens=max_new_tokens,
                    address=address,
                )
            )
            answers += [json.loads(line) for line in answers_path.read_text().splitlines()]
    summary = "\n".join(summaries)
    errors = [a for a in answers if "error" in a]
    if len(errors) > max_error_fraction * max(1, len(answers)):
        raise EvalError(
            f"{len(errors)} of {len(answers)} questions could not be answered "
            f"(e.g. {errors[0]['id']}: {errors[0]['error']}); refusing to report metrics on them"
        )
    by_id = {a["id"]: a for a in answers}
    results: dict[str, float] = {}
    lines = []
    for b in benches:
        preds = {it.id: by_id[f"{b.name}::{it.id}"].get("answer", "") for it in items[b.name]}
        for key, value in b.score(items[b.name], preds).items():
            results[f"{b.name}/{key}"] = float(value)
        for it in items[b.name]:
            a = by_id[f"{b.name}::{it.id}"]
            lines.append(
                json.dumps(
                    {
                        "id": it.id,
                        "benchmark": b.name,
                        "question": it.question,
                        "prediction": a.get("answer"),
                        "error": a.get("error"),
                        "reference": it.reference,
                    },
                    ensure_ascii=False,
                    default=str,
                )
            )
    (output / EVAL_METRICS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (output / EVAL_PREDICTIONS_FILE).write_text("".join(line + "\n" for line in lines))
    report = _report(suite_name, model, results, summary)
    (output / EVAL_REPORT_FILE).write_text(report + "\n")
    if tracking_uri and run_id:
        _log(tracking_uri, run_id, results, output)
        _log_pictures(tracking_uri, run_id, results, samples(benches, items, by_id))
        _log_questions(tracking_uri, run_id, benches, items)
        from jobs.tracking.runs import client

        client(tracking_uri).set_tag(run_id, TAG_NOTE, report)  # the run's description in the UI
    return EvalResult(results, report, output)


def _log_questions(tracking_uri: str, run_id: str, benches: list[Benchmark], items: dict[str, list]) -> None:
    """Each benchmark's questions as one of the run's datasets (context `evaluation`): its source, a digest of
    the questions and references asked, their count."""
    import hashlib

    from jobs.tracking.runs import log_dataset

    for b in benches:
        asked = [(it.id, it.question, it.reference) for it in items[b.name]]
        digest = hashlib.sha256(json.dumps(asked, default=str).encode()).hexdigest()
        source = str(b.root / b.annotations) if b.annotations else str(b.root)
        log_dataset(tracking_uri, run_id, f"eval/{b.name}", source, digest, {"questions": len(asked)}, "evaluation")


SAMPLE_ROWS = 48


def samples(benches: list[Benchmark], items: dict[str, list], by_id: dict[str, dict]) -> list[dict[str, Any]]:
    """Up to SAMPLE_ROWS predictions, spread evenly over each benchmark's items: image thumbnail (gray: none),
    question, answer, reference, and whether the benchmark's own formula gives the answer full marks alone."""
    from PIL import Image

    rows = []
    per_bench = max(1, SAMPLE_ROWS // max(1, len(benches)))
    for b in benches:
        chosen = items[b.name][:: max(1, len(items[b.name]) // per_bench)][:per_bench]
        for it in chosen:
            answer = by_id[f"{b.name}::{it.id}"].get("answer", "")
            alone = b.score([it], {it.id: answer})
            headline = alone.get("overall", alone.get("accuracy", next(iter(alone.values()), 0.0)))
            thumb = Image.new("RGB", (32, 32), "lightgray")  # a text-only question (the column holds only images)
            if it.image:
                with Image.open(b.root / it.image) as image:
                    thumb = image.convert("RGB")
                    thumb.thumbnail((128, 128))
            rows.append(
                {
                    "image": thumb,
                    "benchmark": b.name,
                    "question": it.question,
                    "answer": answer,
                    "reference": json.dumps(it.reference, default=str),
                    "correct": headline == 1.0,
                }
            )
    return rows


def _log_pictures(tracking_uri: str, run_id: str, results: dict[str, float], rows: list[dict[str, Any]]) -> None:
    """The eval run's pictures: accuracy per question type next to chance (`eval/accuracy_vs_chance.png`, when the
    suite reports chance) and the sample predictions as an MLflow table (`eval/samples.json`, thumbnails included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.tracking.runs import best_effort, client

    c = client(tracking_uri)
    pairs = {
        k.removesuffix("/accuracy"): (v, results[k.removesuffix("/accuracy") + "/chance"])
        for k, v in sorted(results.items())
        if k.endswith("/accuracy") and k.removesuffix("/accuracy") + "/chance" in results
    }
    if pairs:
        fig, ax = plt.subplots(figsize=(1.2 * len(pairs) + 2, 3.5))
        x = range(len(pairs))
        ax.bar([i - 0.2 for i in x], [a for a, _ in pairs.values()], 0.4, label="accuracy")
        ax.bar([i + 0.2 for i in x], [ch for _, ch in pairs.values()], 0.4, label="chance", color="lightgray")
        ax.set_xticks(list(x), [k.split("/")[-1] for k in pairs], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title("accuracy per question type against chance")
        ax.legend()
        fig.tight_layout()
        best_effort("log accuracy chart", lambda: c.log_figure(run_id, fig, ARTIFACT_ACCURACY_CHART))
        plt.close(fig)
    if rows:
        table = {key: [r[key] for r in rows] for key in rows[0]}
        best_effort("log sample predictions", lambda: c.log_table(run_id, data=table, artifact_file=ARTIFACT_SAMPLES))


def _report(suite: str, model: str, results: dict[str, float], summary: str) -> str:
    lines = [f"# Evaluation: suite `{suite}`", "", f"model: `{model}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(results.items())]
    lines += ["", summary]
    return "\n".join(lines)


def _log(tracking_uri: str, run_id: str, results: dict[str, float], output: Path) -> None:
    from mlflow.entities import Metric

    from jobs.tracking.runs import client

    c = client(tracking_uri)
    c.log_batch(run_id, metrics=[Metric(eval_metric(k), v, 0, 0) for k, v in results.items()])
    for name in EVAL_OUTPUT_FILES:
        c.log_artifact(run_id, str(output / name), ARTIFACT_EVAL_DIR)


def metric_value(results: dict[str, Any], name: str) -> float:
    if name not in results:
        raise KeyError(f"metric {name!r} not in the eval results ({sorted(results)})")
    return float(results[name])
