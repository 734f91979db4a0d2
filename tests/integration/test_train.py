"""The stage-training job for real: Ray Train with 2 CPU workers, DeepSpeed ZeRO-2/3, MLflow on SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_harness import loss_history, stage_weights, tiny

from jobs.tracking.runs import client, default_tracking_uri
from jobs.train.checkpoints import verify_checkpoint
from jobs.train.driver import run_stage

pytestmark = pytest.mark.integration


def _check_trained_exactly(before: dict, after: dict, trainable: tuple[str, ...]) -> None:
    from convllava.modeling.checkpoint import load_model

    model, _ = load_model(Path(after["__dir__"]))
    from convllava.modeling.trainable import group_prefixes

    prefixes = tuple(p for g in trainable for p in group_prefixes(model)[g])
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed, "nothing trained"
    assert all(k.startswith(prefixes) for k in changed), [k for k in changed if not k.startswith(prefixes)][:5]
    trainable_keys = [k for k in before if k.startswith(prefixes)]
    assert len(changed) >= 0.8 * len(trainable_keys)  # (a few, e.g. biases of unused paths, may not move)


def test_three_stages_train_exactly_their_parameters_and_loss_falls(shards, tmp_path):
    tracking = default_tracking_uri(tmp_path)
    init = None
    first_weights = None
    for stage, steps in ((1, 12), (2, 8), (3, 8)):
        config = tiny(stage, shards, max_steps=steps, checkpoint_every=4, init_from=init)
        result = run_stage(config, str(tmp_path / "runs"), tracking_uri=tracking)
        assert result.steps == steps and result.model_uri.endswith("/model")
        after = stage_weights(result.model_uri)
        after["__dir__"] = result.model_uri
        if init is None:  # stage 1 starts from the preset's seeded init
            from convllava.modeling.config import ConvLlavaConfig
            from convllava.modeling.model import ConvLlavaForCausalLM

            torch.manual_seed(config.seed)
            fresh = ConvLlavaForCausalLM(ConvLlavaConfig.from_preset("tiny", attn_implementation="sdpa"))
            first_weights = {k: v.clone() for k, v in fresh.state_dict().items() if k in after}
            before = first_weights
        else:
            before = stage_weights(init)
        _check_trained_exactly(before, after, config.trainable)
        history = loss_history(tracking, result.run_id)
        assert [s for s, _ in history] == list(range(1, steps + 1))  # every step once
        losses = [v for _, v in history]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
        run = client(tracking).get_run(result.run_id)
        assert run.info.status == "FINISHED" and float(run.data.params["lr"]) == config.lr
        assert {
            "train/grad_norm",
            "train/samples_per_s",
            "train/tokens_per_s",
            "train/visual_tokens_per_s",
            "train/text_padding_fraction",
            "train/step_time_s",
            "train/lr",
        } <= set(run.data.metrics)
        # Where the start-up went, logged once with step 1: run_stage's call → the first optimizer step, in order.
        startup = {k: v for k, v in run.data.metrics.items() if k.startswith("startup/")}
        phases = ("driver", "worker_start", "worker_init", "model", "engine", "first_step")
        assert set(startup) == {f"startup/{p}_s" for p in (*phases, "total")}, startup
        assert all(startup[f"startup/{p}_s"] >= 0 for p in phases), startup
        assert startup["startup/total_s"] == pytest.approx(sum(startup[f"startup/{p}_s"] for p in phases), abs=1e-6)
        assert [m.step for m in client(tracking).get_metric_history(result.run_id, "startup/total_s")] == [1]
        kept = sorted(p.name for p in (tmp_path / "runs" / config.name).glob("checkpoint_0*"))
        assert kept == [f"checkpoint_{s:06d}" for s in range(steps - 4, steps + 1, 4)][-2:]  # keep_last = 2
        verify_checkpoint(Path(result.checkpoint_uri), config.workers)
        init = result.model_uri


def test_text_only_micro_batch_on_one_rank_does_not_stall_zero3(shards, tiny_model, tiny_processor, tmp_path):
    """ZeRO-3 gathers each module's parameters with a collective as it runs: a rank whose micro-batch has no image
    must still run tower and projector (on a blank image, weighted zero) or the other rank waits for ever. `make demo`
    hung this way in stage 3, which starts from a saved model (loaded in inference mode, so `model.train()` matters).
    """
    from convllava.data.epochs import plan_shard_epoch
    from convllava.data.shards import ShardSet
    from convllava.modeling.checkpoint import save_checkpoint
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.preprocess import run_preprocess

    data = shards.parent / "data"
    records = [json.loads(line) for line in (data / "instruct.jsonl").read_text().splitlines()]
    mixed = [r for r in records if "image" in r][:40] + [
        {
            "id": f"text-{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} plus 1?"},
                {"from": "gpt", "value": f"{i} plus 1 is {i + 1}."},
            ],
        }
        for i in range(24)
    ]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    run_preprocess(
        Mixture.from_files([str(tmp_path / "mixed.jsonl")], str(data)),
        PreprocessConfig(resolution=256),
        str(tmp_path / "shards"),
        echo=lambda *_: None,
    )
    init = save_checkpoint(tiny_model, tiny_processor, tmp_path / "init")
    config = tiny(3, tmp_path / "shards", init_from=str(init), checkpoint_every=0)
    opened = ShardSet(str(tmp_path / "shards"))
    infos = opened.infos
    plan = plan_shard_epoch(  # the plan the stage trains by
        opened.layout,
        micro_batch_size=config.micro_batch_size,
        grad_accum=config.grad_accum,
        world_size=config.workers,
        seed=config.seed,
        epoch=0,
        window=config.shuffle_window,
        group_by_length=config.group_by_length,
    )
    text = [
        [infos[m[0]].bucket == "text" for m in (plan.micro_batches(0, s)[a], plan.micro_batches(1, s)[a])]
        for s in range(plan.num_steps)
        for a in range(plan.grad_accum)
    ]
    assert [True, False] in text or [False, True] in text, "the plan never puts text on one rank only"
    result = run_stage(config, str(tmp_path / "runs"), tracking_uri=default_tracking_uri(tmp_path))
    assert result.steps == plan.num_steps and result.metrics["train/loss"] > 0


def test_s3_storage_and_init_from_s3(shards, s3_bucket, tmp_path):
    import boto3

    from convllava.modeling.checkpoint import load_model

    result = run_stage(
        tiny(1, shards, max_steps=2, checkpoint_every=0),
        f"s3://{s3_bucket}/runs",
        tracking_uri=default_tracking_uri(tmp_path),
    )
    assert result.checkpoint_uri.startswith(f"s3://{s3_bucket}/runs/stage1/checkpoint_000002")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/")["Contents"]]
    assert any(k.endswith("model/model.safetensors") for k in keys)
    assert any(k.endswith("COMPLETE.rank1.json") for k in keys)  # both ranks' parts merged in one checkpoint
    model, _ = load_model(result.model_uri)
    assert model.parameter_counts()["projector"] > 0
    second = run_stage(tiny(3, shards, max_steps=2, init_from=result.model_uri), str(tmp_path / "runs"))
    assert second.steps == 2
