"""`convllava plan`: model states against DeepSpeed's own estimators, activations against real CPU runs of the tiny
and a mid-size model, the CLI contract (table, last line, exit 0 / 3 with advice), steps per epoch from the shards,
and the pre-flight logged to MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plan_harness import mid_config, plan_cli

from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM
from jobs.train.config import CONFIG_DIR, StageConfig
from jobs.train.memory import largest_layer_params, measure_activations
from jobs.train.model_states import model_states
from jobs.train.plan import GIB, plan_stage
from jobs.train.preflight import MemoryPlanError, preflight

ROOT = Path(__file__).resolve().parents[2]
EVERYTHING = [
    "vision.stem",
    "vision.stage1",
    "vision.stage2",
    "vision.stage3",
    "vision.stage4",
    "vision.stage5",
    "projector",
    "llm",
]
LAST = re.compile(r"^per-GPU peak: (\d+\.\d\d) GiB of (\d+\.\d\d) GiB$")


def _stage(**changes) -> StageConfig:
    base = StageConfig.from_yaml(CONFIG_DIR / "stage2.yaml", ["preset=tiny", "data=/nonexistent/shards"])
    return base.replace(**changes)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_are_deepspeeds_estimates_when_everything_trains(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    torch.manual_seed(0)
    model = ConvLlavaForCausalLM(ConvLlavaConfig.from_preset("tiny"))
    total, largest = model_to_params(model)  # DeepSpeed's own count of the real model
    assert largest_layer_params(model) == largest
    config = _stage(trainable=EVERYTHING, workers=gpus, global_batch_size=8 * gpus, use_gpu=True)

    def states(deepspeed: str) -> tuple[dict[str, int], dict[str, int]]:
        ds = config.replace(deepspeed=deepspeed).deepspeed_config()
        return model_states(config.replace(deepspeed=deepspeed), total, total, largest, ds)

    gpu, host = states("zero2")
    _, expected = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    assert not host and abs(gpu["weights"] + gpu["gradients"] + gpu["optimizer states"] - expected) <= 2
    gpu, host = states("zero3")
    _, expected, gathered = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus, cpu_offload=False
    )
    assert gpu["gathered layer"] == gathered and not host
    assert abs(sum(v for k, v in gpu.items() if k != "comm buckets") - expected) <= 3
    gpu, host = states("zero3_offload")
    cpu_node, expected, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus)
    assert sum(v for k, v in gpu.items() if k != "comm buckets") == expected == 4 * largest
    # The estimator is per node with a 1.5 buffer factor; ours per worker, each part rounded down to a byte.
    assert 0 <= cpu_node - sum(host.values()) * gpus * 1.5 <= 3 * gpus * 1.5
    assert gpu["comm buckets"] == 2 * (50_000_000 + 50_000_000)  # reduce + prefetch bucket elements, bf16


def test_frozen_parts_carry_no_gradients_or_optimizer_states():
    config = _stage(trainable=["projector"], workers=4, global_batch_size=32, use_gpu=False, deepspeed="zero2")
    gpu, _ = model_states(config, 1000, 100, 10, config.deepspeed_config())
    assert gpu == {
        "weights": 4000,
        "gradients": 8 * 100 // 4,
        "optimizer states": 12 * 100 // 4,
        "comm buckets": 4 * (50_000_000 + 50_000_000),
    }


def _real_activations(config: ConvLlavaConfig, trainable, b, t, size, ckpt) -> dict[str, int]:
    spec = dict(
        config=config.to_dict(),
        trainable=list(trainable),
        micro_batch_size=b,
        seq_len=t,
        image_size=list(size) if size else None,
        gradient_checkpointing=ckpt,
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "activation_probe.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("name", "micro", "seq_len", "trainable", "ckpt"),
    [
        ("tiny", 8, 1024, ["vision.stage5", "projector"], False),  # stage 1: the frozen LM still keeps activations
        ("tiny", 8, 1024, ["vision.stage3", "vision.stage4", "vision.stage5", "projector", "llm"], True),
        ("mid", 2, 512, ["vision.stage5", "projector"], True),
        ("mid", 2, 512, ["vision.stage3", "vision.stage4", "vision.stage5", "projector", "llm"], False),
    ],
)
def test_measured_activations_match_a_real_cpu_run(name, micro, seq_len, trainable, ckpt):
    """The fake-tensor measurement against the resident memory of the same micro-batch run for real (fp32, CPU
    sdpa, whose fused kernel keeps a log-sum-exp per row as the GPU kernels do), within 5% + 16 MiB."""
    config = ConvLlavaConfig.from_preset("tiny") if name == "tiny" else mid_config()
    fake = measure_activations(
        config,
        trainable,
        micro_batch_size=micro,
        seq_len=seq_len,
        image_size=(256, 256),
        dtype=torch.float32,
        gradient_checkpointing=ckpt,
    )
    real = _real_activations(config, trainable, micro, seq_len, (256, 256), ckpt)
    for key in ("forward_bytes", "peak_bytes"):
        assert abs(getattr(fake, key) - real[key]) <= 0.05 * real[key] + 16 * 2**20, (key, getattr(fake, key), real)


def test_checkpointing_keeps_less_and_frozen_towers_keep_nothing():
    config = mid_config()
    kw = dict(micro_batch_size=2, seq_len=512, image_size=(256, 256), dtype=torch.float32)
    full = measure_activations(config, ["llm"], gradient_checkpointing=False, **kw)
    ckpt = measure_activations(config, ["llm"], gradient_checkpointing=True, **kw)
    assert ckpt.forward_bytes < full.forward_bytes / 2 and ckpt.peak_bytes < full.peak_bytes
    # Only the LM trains: the frozen tower's activations are not kept, so adding it to the trainable set adds more.
    tower = measure_activations(config, ["llm", "vision.stage1", "vision.stem"], gradient_checkpointing=False, **kw)
    assert tower.forward_bytes > full.forward_bytes
    eager = measure_activations(config, ["llm"], gradient_checkpointing=False, attention="eager", **kw)
    # The eager path keeps at least the softmax's 512×512 fp32 weights of each head, layer and sequence.
    assert eager.forward_bytes - full.forward_bytes >= 6 * 2 * 12 * 512 * 512 * 4 / 2
    with pytest.raises(ValueError, match="seq_len 16 must exceed the image's 16 visual tokens"):
        measure_activations(config, ["llm"], gradient_checkpointing=False, **{**kw, "seq_len": 16})


def test_plan_cli_refuses_with_advice_and_exit_3():
    """Memory for all but half the activations: halving the micro-batch (the largest smaller one that keeps the
    accumulation whole) or offloading would bring it under."""
    config_path = CONFIG_DIR / "stage2.yaml"
    overrides = ["preset=tiny", "data=/nonexistent/shards"]
    plan = plan_stage(StageConfig.from_yaml(config_path, overrides), gpu_memory_gib=2, seq_len=1024)
    memory = (plan.peak_bytes() - plan.activations[True].peak_bytes / 2) / GIB  # the reserve stays 2 GiB there
    code, out = plan_cli("--config", str(config_path), "--gpu-memory", f"{memory:.4f}", "--seq-len", "1024", *overrides)
    assert code == 3
    assert "does not fit; change one of:" in out and LAST.match(out.strip().splitlines()[-1])
    # Stage 2 already checkpoints and runs ZeRO-3: the advice is the micro-batch and offload.
    advice = out.split("change one of:")[1]
    assert "zero3_offload" in advice and "gradient_checkpointing" not in advice
    advised = int(re.search(r"micro-batch: micro_batch_size=(\d+) \(", advice).group(1))
    assert advised < 8 and 256 % (advised * 8) == 0
    # What it advises fits when applied, and the micro-batch just above it (whole accumulation) does not.
    code, out = plan_cli(
        "--config",
        str(config_path),
        "--gpu-memory",
        f"{memory:.4f}",
        "--seq-len",
        "1024",
        f"micro_batch_size={advised}",
        *overrides,
    )
    assert code == 0 and "does not fit" not in out
    above = min(m for m in (1, 2, 4, 8) if m > advised)
    code, _ = plan_cli(
        "--config",
        str(config_path),
        "--gpu-memory",
        f"{memory:.4f}",
        "--seq-len",
        "1024",
        f"micro_batch_size={above}",
        *overrides,
    )
    assert code == 3


def test_advice_names_gradient_checkpointing_when_it_is_enough():
    config = _stage(gradient_checkpointing=False, micro_batch_size=8, workers=8)
    first = plan_stage(config, gpu_memory_gib=2, seq_len=1024)  # the reserve is 2 GiB below 40 GiB of memory
    between = (first.peak_bytes(True) + first.peak_bytes(False)) / 2 / GIB
    plan = plan_stage(config, gpu_memory_gib=between, seq_len=1024)
    assert not plan.fits and plan.advice[0].startswith("gradient checkpointing: gradient_checkpointing=true")
    assert plan_stage(config.replace(gradient_checkpointing=True), gpu_memory_gib=between, seq_len=1024).fits


def test_the_paper_stages_at_1536_fit_8_80gb_gpus_with_their_configs():
    """The shipped stage1-3 YAMLs with the 1536 preset, on 8 × 80 GB: they fit (the paper trained them on
    8 A800s), and stage 2 would not without gradient checkpointing."""
    peaks = {}
    for stage in (1, 2, 3):
        config = StageConfig.from_yaml(CONFIG_DIR / f"stage{stage}.yaml", ["preset=convllava-1536"])
        plan = plan_stage(config, gpu_memory_gib=80, assumed=(2048, (1536, 1536)))
        assert plan.fits, plan.format()
        assert plan.total_params == 7_436_945_600
        peaks[stage] = plan
    assert peaks[1].trainable_params == 502_302_720 and peaks[1].model_states["weights"] == 2 * 7_436_945_600
    assert peaks[2].peak_bytes(False) > 80 * GIB > peaks[2].peak_bytes(True)


def test_plan_reads_the_architecture_of_an_s3_init_from(s3_bucket, tmp_path):
    from convllava.io.storage import upload_dir
    from convllava.modeling.checkpoint import save_checkpoint
    from convllava.processing.processor import ConvLlavaProcessor

    config = ConvLlavaConfig.from_preset("tiny")
    ckpt = save_checkpoint(ConvLlavaForCausalLM(config), ConvLlavaProcessor.for_model(config, "tiny"), tmp_path / "c")
    uri = f"s3://{s3_bucket}/ckpt"
    upload_dir(ckpt, uri)
    stage = _stage(init_from=uri, preset=None, workers=2, global_batch_size=16)
    plan = plan_stage(stage, gpu_memory_gib=8, seq_len=512)
    assert plan.total_params == sum(p.numel() for p in ConvLlavaForCausalLM(config).parameters())
    with pytest.raises(FileNotFoundError, match=r"s3://.*/nothing/config.json: cannot be read"):
        plan_stage(stage.replace(init_from=f"s3://{s3_bucket}/nothing"), gpu_memory_gib=8, seq_len=512)


def test_preflight_logs_the_plan_and_refuses_a_stage_that_does_not_fit(tmp_path, monkeypatch):
    from jobs.tracking.runs import client, start_run

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(tracking, "plan", "stage2")
    config = _stage()
    monkeypatch.setenv("CONVLLAVA_GPU_MEMORY_GIB", "0.05")
    with pytest.raises(MemoryPlanError, match=r"stage stage2 does not fit its GPUs:(.|\n)*offload"):
        preflight(config, tracking, run_id, assumed=(1024, (256, 256)))
    run = client(tracking).get_run(run_id)
    assert run.data.params["plan/fits"] == "False" and run.data.params["plan/zero_stage"] == "3"
    assert run.data.metrics["plan/per_gpu_peak_gib"] > 0.05
    text = Path(client(tracking).download_artifacts(run_id, "plan.txt", str(tmp_path))).read_text()
    assert text.strip().splitlines()[-1].endswith("GiB of 0.05 GiB")
    monkeypatch.setenv("CONVLLAVA_GPU_MEMORY_GIB", "80")
    plan = preflight(config, assumed=(1024, (256, 256)))
    assert plan.fits and plan.device_memory == 80 * GIB


def test_a_handed_plan_is_logged_and_checked_not_made_again(tmp_path, monkeypatch):
    """A pipeline's preflight plans each stage once and hands the plan to the stage: `preflight(plan=...)` logs it
    into the stage run and refuses it when it does not fit, without planning again. A stage run that a resumed
    pipeline reopens keeps the plan params it has (MLflow refuses a changed param) and gets the new plan's text."""
    import jobs.train.preflight as preflight_module
    from jobs.tracking.runs import client, start_run

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _stage()
    first = plan_stage(config, gpu_memory_gib=80, assumed=(1024, (256, 256)))  # before the shards exist
    again = plan_stage(config, gpu_memory_gib=80, assumed=(512, (128, 128)))  # a resumed pipeline's, other shapes
    tight = plan_stage(config, gpu_memory_gib=0.05, assumed=(1024, (256, 256)))

    def no_second_plan(*args, **kwargs):
        raise AssertionError("the stage was planned again")

    monkeypatch.setattr(preflight_module, "plan_stage", no_second_plan)
    run_id = start_run(tracking, "plan", "stage2")
    assert preflight(config, tracking, run_id, plan=first) is first
    c = client(tracking)
    assert c.get_run(run_id).data.params["plan/seq_len"] == "1024"
    assert preflight(config, tracking, run_id, plan=again) is again  # the reopened run: no MlflowException
    assert c.get_run(run_id).data.params["plan/seq_len"] == "1024"
    text = Path(c.download_artifacts(run_id, "plan.txt", str(tmp_path))).read_text()
    assert "512 tokens" in text and "1024 tokens" not in text
    with pytest.raises(MemoryPlanError, match="stage stage2 does not fit its GPUs"):
        preflight(config, plan=tight)
