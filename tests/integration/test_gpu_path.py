"""The paper-scale GPU path, checked on CPU: collectives on the engine's device, the flash-attn → sdpa fallback,
ZeRO-3 construction that never holds a full copy per rank, checkpoint verification from the storage listing, and
the CPU-offload DeepSpeed config training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.train.config import CONFIG_DIR, StageConfig

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _harness(tmp_path: Path, config: StageConfig, *flags: str, port: int) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "out"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "recipe_harness.py"),
            "--config",
            str(cfg),
            "--world",
            str(config.workers),
            "--out",
            str(out),
            "--port",
            str(port),
            *flags,
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(config.workers)]


def _tiny(shards, **changes) -> StageConfig:
    base = StageConfig.from_yaml(CONFIG_DIR / "tiny" / "stage1.yaml", [f"data={shards}"])
    return base.replace(**{"max_steps": 2, **changes})


def test_every_collective_of_a_training_step_is_on_the_engines_device(shards, tmp_path):
    """Two ranks over gloo; every torch.distributed collective (the recipe's and DeepSpeed's) is spied on and
    its tensors' devices recorded. The flash-attn the config asks for is replaced by sdpa on a CPU worker."""
    ranks = _harness(tmp_path, _tiny(shards, attn_implementation="flash_attention_2"), "--spy-collectives", port=29741)
    for r in ranks:
        assert r["engine_device"] == "cpu" and r["step"] == 2 and r["attn_implementation"] == "sdpa"
        assert r["collectives"], "no collective was seen"
        wrong = [c for c in r["collectives"] if c["devices"] not in ([], [r["engine_device"]])]
        assert not wrong, wrong
        assert sum(c["op"] == "all_reduce" for c in r["collectives"]) >= 2 * 2  # loss totals + peak, each step


def test_zero3_builds_and_loads_a_partition_per_rank_never_the_full_model(shards, tmp_path):
    """A ~100M-parameter checkpoint (415 MB fp32) loaded as stage 2 does, by 2 ranks. Under ZeRO-3 each rank's peak
    anonymous memory is its half plus the one module zero.Init is making (the full tensor and its partition copy,
    `largest * (1 + 1/N)`): never the whole model, and nothing is gathered to load it (transformers' own ZeRO-3 loader
    peaked at 1.3-1.4x the full model here). Under ZeRO-2 each rank holds the whole model. Both see exactly the checkpoint's weights."""
    from plan_harness import mid_config

    from convllava.modeling.checkpoint import save_checkpoint
    from convllava.modeling.model import ConvLlavaForCausalLM
    from convllava.processing.processor import ConvLlavaProcessor
    from jobs.train.memory import largest_layer_params

    torch.manual_seed(0)
    config = mid_config()
    model = ConvLlavaForCausalLM(config)
    full = sum(p.numel() * 4 for p in model.parameters())
    largest = largest_layer_params(model) * 4  # the 32000 x 768 embedding: 24% of this model, 2% of a 7B one
    expected_sum = sum(float(p.detach().double().sum()) for p in model.parameters())
    ckpt = save_checkpoint(model, ConvLlavaProcessor.for_model(config, "tiny"), tmp_path / "mid")
    del model
    stage = _tiny(shards, init_from=str(ckpt), preset=None, trainable=["vision.stage5", "projector", "llm"])
    zero3 = _harness(tmp_path / "z3", stage.replace(deepspeed="zero3"), "--build-only", port=29743)
    zero2 = _harness(tmp_path / "z2", stage.replace(deepspeed="zero2"), "--build-only", port=29745)
    for r in zero2:  # (its weights are the memory-mapped file's pages until training writes them: not anon)
        assert not r["partitioned"] and r["local_param_bytes"] == full
        assert r["checksum"] == pytest.approx(expected_sum, rel=1e-9)
    world = stage.workers
    for r in zero3:
        assert r["partitioned"] and r["full_param_bytes"] == full and r["local_param_bytes"] == 0
        assert r["checksum"] == pytest.approx(expected_sum, rel=1e-9)
        bound = full / world + largest * (1 + 1 / world) + 32 * 2**20
        assert r["build_peak_anon_bytes"] < bound < full, (r["build_peak_anon_bytes"], bound, full)


def test_the_cpu_offload_config_trains(shards, tmp_path):
    ranks = _harness(tmp_path, _tiny(shards, deepspeed="zero3_offload", max_steps=3), port=29747)
    losses = [r["metrics"]["train/loss"] for r in ranks]
    assert all(r["step"] == 3 for r in ranks) and losses[0] == losses[1] and 0 < losses[0] < 20


def test_the_gpu_train_check_runs_at_tiny_size(tmp_path):
    """bench/gpu_train_check.py, the script a GPU session runs, on CPU at tiny size: three stages through the real
    run_stage, stage 1 rerun under its run name resumes at its last step, and every measured and planned figure the
    GPU run reports is there."""
    out = tmp_path / "check.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_train_check.py"),
            "--tiny",
            "--steps",
            "2",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    assert (
        result["device"] == "cpu"
        and result["preset"] == "tiny"
        and sorted(result["stages"]) == ["stage1", "stage2", "stage3"]
    )
    for name, stage in result["stages"].items():
        m, plan = stage["measured"], stage["plan"]
        assert m["steps"] == 2 and 0 < m["loss"] < 20 and m["mfu"] is None, name  # no GPU peak to divide by
        for key in ("peak_memory_gib", "step_time_s", "tokens_per_s", "visual_tokens_per_s", "model_flops_per_s"):
            assert m[key] > 0, (name, key)
        assert plan["plan/fits"] and plan["plan/per_gpu_peak_gib"] > plan["plan/activations_gib"] > 0, name
        assert plan["plan/trainable_parameters"] <= plan["plan/parameters"], name
    stages = result["stages"]
    assert stages["stage1"]["plan"]["plan/zero_stage"] == 2 and stages["stage2"]["plan"]["plan/zero_stage"] == 3
    assert stages["stage1"]["plan"]["plan/trainable_parameters"] < stages["stage2"]["plan"]["plan/trainable_parameters"]
    assert result["resume"]["steps_before"] == result["resume"]["steps_after"] == 2
