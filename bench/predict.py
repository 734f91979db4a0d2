"""answers/s of `convllava predict` vs a plain loop that calls `generate` one sample at a time — on the same
checkpoint, the same questions and images, greedy, the same max_new_tokens. Goals (issue 16), on an idle machine:
>= 1.5x at 96 questions and >= 3x at 1,000.

    .venv/bin/python bench/predict.py [--questions 96 1000] [--max-new-tokens 16] [--out bench/results/predict.json]

For each question count, three runs, each after waiting for an idle machine:
- plain loop: `load_model`, then one `generate` per question, `torch.set_num_threads(2)` (both cores).
- predict: `run_predict` as `convllava predict` runs it by default; on this one-node machine without a GPU that is
  in this process (`pipelines.predict.replicas_for`), so no Ray is started.
- pool: `run_predict(workers=2)`: Ray Data's actor pool, one single-threaded replica per core (Ray started
  before timing; its `ray.init` time is reported apart).
Each time counts everything from the call: reading, bucketing, loading the model (per replica), writing answers.

The checkpoint is the tiny preset (random weights from `convllava init`, seeded): a random model rarely emits the
stop token, so every side generates the full max_new_tokens for nearly every answer and does the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import wait_quiet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "bench-predict"
GOALS = {"96": 1.5, "1000": 3.0}  # speedup over the plain loop, by question count (issue 16)


def prepare(sizes: list[int]) -> tuple[Path, Path, dict[int, Path]]:
    from pipelines.demo.data import generate_demo_data

    n = max(sizes)
    data, ckpt = WORK / f"data-{n}", WORK / "tiny"
    if not (data / "metadata.json").is_file():
        generate_demo_data(data, seed=0, n_caption=8, n_instruct=8, n_eval=max(50, (n + 1) // 2))
    if not (ckpt / "model.safetensors").is_file():
        subprocess.run(
            [str(Path(sys.executable).parent / "convllava"), "init", "--preset", "tiny", "--output", str(ckpt)],
            check=True,
            capture_output=True,
        )
    rows = []
    for name in ("open", "pope"):
        rows += [json.loads(line) for line in (data / "eval" / f"{name}.jsonl").read_text().splitlines()]
    files = {}
    for size in sizes:
        files[size] = WORK / f"questions-{size}.jsonl"
        files[size].write_text(
            "".join(
                json.dumps({"id": r["id"], "question": r["question"], "image": r["image"]}) + "\n" for r in rows[:size]
            )
        )
    return data, ckpt, files


def plain_loop(ckpt: Path, data: Path, questions: Path, max_new_tokens: int) -> tuple[float, int]:
    import torch

    from convllava.modeling.checkpoint import load_model
    from convllava.modeling.inference import GenerationOptions, generate
    from convllava.processing.image_processing import load_image

    torch.set_num_threads(2)
    start = time.perf_counter()
    model, processor = load_model(ckpt)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    tokens = 0
    for r in rows:
        answer = generate(model, processor, [r["question"]], [load_image(data / r["image"])], options)[0]
        tokens += len(processor.tokenizer(answer, add_special_tokens=False).input_ids)
    return time.perf_counter() - start, tokens


def predict(ckpt: Path, data: Path, questions: Path, max_new_tokens: int, workers: int | None) -> dict:
    from pipelines.predict import run_predict

    out = WORK / "answers.jsonl"
    t = time.perf_counter()
    summary = run_predict(
        str(ckpt), str(questions), str(out), image_root=str(data), max_new_tokens=max_new_tokens, workers=workers
    )
    seconds = time.perf_counter() - t
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    n = len(questions.read_text().splitlines())
    assert len(answers) == n and all("answer" in a for a in answers), summary
    return {"seconds": seconds, "answers_per_s": n / seconds, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, nargs="+", default=[96, 1000])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--wait-quiet", type=float, default=30.0, metavar="S", help="wait up to S s for an idle machine"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "predict.json"))
    args = parser.parse_args()
    data, ckpt, files = prepare(args.questions)
    load_start = os.getloadavg()
    runs = {}
    for n, questions in files.items():
        quiet = wait_quiet(max_wait=args.wait_quiet, threshold=0.3)
        loop_s, loop_tokens = plain_loop(ckpt, data, questions, args.max_new_tokens)
        run = {
            "questions": n,
            "quiet_before": quiet,
            "plain_loop": {"seconds": loop_s, "answers_per_s": n / loop_s, "generated_tokens": loop_tokens},
        }
        wait_quiet(max_wait=args.wait_quiet, threshold=0.3)
        run["predict"] = predict(ckpt, data, questions, args.max_new_tokens, workers=None)
        run["speedup"] = loop_s / run["predict"]["seconds"]
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t
        try:
            wait_quiet(max_wait=args.wait_quiet, threshold=0.3)
            run["pool"] = {**predict(ckpt, data, questions, args.max_new_tokens, workers=2), "ray_init_s": ray_init_s}
        finally:
            ray.shutdown()
        run["pool_speedup"] = loop_s / run["pool"]["seconds"]
        runs[str(n)] = run
    result = {
        "description": __doc__.splitlines()[0],
        "max_new_tokens": args.max_new_tokens,
        "goal": GOALS,
        "runs": runs,
        "met": {n: r["speedup"] >= GOALS.get(n, 0) for n, r in runs.items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
        },
    }
    print("| questions | plain loop, s | predict (default: in this process), s | speedup | 2-actor pool, s | speedup |")
    print("|---|---|---|---|---|---|")
    for n, r in runs.items():
        print(
            f"| {n} | {r['plain_loop']['seconds']:.1f} | {r['predict']['seconds']:.1f} | **{r['speedup']:.2f}x** | "
            f"{r['pool']['seconds']:.1f} | {r['pool_speedup']:.2f}x |"
        )
    print(f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
