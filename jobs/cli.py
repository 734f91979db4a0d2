"""`convllava` command line: one entry point for the whole platform (model library, pipelines, jobs).

It lives in the top layer so that imports point one way: jobs → pipelines → convllava.

Each subcommand's arguments mirror the signature of the function it calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"

# No hub is ever contacted: tokenizers and models come from local paths or s3:// only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Loading and saving bars (transformers, huggingface_hub) in every worker's output; the progress view says more.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _cmd_chat(args: argparse.Namespace) -> int:
    from convllava.checkpoint import load_model
    from convllava.image_processing import load_image
    from convllava.inference import GenerationOptions, chat_reply

    model, processor = load_model(args.model)
    image = load_image(args.image) if args.image else None
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                temperature=args.temperature or 1.0)  # fmt: skip
    if args.question:
        messages = [{"role": "user", "content": " ".join(args.question)}]
        print(chat_reply(model, processor, messages, image, options))
        return 0
    messages: list[dict[str, str]] = []
    print("Interactive chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = chat_reply(model, processor, messages, image, options)
        messages.append({"role": "assistant", "content": reply})
        print(f"ASSISTANT: {reply}", flush=True)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from convllava.checkpoint import CheckpointError, from_llava_checkpoint, save_checkpoint
    from convllava.storage import is_s3

    # Writing into the source would replace its config.json, and the loaded weights may be the memory-mapped pages
    # of its files: overwriting one of those while it is mapped corrupts the model being written.
    if not is_s3(args.llava) and not is_s3(args.output) and Path(args.output).resolve() == Path(args.llava).resolve():
        raise CheckpointError(f"--output {args.output} is the --llava directory; write the conversion to a new one")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, processor = from_llava_checkpoint(
        args.llava, vision_tower=args.vision_tower, resolution=args.resolution, image_mode=args.image_mode,
        template=args.template, text_model_type=args.text_model_type, dtype=dtype,
    )  # fmt: skip
    if processor is None:
        raise CheckpointError(f"{args.llava}: no tokenizer files; a converted checkpoint needs its tokenizer")
    save_checkpoint(model, processor, args.output)
    counts = model.parameter_counts()
    print(f"wrote {args.output}: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    import torch

    from convllava.checkpoint import save_checkpoint
    from convllava.config import ConvLlavaConfig
    from convllava.modeling import ConvLlavaForCausalLM
    from convllava.processor import ConvLlavaProcessor

    torch.manual_seed(args.seed)
    config = ConvLlavaConfig.from_preset(args.preset)
    model = ConvLlavaForCausalLM(config)
    save_checkpoint(model, ConvLlavaProcessor.for_model(config, args.tokenizer), args.output)
    print(f"wrote a randomly initialised {args.preset} model to {args.output}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from convllava.buckets import num_visual_tokens
    from convllava.config import ConvLlavaConfig
    from convllava.modeling import ConvLlavaForCausalLM

    config = ConvLlavaConfig.from_preset(args.preset)
    with torch.device("meta"):  # shapes only: a 7B preset allocates nothing
        model = ConvLlavaForCausalLM(config)
    for name, count in model.parameter_counts().items():
        print(f"{name:16s} {count:>15,d}")
    r = config.image_resolution
    print(f"{'visual tokens':16s} {num_visual_tokens(r, r):>15,d}  at {r}x{r}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, Mixture, PreprocessConfig
    from pipelines.preprocess import QuarantineLimitExceeded, run_preprocess

    if args.mixture and (args.annotations or args.image_root):
        raise ConfigError("use either --mixture or --annotations with --image-root, not both")
    if args.mixture:
        mixture = Mixture.from_yaml(args.mixture)
    elif args.annotations and args.image_root:
        mixture = Mixture.from_files(args.annotations, args.image_root)
    else:
        raise ConfigError("give --annotations FILE (repeatable) with --image-root DIR, or --mixture YAML")
    overrides = dict(resolution=args.resolution, mode=args.mode, tokenizer=args.tokenizer, template=args.template,
                     tokenization=args.tokenization, max_length=args.max_length, workers=args.workers)  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        config = PreprocessConfig.from_yaml(args.config, **overrides)
    elif args.mixture:
        config = PreprocessConfig.from_yaml(args.mixture, **overrides) if _has_preprocess(args.mixture) else (
            PreprocessConfig.from_dict(overrides))  # fmt: skip
    else:
        config = PreprocessConfig.from_dict(overrides)
    try:
        run_preprocess(mixture, config, args.output, address=args.address)
    except QuarantineLimitExceeded as e:
        print(f"convllava preprocess: failed: {e}", file=sys.stderr)
        return 1
    return 0


def _has_preprocess(path: str) -> bool:
    import yaml

    with open(path) as f:
        return "preprocess" in (yaml.safe_load(f) or {})


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from pipelines.demo_data import generate_demo_data

    summary = generate_demo_data(args.output, seed=args.seed, n_caption=args.captions, n_instruct=args.instruct,
                                 n_eval=args.eval, with_photos=not args.no_photos)  # fmt: skip
    print(summary)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from jobs.stage_config import StageConfig

    overrides = list(args.overrides)
    if args.init_from:
        overrides.append(f"init_from={args.init_from}")
    if args.stage is not None:
        overrides.append(f"stage={args.stage}")
    config = StageConfig.from_yaml(args.config, overrides)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    storage = args.storage or str(Path(args.workdir) / "runs")
    if args.local:
        from jobs.local import run_local

        local = run_local(config, storage, run_name=args.run_name)
        if local.resumed_from:
            print(f"{config.name}: resumed at step {local.resumed_from}")
        print(f"{config.name}: {local.steps} steps, final loss {local.metrics.get('train/loss', float('nan')):.4f}")
        print(f"checkpoint: {local.checkpoint_uri}")
        print(f"model:      {local.model_uri}")
        return 0
    from jobs.tracking import default_tracking_uri
    from jobs.train import run_stage

    tracking = args.tracking_uri or default_tracking_uri(args.workdir)
    with _progress(1) as progress, progress.node(1, config.name):
        result = run_stage(config, storage, tracking_uri=tracking, run_name=args.run_name, address=args.address,
                           on_step=progress.step)  # fmt: skip
        loss = result.metrics.get("train/loss")
        progress.finished("ran", time.time() - progress.node_start, None if loss is None else ("train/loss", loss))
    print(f"{config.name}: {result.steps} steps, final loss {result.metrics.get('train/loss', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"model:      {result.model_uri}")
    return 0


def _progress(total_nodes: int | None = None):
    """The progress view for this terminal or log (`total_nodes`: the pipeline's by default)."""
    from jobs.pipeline_config import NODES
    from jobs.progress import progress_for

    return progress_for(total_nodes or len(NODES))


def _cmd_plan(args: argparse.Namespace) -> int:
    from jobs.plan import DOES_NOT_FIT, FITS, plan_stage
    from jobs.stage_config import StageConfig

    overrides = list(args.overrides) + ([f"workers={args.gpus}"] if args.gpus is not None else [])
    config = StageConfig.from_yaml(args.config, overrides)
    image_size = None
    if args.image_size:
        h, _, w = args.image_size.partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise ValueError(f"--image-size: give HxW in pixels, e.g. 1536x1536, got {args.image_size!r}")
        image_size = (int(h), int(w))
    plan = plan_stage(config, gpu_memory_gib=args.gpu_memory, seq_len=args.seq_len, image_size=image_size)
    print(plan.format())
    return FITS if plan.fits else DOES_NOT_FIT


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.predict import run_predict

    summary = run_predict(args.model, args.input, args.output, image_root=args.image_root,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          workers=args.workers, address=args.address)  # fmt: skip
    print(summary)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from jobs.evaluate import run_eval

    result = run_eval(args.model, args.suite, args.output, tracking_uri=args.tracking_uri, run_id=args.run_id,
                      address=args.address, limit=args.limit, data_root=args.data_root)  # fmt: skip
    print(result.report)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from jobs.pipeline import pipeline_status, run_pipeline

    if args.action == "status":
        print(pipeline_status(args.config, workdir=args.workdir, tracking_uri=args.tracking_uri))
        return 0
    with _progress() as progress:
        result = run_pipeline(args.config, workdir=args.workdir, tracking_uri=args.tracking_uri,
                              from_node=args.from_node, address=args.address, progress=progress)  # fmt: skip
    print(result.summary)
    return 0 if result.ok else 1


def _cmd_retrain(args: argparse.Namespace) -> int:
    from jobs.retrain import run_retrain

    with _progress() as progress:
        outcome = run_retrain(args.config, workdir=args.workdir, tracking_uri=args.tracking_uri, address=args.address,
                              progress=progress)  # fmt: skip
    print(outcome.message)
    return 0 if outcome.ok else 1


def _cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import submit

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    job_id = submit(args.address, command, working_dir=args.working_dir, wait=args.wait)
    print(job_id)
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from jobs.submit import job_logs, job_status, stop_job

    fn = {"status": job_status, "logs": job_logs, "stop": stop_job}[args.action]
    print(fn(args.address, args.job_id))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from convllava.demo import run_demo

    return run_demo(args.workdir, steps=args.steps, seed=args.seed)


def _cmd_demo(args: argparse.Namespace) -> int:
    from jobs.pipeline import run_pipeline

    with _progress() as progress:
        result = run_pipeline(str(DEMO_CONFIG), workdir=args.workdir, tracking_uri=args.tracking_uri,
                              address=args.address, progress=progress)  # fmt: skip
    print(result.summary)
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convllava", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="subcommand", required=True)

    p = sub.add_parser("chat", help="answer questions about an image (one shot, or interactive on stdin)")
    p.add_argument("--model", required=True, help="checkpoint directory or s3:// prefix (ours or the released layout)")
    p.add_argument("--image", help="image file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("question", nargs="*", help="the question; omit for an interactive session")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("convert", help="convert a released ConvLLaVA (LLaVA-layout) checkpoint to our format")
    p.add_argument("--llava", required=True, help="LLM directory (local or s3://) with config.json and weights")
    p.add_argument("--vision-tower", help="HF ConvNextModel directory (default: config.json's mm_vision_tower)")
    p.add_argument("--resolution", type=int, help="input resolution (default: the tower config's image_size)")
    p.add_argument("--image-mode", choices=["square", "bucket", "short-side"])
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--text-model-type", help="LM model_type when config.json's architectures is not LLaVA's")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
        help="dtype of the written weights (tower, projector and LM alike). 'auto' (default) keeps the dtype "
        "config.json says the weights are stored in (torch_dtype: float16 for the released checkpoints), float32 if "
        "it names none. One copy of the weights is held in memory either way",
    )  # fmt: skip
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("init", help="write a randomly initialised model of a preset (with its processor)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default="tiny", help="'tiny', a local tokenizer directory or s3:// prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("info", help="parameter counts and visual tokens of a preset (meta device, no memory)")
    p.add_argument("--preset", default="convllava-1536")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("preprocess", help="LLaVA-style annotations + images → resolution-bucketed Parquet shards")
    p.add_argument("--annotations", action="append", help="LLaVA JSON list or JSONL (local or s3://); repeatable")
    p.add_argument("--image-root", help="folder (or s3:// prefix) the records' image paths are relative to")
    p.add_argument("--mixture", help="data-mixture YAML naming several sources (instead of --annotations)")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--config", help="preprocess config YAML (keys of PreprocessConfig; unknown keys are refused)")
    p.add_argument(
        "--resolution", type=int, help="token budget (R/64)² per image: 768, 1024, 1536 or any multiple of 64"
    )
    p.add_argument("--mode", choices=["bucket", "square", "short-side"])
    p.add_argument("--tokenizer", help="'tiny', a tokenizer folder or s3:// prefix")
    p.add_argument("--template", help="conversation template (vicuna_v1, plain, chatml)")
    p.add_argument(
        "--tokenization", choices=["one_pass", "llava"],
        help="one_pass (ours) or llava (tokenizer_image_token, as the released checkpoints were trained)",
    )  # fmt: skip
    p.add_argument("--max-length", type=int)
    p.add_argument("--workers", type=int, help="Ray Data actors (default: all CPUs Ray has)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local instance)")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("demo-data", help="generate the seeded demo data set (shapes scenes + real photos)")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", type=int, default=1200)
    p.add_argument("--instruct", type=int, default=1200)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--no-photos", action="store_true", help="leave out the real photos from scikit-image")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("train", help="run one training stage (Ray Train + DeepSpeed)")
    p.add_argument("--config", required=True, help="stage YAML, e.g. jobs/configs/tiny/stage1.yaml")
    p.add_argument("--stage", type=int, choices=[1, 2, 3])
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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="memory per GPU and steps per epoch of a stage, before launch (exit 3: no fit)")
    p.add_argument("--config", required=True, help="stage YAML, e.g. jobs/configs/stage2.yaml")
    p.add_argument("--gpus", type=int, help="number of GPUs (the stage's workers; default: the config's)")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: the visible GPU's, else 80)")
    p.add_argument("--seq-len", type=int, help="plan for this sequence length instead of the shards' longest")
    p.add_argument("--image-size", help="HxW: plan for this image size instead of the shards' largest bucket")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the stage config, e.g. preset=convllava-1536")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("predict", help="batch inference on Ray Data: questions JSONL → answers JSONL")
    p.add_argument("--model", required=True, help="checkpoint (local or s3://)")
    p.add_argument("--input", required=True, help="JSONL with id, question and optional image per line")
    p.add_argument("--output", required=True, help="answers JSONL")
    p.add_argument("--image-root", help="folder the images are relative to (default: the input's folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, help="model replicas (actors); default: all CPUs / GPUs")
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark suite")
    p.add_argument("--model", required=True, help="checkpoint (local or s3://)")
    p.add_argument("--suite", required=True, help="suite name (e.g. demo) or a suite YAML")
    p.add_argument("--output", required=True, help="folder for metrics.json, predictions.jsonl, report.md")
    p.add_argument("--tracking-uri", help="MLflow tracking URI to log into (with --run-id)")
    p.add_argument("--run-id", help="MLflow run to log metrics and artifacts into")
    p.add_argument("--limit", type=int, help="at most this many samples per benchmark")
    p.add_argument("--data-root", help="where the suite's files are (overrides the suite's root)")
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("pipeline", help="the DAG: preprocess → stage 1 → 2 → 3 → eval, tracked in MLflow")
    p.add_argument("action", choices=["run", "status"])
    p.add_argument("--config", required=True, help="pipeline YAML, e.g. jobs/configs/demo.yaml")
    p.add_argument("--workdir", default="work/pipeline")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///WORKDIR/mlflow.db)")
    p.add_argument(
        "--from",
        dest="from_node",
        choices=["preprocess", "stage1", "stage2", "stage3", "eval"],
        help="re-run from this node on purpose",
    )
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("retrain", help="scheduled retraining: re-run the pipeline only when the raw data changed")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", default="work/pipeline")
    p.add_argument("--tracking-uri")
    p.add_argument("--address")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("submit", help="submit a convllava command as a Ray job to a cluster")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--working-dir", default=".", help="shipped to the cluster as the job's working dir")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the convllava arguments")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", required=True)
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("demo", help="the main job: the whole pipeline on the embedded local default (demo.yaml)")
    p.add_argument("--workdir", default="work/demo")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///WORKDIR/mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local instance)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("quickstart", help="one minute: fine-tune the tiny model on real photos and ask about them")
    p.add_argument("--workdir", default="work/quickstart")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, OSError, KeyError) as e:
        # Errors we raise name the file/field/sample; print them plainly instead of a traceback.
        print(f"convllava {args.subcommand}: error: {e}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
