"""The stage-training job for real: Ray Train with 2 CPU workers, DeepSpeed ZeRO-2/3, MLflow on SQLite."""

from __future__ import annotations

import json
import re

import pytest
from train_harness import tiny

from convllava.io.config import ConfigLoadError
from jobs.train.checkpoints import CheckpointIncomplete, verify_checkpoint
from jobs.train.config import CONFIG_DIR, StageConfig
from jobs.train.recipe import lr_lambda, startup_metrics

PAPER = {
    1: ({"vision.stage5", "projector"}, 3e-4, 256, 2),
    2: ({"vision.stage3", "vision.stage4", "vision.stage5", "projector", "llm"}, 2e-5, 256, 3),
    3: ({"projector", "llm"}, 2e-5, 128, 3),
}


def test_shipped_stage_configs_are_the_papers_protocol(tiny_model):
    from convllava.modeling.trainable import param_group

    for stage, (groups, lr, batch, zero) in PAPER.items():
        paper = StageConfig.from_yaml(CONFIG_DIR / f"stage{stage}.yaml")
        small = StageConfig.from_yaml(CONFIG_DIR / "tiny" / f"stage{stage}.yaml")
        assert set(paper.trainable) == set(small.trainable) == groups
        assert (paper.lr, paper.global_batch_size, paper.epochs, paper.warmup_ratio, paper.weight_decay) == (
            lr,
            batch,
            1,
            0.03,
            0.0,
        )
        assert paper.deepspeed_config()["zero_optimization"]["stage"] == zero
        assert small.deepspeed_config()["zero_optimization"]["stage"] == zero and small.grad_accum == 2
        assert all(param_group(tiny_model, g) for g in groups)  # every group names real parameters
        for path in (CONFIG_DIR / f"stage{stage}.yaml", CONFIG_DIR / "tiny" / f"stage{stage}.yaml"):
            assert path.read_text().startswith("# convllava train --stage")
    offload = json.loads((CONFIG_DIR / "deepspeed" / "zero3_offload.json").read_text())
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_config_errors_name_the_field(tmp_path):
    good = tiny(1, tmp_path)
    with pytest.raises(ConfigLoadError, match=r"^config: learning_rate: unknown key; known keys: \[.*'lr'"):
        StageConfig.from_dict({**good.to_dict(), "learning_rate": 1})
    with pytest.raises(
        ConfigLoadError, match="global_batch_size: 10 is not a multiple of micro_batch_size × workers = 8"
    ):
        good.replace(global_batch_size=10)
    with pytest.raises(ConfigLoadError, match="lr_groups: 'llm' is not one of the trainable groups"):
        good.replace(lr_groups={"llm": 1e-5})
    with pytest.raises(ConfigLoadError, match="override lr=fast: lr: Input should be a valid number"):
        good.replace(lr="fast")
    with pytest.raises(ConfigLoadError, match="init_from: give a checkpoint"):
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
    with pytest.raises(ConfigLoadError, match=r"lr_groups\.projector: Input should be a valid number.*\(got 'fast'\)"):
        StageConfig.from_yaml(path, ["lr_groups={projector: fast}"])
    for stage in (1, 2):  # the tiny recipe: the tower learns slower than the projector and the LM
        tiny_config = StageConfig.from_yaml(CONFIG_DIR / "tiny" / f"stage{stage}.yaml")
        vision = {g for g in tiny_config.trainable if g.startswith("vision")}
        assert vision and set(tiny_config.lr_groups) == vision
        assert all(type(v) is float and v <= tiny_config.lr / 10 for v in tiny_config.lr_groups.values())


def test_incomplete_checkpoints_are_refused(tmp_path):
    from jobs.train.checkpoints import write_completion_marker

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


def test_startup_metrics_split_the_time_from_the_call_to_the_first_step():
    marks = [("called", 100.0), ("driver", 101.5), ("worker_start", 104.0), ("model", 110.25), ("first_step", 111.0)]
    assert startup_metrics(marks) == {
        "startup/driver_s": 1.5,
        "startup/worker_start_s": 2.5,
        "startup/model_s": 6.25,
        "startup/first_step_s": 0.75,
        "startup/total_s": 11.0,
    }


def test_shards_made_for_another_processor_are_refused_naming_each_setting():
    from convllava.processing.image_processing import ImageProcessorConfig
    from convllava.processing.processor_config import ProcessorConfig
    from jobs.train.recipe import check_shards_match_processor
    from pipelines.config import PreprocessConfig

    processor = ProcessorConfig(template="vicuna_v1", image=ImageProcessorConfig(resolution=256, mode="bucket"))
    check_shards_match_processor("shards", PreprocessConfig(resolution=256), processor)  # they agree
    cases = {
        "resolution 512 (the model's processor: 256); preprocess again with resolution: 256": {"resolution": 512},
        "mode 'square' (the model's processor: 'bucket'); preprocess again with mode: bucket": {"mode": "square"},
        "template 'chatml' (the model's processor: 'vicuna_v1')": {"template": "chatml"},
        "tokenization 'llava' (the model's processor: 'one_pass')": {"tokenization": "llava"},
    }
    for message, made in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"shards: the shards were made with {message}")):
            check_shards_match_processor("shards", PreprocessConfig(**{"resolution": 256, **made}), processor)
    both = PreprocessConfig(resolution=512, template="chatml")
    with pytest.raises(
        ValueError, match=r"512 .*; template 'chatml' .*again with resolution: 256, template: vicuna_v1"
    ):
        check_shards_match_processor("s3://b/shards", both, processor)
    # a manifest written before `tokenization` existed reads as one_pass
    legacy = PreprocessConfig.from_dict(
        {k: v for k, v in PreprocessConfig(resolution=256).to_dict().items() if k != "tokenization"}
    )
    check_shards_match_processor("shards", legacy, processor)
