"""The `convllava` subcommands: each takes the parsed arguments, calls the function its arguments mirror, and
returns the exit code. Heavy imports stay inside each command, so `convllava --help` starts fast."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jobs.tracking.vocabulary import TRAIN_LOSS

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"


def cmd_chat(args: argparse.Namespace) -> int:
    from convllava.modeling.checkpoint import load_model
    from convllava.modeling.inference import GenerationOptions, chat_reply
    from convllava.processing.image_processing import load_image

    model, processor = load_model(args.model)
    image = load_image(args.image) if args.image else None
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0
    )
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


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from convllava.io.storage import is_s3
    from convllava.modeling.checkpoint import save_checkpoint
    from convllava.modeling.llava_checkpoint import from_llava_checkpoint
    from convllava.modeling.weights import CheckpointError

    # Writing into the source would replace its config.json, and the loaded weights may be the memory-mapped pages
    # of its files: overwriting one of those while it is mapped corrupts the model being written.
    if not is_s3(args.llava) and not is_s3(args.output) and Path(args.output).resolve() == Path(args.llava).resolve():
        raise CheckpointError(f"--output {args.output} is the --llava directory; write the conversion to a new one")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, processor = from_llava_checkpoint(
        args.llava,
        vision_tower=args.vision_tower,
        resolution=args.resolution,
        image_mode=args.image_mode,
        template=args.template,
        text_model_type=args.text_model_type,
        dtype=dtype,
    )
    if processor is None:
        raise CheckpointError(f"{args.llava}: no tokenizer files; a converted checkpoint needs its tokenizer")
    save_checkpoint(model, processor, args.output)
    counts = model.parameter_counts()
    print(f"wrote {args.output}: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from convllava.modeling.checkpoint import save_checkpoint
    from convllava.modeling.config import ConvLlavaConfig
    from convllava.modeling.model import ConvLlavaForCausalLM
    from convllava.processing.processor import ConvLlavaProcessor

    torch.manual_seed(args.seed)
    config = ConvLlavaConfig.from_preset(args.preset)
    model = ConvLlavaForCausalLM(config)
    save_checkpoint(model, ConvLlavaProcessor.for_model(config, args.tokenizer), args.output)
    print(f"wrote a randomly initialised {args.preset} model to {args.output}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from convllava.modeling.config import ConvLlavaConfig
    from convllava.modeling.model import ConvLlavaForCausalLM
    from convllava.processing.buckets import num_visual_tokens

    config = ConvLlavaConfig.from_preset(args.preset)
    with torch.device("meta"):  # shapes only: a 7B preset allocates nothing
        model = ConvLlavaForCausalLM(config)
    for name, count in model.parameter_counts().items():
        print(f"{name:16s} {count:>15,d}")
    r = config.image_resolution
    print(f"{'visual tokens':16s} {num_visual_tokens(r, r):>15,d}  at {r}x{r}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from convllava.io.config import ConfigLoadError
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.preprocess import QuarantineLimitExceeded, run_preprocess

    if args.mixture and (args.annotations or args.image_root):
        raise ConfigLoadError("use either --mixture or --annotations with --image-root, not both")
    if args.mixture:
        mixture = Mixture.from_yaml(args.mixture)
    elif args.annotations and args.image_root:
        mixture = Mixture.from_files(args.annotations, args.image_root)
    else:
        raise ConfigLoadError("give --annotations FILE (repeatable) with --image-root DIR, or --mixture YAML")
    overrides = dict(
        resolution=args.resolution,
        mode=args.mode,
        tokenizer=args.tokenizer,
        template=args.template,
        tokenization=args.tokenization,
        max_length=args.max_length,
        workers=args.workers,
        threads=args.threads,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        config = PreprocessConfig.from_yaml(args.config, **overrides)
    elif args.mixture:
        config = (
            PreprocessConfig.from_yaml(args.mixture, **overrides)
            if _has_preprocess(args.mixture)
            else (PreprocessConfig.from_dict(overrides))
        )
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


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipelines.demo.data import DemoDataConfig

    config = DemoDataConfig(
        seed=args.seed, captions=args.captions, instruct=args.instruct, eval=args.eval, with_photos=not args.no_photos
    )
    print(config.generate(args.output))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jobs.train.config import StageConfig

    overrides = list(args.overrides)
    if args.init_from:
        overrides.append(f"init_from={args.init_from}")
    if args.stage is not None:
        overrides.append(f"stage={args.stage}")
    config = StageConfig.from_yaml(args.config, overrides)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    storage = args.storage or str(Path(args.workdir) / "runs")
    if args.local:
        from jobs.train.local import run_local

        local = run_local(config, storage, run_name=args.run_name)
        if local.resumed_from:
            print(f"{config.name}: resumed at step {local.resumed_from}")
        print(f"{config.name}: {local.steps} steps, final loss {local.metrics.get(TRAIN_LOSS, float('nan')):.4f}")
        print(f"checkpoint: {local.checkpoint_uri}")
        print(f"model:      {local.model_uri}")
        return 0
    from jobs.tracking.runs import default_tracking_uri
    from jobs.train.driver import run_stage

    tracking = args.tracking_uri or default_tracking_uri(args.workdir)
    with _progress(1) as progress, progress.node(1, config.name):
        result = run_stage(
            config, storage, tracking_uri=tracking, run_name=args.run_name, address=args.address, on_step=progress.step
        )
        loss = result.metrics.get(TRAIN_LOSS)
        progress.finished("ran", time.time() - progress.node_start, None if loss is None else (TRAIN_LOSS, loss))
    print(f"{config.name}: {result.steps} steps, final loss {result.metrics.get(TRAIN_LOSS, float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"model:      {result.model_uri}")
    return 0


def _progress(total_nodes: int):
    """The progress view for this terminal or log."""
    from jobs.progress import progress_for

    return progress_for(total_nodes)


def _pipeline_nodes(config_path: str) -> int:
    from jobs.dag.config import PipelineConfig

    return len(PipelineConfig.from_yaml(config_path).nodes)


def cmd_plan(args: argparse.Namespace) -> int:
    from jobs.train.config import StageConfig
    from jobs.train.plan import DOES_NOT_FIT, FITS, plan_stage

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


def cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.predict import run_predict

    summary = run_predict(
        args.model,
        args.input,
        args.output,
        image_root=args.image_root,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        workers=args.workers,
        address=args.address,
    )
    print(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jobs.evaluate.suite import run_eval

    result = run_eval(
        args.model,
        args.suite,
        args.output,
        tracking_uri=args.tracking_uri,
        run_id=args.run_id,
        address=args.address,
        limit=args.limit,
        data_root=args.data_root,
    )
    print(result.report)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from jobs.dag.report import pipeline_status
    from jobs.dag.runner import run_pipeline

    if args.action == "status":
        print(pipeline_status(args.config, workdir=args.workdir, tracking_uri=args.tracking_uri))
        return 0
    with _progress(_pipeline_nodes(args.config)) as progress:
        result = run_pipeline(
            args.config,
            workdir=args.workdir,
            tracking_uri=args.tracking_uri,
            from_node=args.from_node,
            address=args.address,
            progress=progress,
        )
    print(result.summary)
    return 0 if result.ok else 1


def cmd_retrain(args: argparse.Namespace) -> int:
    from jobs.dag.retrain import run_retrain

    with _progress(_pipeline_nodes(args.config)) as progress:
        outcome = run_retrain(
            args.config, workdir=args.workdir, tracking_uri=args.tracking_uri, address=args.address, progress=progress
        )
    print(outcome.message)
    return 0 if outcome.ok else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import follow, submit

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    job_id = submit(args.address, command, working_dir=args.working_dir)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    status = follow(args.address, job_id)
    print(f"{job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from jobs.submit import job_logs, job_status, stop_job

    fn = {"status": job_status, "logs": job_logs, "stop": stop_job}[args.action]
    print(fn(args.address, args.job_id))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from jobs.quickstart import run_quickstart

    return run_quickstart(args.workdir, args.overrides)


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.dag.runner import run_pipeline

    with _progress(_pipeline_nodes(str(DEMO_CONFIG))) as progress:
        result = run_pipeline(
            str(DEMO_CONFIG),
            workdir=args.workdir,
            tracking_uri=args.tracking_uri,
            address=args.address,
            progress=progress,
        )
    print(result.summary)
    return 0 if result.ok else 1
