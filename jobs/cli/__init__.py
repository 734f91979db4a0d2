"""`convllava` command line: one entry point for the whole platform (model library, pipelines, jobs).

It lives in the top layer so that imports point one way: jobs → pipelines → convllava.

Each subcommand's arguments mirror the signature of the function it calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from jobs.cli import commands

# No hub is ever contacted: tokenizers and models come from local paths or s3:// only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Loading and saving bars (transformers, huggingface_hub) in every worker's output; the progress view says more.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# MLflow prints "View run ... at: URL" and "View experiment at: URL" for every run ended on a tracking server (twelve
# lines a pipeline); the summary prints the experiment's link once.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def build_parser() -> argparse.ArgumentParser:
    # Choices and defaults come from the constants the configs check against (light modules: no torch here).
    from convllava.processing.buckets import MODES
    from convllava.processing.templates import TEMPLATES, TOKENIZATIONS
    from jobs.train.config import STAGES
    from pipelines.demo.data import DEFAULTS as DEMO_DATA

    parser = argparse.ArgumentParser(prog="convllava", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="subcommand", required=True)

    p = sub.add_parser("chat", help="answer questions about an image (one shot, or interactive on stdin)")
    p.add_argument("--model", required=True, help="checkpoint directory or s3:// prefix (ours or the released layout)")
    p.add_argument("--image", help="image file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("question", nargs="*", help="the question; omit for an interactive session")
    p.set_defaults(func=commands.cmd_chat)

    p = sub.add_parser("convert", help="convert a released ConvLLaVA (LLaVA-layout) checkpoint to our format")
    p.add_argument("--llava", required=True, help="LLM directory (local or s3://) with config.json and weights")
    p.add_argument("--vision-tower", help="HF ConvNextModel directory (default: config.json's mm_vision_tower)")
    p.add_argument("--resolution", type=int, help="input resolution (default: the tower config's image_size)")
    p.add_argument("--image-mode", choices=list(MODES))
    p.add_argument("--template", default="vicuna_v1", help=f"conversation template ({', '.join(TEMPLATES)})")
    p.add_argument("--text-model-type", help="LM model_type when config.json's architectures is not LLaVA's")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="dtype of the written weights (tower, projector and LM alike). 'auto' (default) keeps the dtype "
        "config.json says the weights are stored in (torch_dtype: float16 for the released checkpoints), float32 if "
        "it names none. One copy of the weights is held in memory either way",
    )
    p.add_argument("--output", required=True)
    p.set_defaults(func=commands.cmd_convert)

    p = sub.add_parser("init", help="write a randomly initialised model of a preset (with its processor)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default="tiny", help="'tiny', a local tokenizer directory or s3:// prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.set_defaults(func=commands.cmd_init)

    p = sub.add_parser("info", help="parameter counts and visual tokens of a preset (meta device, no memory)")
    p.add_argument("--preset", default="convllava-1536")
    p.set_defaults(func=commands.cmd_info)

    p = sub.add_parser("preprocess", help="LLaVA-style annotations + images → resolution-bucketed Parquet shards")
    p.add_argument("--annotations", action="append", help="LLaVA JSON list or JSONL (local or s3://); repeatable")
    p.add_argument("--image-root", help="folder (or s3:// prefix) the records' image paths are relative to")
    p.add_argument("--mixture", help="data-mixture YAML naming several sources (instead of --annotations)")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--config", help="preprocess config YAML (keys of PreprocessConfig; unknown keys are refused)")
    p.add_argument(
        "--resolution", type=int, help="token budget (R/64)² per image: 768, 1024, 1536 or any multiple of 64"
    )
    p.add_argument("--mode", choices=list(MODES))
    p.add_argument("--tokenizer", help="'tiny', a tokenizer folder or s3:// prefix")
    p.add_argument("--template", help=f"conversation template ({', '.join(TEMPLATES)})")
    p.add_argument(
        "--tokenization",
        choices=list(TOKENIZATIONS),
        help="one_pass (ours) or llava (tokenizer_image_token, as the released checkpoints were trained)",
    )
    p.add_argument("--max-length", type=int)
    p.add_argument("--workers", type=int, help="Ray Data actors (default: Ray's CPUs / --threads)")
    p.add_argument("--threads", type=int, help="samples each actor works on at once (default: CPUs / workers, <= 8)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local instance)")
    p.set_defaults(func=commands.cmd_preprocess)

    p = sub.add_parser("demo-data", help="generate the seeded demo data set (shapes scenes + real photos)")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=DEMO_DATA.seed)
    p.add_argument("--captions", type=int, default=DEMO_DATA.captions)
    p.add_argument("--instruct", type=int, default=DEMO_DATA.instruct)
    p.add_argument("--eval", type=int, default=DEMO_DATA.eval)
    p.add_argument("--no-photos", action="store_true", help="leave out the real photos from scikit-image")
    p.set_defaults(func=commands.cmd_demo_data)

    p = sub.add_parser("train", help="run one training stage (Ray Train + DeepSpeed)")
    p.add_argument("--config", required=True, help="stage YAML, e.g. jobs/configs/tiny/stage1.yaml")
    p.add_argument("--stage", type=int, choices=list(STAGES))
    p.add_argument("--init-from", help="checkpoint to start from (local or s3://), e.g. the previous stage's model")
    p.add_argument("--storage", help="checkpoint storage (folder or s3://); default WORKDIR/runs")
    p.add_argument("--workdir", default="work", help="holds mlflow.db and runs/ by default")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///WORKDIR/mlflow.db)")
    p.add_argument("--run-name", help="Ray Train run name (same name + storage resumes)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local instance)")
    p.add_argument(
        "--local",
        action="store_true",
        help="without Ray or MLflow: this process, or the processes "
        "torchrun started (metrics to STORAGE/RUN_NAME/metrics.jsonl)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of the stage config (values are YAML)")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("plan", help="memory per GPU and steps per epoch of a stage, before launch (exit 3: no fit)")
    p.add_argument("--config", required=True, help="stage YAML, e.g. jobs/configs/stage2.yaml")
    p.add_argument("--gpus", type=int, help="number of GPUs (the stage's workers; default: the config's)")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: the visible GPU's, else 80)")
    p.add_argument("--seq-len", type=int, help="plan for this sequence length instead of the shards' longest")
    p.add_argument("--image-size", help="HxW: plan for this image size instead of the shards' largest bucket")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the stage config, e.g. preset=convllava-1536")
    p.set_defaults(func=commands.cmd_plan)

    p = sub.add_parser("predict", help="batch inference: questions JSONL → answers JSONL")
    p.add_argument("--model", required=True, help="checkpoint (local or s3://)")
    p.add_argument("--input", required=True, help="JSONL with id, question and optional image per line")
    p.add_argument("--output", required=True, help="answers JSONL")
    p.add_argument("--image-root", help="folder the images are relative to (default: the input's folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--workers",
        type=int,
        help="model replicas on Ray Data (actors); 0: in this process. Default: in this process on a machine alone "
        "(one node, at most one GPU), else one per GPU (per CPU on a cluster without GPUs)",
    )
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=commands.cmd_predict)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark suite")
    p.add_argument("--model", required=True, help="checkpoint (local or s3://)")
    p.add_argument("--suite", required=True, help="suite name (e.g. demo) or a suite YAML")
    p.add_argument("--output", required=True, help="folder for metrics.json, predictions.jsonl, report.md")
    p.add_argument("--tracking-uri", help="MLflow tracking URI to log into (with --run-id)")
    p.add_argument("--run-id", help="MLflow run to log metrics and artifacts into")
    p.add_argument("--limit", type=int, help="at most this many samples per benchmark")
    p.add_argument("--data-root", help="where the suite's files are (overrides the suite's root)")
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("pipeline", help="the DAG: preprocess → the config's stages in order → eval, tracked in MLflow")
    p.add_argument("action", choices=["run", "status"])
    p.add_argument("--config", required=True, help="pipeline YAML, e.g. jobs/configs/demo.yaml")
    p.add_argument("--workdir", default="work/pipeline")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///WORKDIR/mlflow.db)")
    p.add_argument(
        "--from",
        dest="from_node",
        metavar="NODE",
        help="re-run from this node on purpose: preprocess, a stage of the config (e.g. stage2), or eval",
    )
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=commands.cmd_pipeline)

    p = sub.add_parser("retrain", help="scheduled retraining: re-run the pipeline only when the raw data changed")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", default="work/pipeline")
    p.add_argument("--tracking-uri")
    p.add_argument("--address")
    p.set_defaults(func=commands.cmd_retrain)

    p = sub.add_parser("submit", help="submit a convllava command as a Ray job to a cluster")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--working-dir", default=".", help="shipped to the cluster as the job's working dir")
    p.add_argument("--wait", action="store_true", help="print the job's log as it runs; exit 1 unless the job succeeds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the convllava arguments")
    p.set_defaults(func=commands.cmd_submit)

    p = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", required=True)
    p.set_defaults(func=commands.cmd_jobs)

    p = sub.add_parser("demo", help="the main job: the whole pipeline on the embedded local default (demo.yaml)")
    p.add_argument("--workdir", default="work/demo")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///WORKDIR/mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local instance)")
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser(
        "quickstart",
        help="one minute: shards of real photos, `train --local` with jobs/configs/quickstart.yaml, ask about them",
    )
    p.add_argument("--workdir", default="work/quickstart", help="holds data/, shards/ and runs/")
    p.add_argument("overrides", nargs="*", help="key=value overrides of jobs/configs/quickstart.yaml (values are YAML)")
    p.set_defaults(func=commands.cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, OSError, KeyError) as e:
        # Errors we raise name the file/field/sample; print them plainly instead of a traceback. A system error that
        # names no file ("[Errno 2] No such file or directory") says nothing of where: its traceback does.
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            traceback.print_exc()
        print(f"convllava {args.subcommand}: error: {e}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
