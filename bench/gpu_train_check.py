"""The paper-scale GPU path, end to end: the real `run_stage` (Ray Train, DeepSpeed, NCCL, bf16, gradient
checkpointing, flash-attn if it imports else sdpa) for a few steps of each stage on generated data, one stage
resumed from its checkpoint, and what each stage measured next to what `convllava plan` predicted.

    python bench/gpu_train_check.py --out bench/results/gpu_train_check.json           # one H100/H200-class GPU
    python bench/gpu_train_check.py --tiny --out /tmp/check.json                        # CPU, tiny preset (tests)

GPU: the convllava-768 tower with the Vicuna-7B-shaped LM (random init), one worker; stage 1 under ZeRO-2, stages
2-3 (the whole LM trains) under ZeRO-3 with CPU offload, since one GPU cannot hold 7B of AdamW states.
Per stage it writes peak memory, step time, tokens/s, visual tokens/s and model-FLOPs utilisation: 6 FLOPs per LM
parameter per token plus the ConvNeXt tower's forward FLOPs (counted by torch's FlopCounterMode on the meta
device) ×3 for forward and backward, against the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def tower_forward_flops(model_config, resolution: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from convllava.modeling.model import ConvLlavaForCausalLM

    with torch.device("meta"):
        model = ConvLlavaForCausalLM(model_config)
        pixels = torch.zeros(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        model.get_image_features(pixels)
    return counter.get_total_flops()


def vicuna_shaped_tokenizer(directory: Path, image_token_id: int = 32000) -> Path:
    """The shipped tiny byte-level BPE tokenizer with its ids laid out as a Vicuna-7B ConvLLaVA expects them: the
    text vocabulary below 32000 and `<image>` at 32000 (the paper presets' image_token_id), so the convllava-768
    preset accepts it without a hub download. The ids in between are reserved tokens that never occur in text."""
    from convllava.processing.tokenizer import TINY_TOKENIZER_DIR

    spec = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {
        ("<reserved_image>" if k == "<image>" else k): v for k, v in spec["model"]["vocab"].items()
    }
    added = [t for t in spec["added_tokens"] if t["content"] != "<image>"]
    image = next(t for t in spec["added_tokens"] if t["content"] == "<image>")
    taken = {t["id"] for t in added} | set(spec["model"]["vocab"].values())
    # the reserved id where <image> was, and the rest up to image_token_id, as special tokens nobody types
    fill = [{**image, "id": i, "content": f"<reserved_{i}>"} for i in range(image_token_id) if i not in taken]
    spec["added_tokens"] = sorted([*added, *fill, {**image, "id": image_token_id}], key=lambda t: t["id"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    (directory / "tokenizer_config.json").write_text((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny preset on CPU workers (the test suite's run)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer directory; default: tiny on CPU, the tiny one with Vicuna's ids (<image> = 32000) on GPU",
    )
    args = parser.parse_args()

    from jobs.train.config import CONFIG_DIR, StageConfig
    from jobs.train.driver import run_stage
    from jobs.train.plan import plan_json, plan_stage
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.demo.data import generate_demo_data
    from pipelines.preprocess import run_preprocess

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-train-check-"))
    if args.tokenizer is None:
        args.tokenizer = "tiny" if args.tiny else str(vicuna_shaped_tokenizer(work / "tokenizer"))
    resolution = 256 if args.tiny else 768
    generate_demo_data(work / "data", seed=0, n_caption=64, n_instruct=64, n_eval=8)
    run_preprocess(
        Mixture.from_yaml(work / "data" / "mixture.yaml"),
        PreprocessConfig(resolution=resolution, mode="bucket" if args.tiny else "square", tokenizer=args.tokenizer),
        str(work / "shards"),
    )
    gpu = not args.tiny
    common = [
        f"data={work / 'shards'}",
        f"tokenizer={args.tokenizer}",
        f"max_steps={args.steps}",
        "workers=1",
        f"use_gpu={str(gpu).lower()}",
        "checkpoint_every=1",
        "keep_last=2",
        "micro_batch_size=2",
        "global_batch_size=4",
        "gradient_checkpointing=true",
    ]
    preset = "tiny" if args.tiny else "convllava-768"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    results: dict = {"device": device, "preset": preset, "steps": args.steps, "stages": {}}
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    init = None
    for stage in (1, 2, 3):
        yaml = CONFIG_DIR / ("tiny" if args.tiny else "") / f"stage{stage}.yaml"
        extra = [f"init_from={init}"] if init else [f"preset={preset}"]
        if not args.tiny:
            extra += [
                "attn_implementation=flash_attention_2",
                "deepspeed=" + ("zero2" if stage == 1 else "zero3_offload"),
            ]
        config = StageConfig.from_yaml(yaml, common + extra)
        plan = plan_stage(config)
        start = time.perf_counter()
        out = run_stage(config, str(work / "runs"), tracking_uri=tracking, run_name=f"check-stage{stage}")
        wall = time.perf_counter() - start
        m = out.metrics
        model_config = plan.model_config
        lm_params = next(g[2] for g in plan.groups if g[0] == "llm")
        tower = tower_forward_flops(model_config, resolution)
        images_per_s = m["train/samples_per_s"]  # one image per sample in this data (text-only rows run a blank)
        flops_per_s = 6 * lm_params * m["train/tokens_per_s"] + 3 * tower * images_per_s
        results["stages"][f"stage{stage}"] = {
            "measured": {
                "peak_memory_gib": m["train/peak_memory_gib"],
                "step_time_s": m["train/step_time_s"],
                "tokens_per_s": m["train/tokens_per_s"],
                "visual_tokens_per_s": m["train/visual_tokens_per_s"],
                "model_flops_per_s": flops_per_s,
                "mfu": flops_per_s / peak if peak else None,
                "loss": m["train/loss"],
                "steps": out.steps,
                "wall_s": wall,
            },
            "plan": plan_json(plan),
            "attn_implementation": config.attn_implementation,
        }
        init = out.model_uri
        if stage == 1:  # resume: the same config and run name restart from the latest checkpoint, not from step 0
            start = time.perf_counter()
            resumed = run_stage(config, str(work / "runs"), tracking_uri=tracking, run_name="check-stage1")
            results["resume"] = {
                "steps_before": out.steps,
                "steps_after": resumed.steps,
                "checkpoint": resumed.checkpoint_uri,
                "wall_s": time.perf_counter() - start,
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
