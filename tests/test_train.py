"""The stage-training job for real: Ray Train with 2 CPU workers, DeepSpeed ZeRO-2/3, MLflow on SQLite."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from jobs.recipe import CheckpointIncomplete, lr_lambda, verify_checkpoint
from jobs.stage_config import CONFIG_DIR, StageConfig, StageConfigError
from jobs.tracking import client, default_tracking_uri
from jobs.train import run_stage

PAPER = {1: ({"vision.stage5", "projector"}, 3e-4, 256, 2),
         2: ({"vision.stage3", "vision.stage4", "vision.stage5", "projector", "llm"}, 2e-5, 256, 3),
         3: ({"projector", "llm"}, 2e-5, 128, 3)}  # fmt: skip


def tiny(stage: int, data: Path, **changes) -> StageConfig:
    return StageConfig.from_yaml(CONFIG_DIR / "tiny" / f"stage{stage}.yaml").replace(data=str(data), **changes)


def test_shipped_stage_configs_are_the_papers_protocol(tiny_model):
    from convllava.trainable import param_group

    for stage, (groups, lr, batch, zero) in PAPER.items():
        paper = StageConfig.from_yaml(CONFIG_DIR / f"stage{stage}.yaml")
        small = StageConfig.from_yaml(CONFIG_DIR / "tiny" / f"stage{stage}.yaml")
        assert set(paper.trainable) == set(small.trainable) == groups
        assert (paper.lr, paper.global_batch_size, paper.epochs, paper.warmup_ratio, paper.weight_decay) == (
            lr, batch, 1, 0.03, 0.0)  # fmt: skip
        assert paper.deepspeed_config()["zero_optimization"]["stage"] == zero
        assert small.deepspeed_config()["zero_optimization"]["stage"] == zero and small.grad_accum == 2
        assert all(param_group(tiny_model, g) for g in groups)  # every group names real parameters
        for path in (CONFIG_DIR / f"stage{stage}.yaml", CONFIG_DIR / "tiny" / f"stage{stage}.yaml"):
            assert path.read_text().startswith("# convllava train --stage")
    offload = json.loads((CONFIG_DIR / "deepspeed" / "zero3_offload.json").read_text())
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_config_errors_name_the_field(tmp_path):
    good = tiny(1, tmp_path)
    with pytest.raises(StageConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        StageConfig.from_dict({**good.to_dict(), "learning_rate": 1})
    with pytest.raises(
        StageConfigError, match="global_batch_size: 10 is not a multiple of micro_batch_size × workers = 8"
    ):
        good.replace(global_batch_size=10)
    with pytest.raises(StageConfigError, match="lr_groups: 'llm' is not one of the trainable groups"):
        good.replace(lr_groups={"llm": 1e-5})
    with pytest.raises(StageConfigError, match="lr: expected a number"):
        good.replace(lr="fast")
    with pytest.raises(StageConfigError, match="init_from: give a checkpoint"):
        StageConfig.from_yaml(CONFIG_DIR / "tiny" / "stage2.yaml").check_runnable()
    overrides = ["lr=5e-4", "trainable=[projector]", "lr_groups={}"]  # lr_groups may only name trainable groups
    assert StageConfig.from_yaml(CONFIG_DIR / "tiny" / "stage1.yaml", overrides).lr == 5e-4


def test_warmup_cosine_schedule():
    fn = lr_lambda(100, 0.03, "cosine")
    assert [round(fn(s), 4) for s in (0, 1, 2, 3)] == [0.3333, 0.6667, 1.0, 1.0]
    assert fn(51) == pytest.approx(0.5, abs=0.02) and fn(99) < 0.01


def test_lr_groups_are_numbers_however_yaml_reads_them(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; a rate must reach the optimizer as a float or fail by name."""
    text = (CONFIG_DIR / "tiny" / "stage2.yaml").read_text()
    path = tmp_path / "stage2.yaml"
    path.write_text(text + "\nlr_groups: {vision.stage5: 1e-4, projector: 3e-4}\n")
    config = StageConfig.from_yaml(path)
    assert config.lr_groups == {"vision.stage5": 1e-4, "projector": 3e-4}
    assert all(type(v) is float for v in config.lr_groups.values())
    assert StageConfig.from_yaml(path, ["lr_groups={llm: 2e-5}"]).lr_groups == {"llm": 2e-5}
    with pytest.raises(StageConfigError, match=r"lr_groups\.projector: expected a number, got 'fast'"):
        StageConfig.from_yaml(path, ["lr_groups={projector: fast}"])
    for stage in (1, 2):  # the tiny recipe: the tower learns slower than the projector and the LM
        tiny_config = StageConfig.from_yaml(CONFIG_DIR / "tiny" / f"stage{stage}.yaml")
        vision = {g for g in tiny_config.trainable if g.startswith("vision")}
        assert vision and set(tiny_config.lr_groups) == vision
        assert all(type(v) is float and v <= tiny_config.lr / 10 for v in tiny_config.lr_groups.values())


def _weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _loss_history(tracking: str, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(tracking).get_metric_history(run_id, "train/loss"))


def _check_trained_exactly(before: dict, after: dict, trainable: tuple[str, ...]) -> None:
    from convllava.checkpoint import load_model

    model, _ = load_model(Path(after["__dir__"]))
    from convllava.trainable import group_prefixes

    prefixes = tuple(p for g in trainable for p in group_prefixes(model)[g])
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed, "nothing trained"
    assert all(k.startswith(prefixes) for k in changed), [k for k in changed if not k.startswith(prefixes)][:5]
    trainable_keys = [k for k in before if k.startswith(prefixes)]
    assert len(changed) >= 0.8 * len(trainable_keys)  # (a few, e.g. biases of unused paths, may not move)


@pytest.mark.integration
def test_three_stages_train_exactly_their_parameters_and_loss_falls(shards, tmp_path):
    tracking = default_tracking_uri(tmp_path)
    init = None
    first_weights = None
    for stage, steps in ((1, 12), (2, 8), (3, 8)):
        config = tiny(stage, shards, max_steps=steps, checkpoint_every=4, init_from=init)
        result = run_stage(config, str(tmp_path / "runs"), tracking_uri=tracking)
        assert result.steps == steps and result.model_uri.endswith("/model")
        after = _weights(result.model_uri)
        after["__dir__"] = result.model_uri
        if init is None:  # stage 1 starts from the preset's seeded init
            from convllava.config import ConvLlavaConfig
            from convllava.modeling import ConvLlavaForCausalLM

            torch.manual_seed(config.seed)
            fresh = ConvLlavaForCausalLM(ConvLlavaConfig.from_preset("tiny", attn_implementation="sdpa"))
            first_weights = {k: v.clone() for k, v in fresh.state_dict().items() if k in after}
            before = first_weights
        else:
            before = _weights(init)
        _check_trained_exactly(before, after, config.trainable)
        history = _loss_history(tracking, result.run_id)
        assert [s for s, _ in history] == list(range(1, steps + 1))  # every step once
        losses = [v for _, v in history]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
        run = client(tracking).get_run(result.run_id)
        assert run.info.status == "FINISHED" and float(run.data.params["lr"]) == config.lr
        assert {"train/grad_norm", "train/samples_per_s", "train/tokens_per_s", "train/visual_tokens_per_s",
                "train/text_padding_fraction", "train/step_time_s", "train/lr"} <= set(run.data.metrics)  # fmt: skip
        kept = sorted(p.name for p in (tmp_path / "runs" / config.name).glob("checkpoint_0*"))
        assert kept == [f"checkpoint_{s:06d}" for s in range(steps - 4, steps + 1, 4)][-2:]  # keep_last = 2
        verify_checkpoint(Path(result.checkpoint_uri), config.workers)
        init = result.model_uri


def _train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "name"]):
        title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "RayTrainWorker" in title:
            found.append(p)
    return found


@pytest.mark.integration
def test_killed_worker_resumes_exactly(shards, tmp_path):
    tracking = default_tracking_uri(tmp_path)
    config = tiny(1, shards, max_steps=8, checkpoint_every=2, keep_last=3)
    reference = run_stage(config, str(tmp_path / "runs"), tracking_uri=tracking, run_name="reference")

    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=run_stage(config, str(tmp_path / "runs"), tracking_uri=tracking, run_name="killed")))  # fmt: skip
    thread.start()
    marker = tmp_path / "runs" / "killed" / "checkpoint_000004"
    deadline = time.time() + 600
    while not marker.exists() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    workers = _train_workers()
    assert marker.exists() and workers, "no checkpoint_000004 or no worker to kill"
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join()
    result = outcome["result"]
    assert result.steps == reference.steps == 8
    final, expected = _weights(result.model_uri), _weights(reference.model_uri)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final), "resumed run diverged from the uninterrupted one"
    history = _loss_history(tracking, result.run_id)
    assert [s for s, _ in history] == list(range(1, 9))  # no duplicated steps after the restart
    assert [v for _, v in history] == [v for _, v in _loss_history(tracking, reference.run_id)]


@pytest.mark.integration
def test_text_only_micro_batch_on_one_rank_does_not_stall_zero3(shards, tiny_model, tiny_processor, tmp_path):
    """ZeRO-3 gathers each module's parameters with a collective as it runs: a rank whose micro-batch has no image
    must still run tower and projector (on a blank image, weighted zero) or the other rank waits for ever. `make demo`
    hung this way in stage 3, which starts from a saved model (loaded in inference mode, so `model.train()` matters).
    """
    from convllava.checkpoint import save_checkpoint
    from convllava.data import plan_epoch
    from jobs.shards import ShardSet
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.preprocess import run_preprocess

    data = shards.parent / "data"
    records = [json.loads(line) for line in (data / "instruct.jsonl").read_text().splitlines()]
    mixed = [r for r in records if "image" in r][:40] + [
        {"id": f"text-{i}", "conversations": [{"from": "human", "value": f"What is {i} plus 1?"},
                                              {"from": "gpt", "value": f"{i} plus 1 is {i + 1}."}]}
        for i in range(24)
    ]  # fmt: skip
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    run_preprocess(Mixture.from_files([str(tmp_path / "mixed.jsonl")], str(data)), PreprocessConfig(resolution=256),
                   str(tmp_path / "shards"), echo=lambda *_: None)  # fmt: skip
    init = save_checkpoint(tiny_model, tiny_processor, tmp_path / "init")
    config = tiny(3, tmp_path / "shards", init_from=str(init), checkpoint_every=0)
    infos = ShardSet(str(tmp_path / "shards")).infos
    plan = plan_epoch(infos, micro_batch_size=config.micro_batch_size, grad_accum=config.grad_accum,
                      world_size=config.workers, seed=config.seed, epoch=0, group_by_length=config.group_by_length)  # fmt: skip
    text = [[infos[m[0]].bucket == "text" for m in (plan.micro_batches(0, s)[a], plan.micro_batches(1, s)[a])]
            for s in range(plan.num_steps) for a in range(plan.grad_accum)]  # fmt: skip
    assert [True, False] in text or [False, True] in text, "the plan never puts text on one rank only"
    result = run_stage(config, str(tmp_path / "runs"), tracking_uri=default_tracking_uri(tmp_path))
    assert result.steps == plan.num_steps and result.metrics["train/loss"] > 0


@pytest.mark.integration
def test_s3_storage_and_init_from_s3(shards, s3_bucket, tmp_path):
    import boto3

    from convllava.checkpoint import load_model

    result = run_stage(tiny(1, shards, max_steps=2, checkpoint_every=0), f"s3://{s3_bucket}/runs",
                       tracking_uri=default_tracking_uri(tmp_path))  # fmt: skip
    assert result.checkpoint_uri.startswith(f"s3://{s3_bucket}/runs/stage1/checkpoint_000002")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/")["Contents"]]
    assert any(k.endswith("model/model.safetensors") for k in keys)
    assert any(k.endswith("COMPLETE.rank1.json") for k in keys)  # both ranks' parts merged in one checkpoint
    model, _ = load_model(result.model_uri)
    assert model.parameter_counts()["projector"] > 0
    second = run_stage(tiny(3, shards, max_steps=2, init_from=result.model_uri), str(tmp_path / "runs"))
    assert second.steps == 2


def test_incomplete_checkpoints_are_refused(tmp_path):
    from jobs.recipe import write_completion_marker

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1}))
    write_completion_marker(tmp_path, 0)
    with pytest.raises(CheckpointIncomplete, match="rank 1 never finished writing"):
        verify_checkpoint(tmp_path, 2)
    write_completion_marker(tmp_path, 1)
    assert verify_checkpoint(tmp_path, 2) == {"step": 1}
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(CheckpointIncomplete, match="model/model.safetensors is missing or differs"):
        verify_checkpoint(tmp_path, 2)
