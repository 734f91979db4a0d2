"""answers/s of `convllava predict` (Ray Data, actor pool, bucket-homogeneous batches) vs a plain loop that calls
`generate` one sample at a time — on the same checkpoint, the same questions and images, greedy, the same
max_new_tokens. Goal (evaluation issue): ≥ 1.5×.

    .venv/bin/python bench/predict.py [--questions 96] [--max-new-tokens 16] [--out bench/results/predict.json]

The checkpoint is the tiny preset (random weights from `convllava init`, seeded): a random model rarely emits the
stop token, so both sides generate the full max_new_tokens for nearly every answer and do the same work. Ray's own
start-up (`ray.init`) happens before timing and is reported separately; the predict time includes everything else
(reading, bucketing, starting the actors, loading the model in each, writing the answers). The plain loop uses
`torch.set_num_threads(2)`, i.e. both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "bench-predict"


def prepare(n: int) -> tuple[Path, Path, Path]:
    from pipelines.demo_data import generate_demo_data

    data, ckpt = WORK / "data", WORK / "tiny"
    if not (data / "metadata.json").is_file():
        generate_demo_data(data, seed=0, n_caption=8, n_instruct=8, n_eval=max(50, n // 2))
    if not (ckpt / "model.safetensors").is_file():
        subprocess.run(
            [str(Path(sys.executable).parent / "convllava"), "init", "--preset", "tiny", "--output", str(ckpt)],
            check=True,
            capture_output=True,
        )
    rows = []
    for name in ("open", "pope"):
        rows += [json.loads(line) for line in (data / "eval" / f"{name}.jsonl").read_text().splitlines()]
    questions = WORK / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"id": r["id"], "question": r["question"], "image": r["image"]}) + "\n" for r in rows[:n])
    )
    return data, ckpt, questions


def plain_loop(ckpt: Path, data: Path, questions: Path, max_new_tokens: int) -> tuple[float, int]:
    import torch

    from convllava.checkpoint import load_model
    from convllava.image_processing import load_image
    from convllava.inference import GenerationOptions, generate

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "predict.json"))
    args = parser.parse_args()
    data, ckpt, questions = prepare(args.questions)
    n = len(questions.read_text().splitlines())

    loop_s, loop_tokens = plain_loop(ckpt, data, questions, args.max_new_tokens)

    import ray

    from pipelines.predict import run_predict

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = run_predict(
        str(ckpt),
        str(questions),
        str(WORK / "answers.jsonl"),
        image_root=str(data),
        max_new_tokens=args.max_new_tokens,
        batch_size=16,
        workers=2,
    )
    predict_s = time.perf_counter() - t
    answers = [json.loads(line) for line in (WORK / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == n and all("answer" in a for a in answers), summary
    result = {
        "questions": n,
        "max_new_tokens": args.max_new_tokens,
        "plain_loop_s": loop_s,
        "plain_loop_answers_per_s": n / loop_s,
        "plain_loop_generated_tokens": loop_tokens,
        "predict_s": predict_s,
        "predict_answers_per_s": n / predict_s,
        "ray_init_s": ray_init_s,
        "speedup": (n / predict_s) / (n / loop_s),
        "load_avg": os.getloadavg(),
        "summary": summary,
    }
    print("| | seconds | answers/s |\n|---|---|---|")
    print(f"| plain loop, one `generate` per sample (2 threads) | {loop_s:.1f} | {n / loop_s:.2f} |")
    print(f"| `convllava predict` (2 actors, batches of 16) | {predict_s:.1f} | {n / predict_s:.2f} |")
    print(
        f"\nspeedup {result['speedup']:.2f}× on {n} questions, {args.max_new_tokens} new tokens; "
        f"ray.init {ray_init_s:.1f}s not counted; load average {result['load_avg'][0]:.1f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
