"""The one type-driven config loader: nested dataclasses, optional, list/tuple/dict, Literal, paths in errors,
dotted overrides; and every shipped YAML loading through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from convllava.config_loader import ConfigLoadError, apply_overrides, dump, load, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Inner:
    rate: float
    steps: int = 1
    kind: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    tags: tuple[str, ...] = ()
    sizes: list[int] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    parts: dict[str, Inner] = field(default_factory=dict)
    limit: int | None = None
    flag: bool = False


def test_nested_optional_list_tuple_dict_and_literal_values_are_typed():
    data = {
        "name": "x",
        "inner": {"rate": "1e-4", "steps": 2.0, "kind": "b"},
        "tags": ["p", "q"],
        "sizes": [1, 2],
        "rates": {"llm": "2e-5"},
        "parts": {"a": {"rate": 1}},
        "limit": None,
        "flag": True,
    }
    config = load(Outer, data, "f.yaml")
    assert config == Outer("x", Inner(1e-4, 2, "b"), ("p", "q"), [1, 2], {"llm": 2e-5}, {"a": Inner(1.0)}, None, True)
    assert (
        type(config.inner.rate) is float and type(config.inner.steps) is int and type(config.parts["a"].rate) is float
    )
    assert load(Outer, {"name": "x", "inner": {"rate": 1}, "limit": "3"}).limit == 3
    assert dump(config)["tags"] == ["p", "q"] and load(Outer, dump(config)) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"name": "x", "inner": {"rate": 1, "stpes": 2}},
            r"^f\.yaml: inner: unknown key\(s\) \['stpes'\]; known keys: \['kind', 'rate', 'steps'\]$",
        ),
        ({"name": "x", "inner": {"rate": "abc"}}, r"^f\.yaml: inner\.rate: expected a number, got 'abc'$"),
        ({"name": "x", "inner": {"rate": 1, "steps": 2.5}}, r"inner\.steps: expected a whole number, got 2\.5"),
        ({"name": "x", "inner": {"rate": 1, "kind": "c"}}, r"inner\.kind: expected one of \['a', 'b'\], got 'c'"),
        ({"name": "x", "inner": {}}, r"^f\.yaml: inner: missing required key\(s\) \['rate'\]$"),
        ({"name": "x", "inner": {"rate": 1}, "parts": {"p": {"rate": True}}}, r"parts\.p\.rate: expected a number"),
        ({"name": "x", "inner": {"rate": 1}, "tags": "p"}, r"tags: expected a list, got 'p'"),
        ({"name": "x", "inner": {"rate": 1}, "sizes": [1, "two"]}, r"sizes\[1\]: expected a number, got 'two'"),
        ({"name": 3, "inner": {"rate": 1}}, r"name: expected a string, got 3"),
        ({"name": "x", "inner": {"rate": 1}, "flag": "yes"}, r"flag: expected true or false, got 'yes'"),
        ({"name": "x", "inner": {"rate": 1, "steps": 0}}, r"^f\.yaml: inner: steps: must be >= 1, got 0$"),
        ({"name": "x", "inner": [1]}, r"inner: expected a mapping \(Inner\), got list"),
    ],
)
def test_errors_name_the_file_and_the_field_path(data, message):
    class Refused(ConfigLoadError):
        pass

    with pytest.raises(Refused, match=message):
        load(Outer, data, "f.yaml", Refused)


def test_dotted_overrides_reach_nested_fields_and_replace_other_values_whole():
    base = {"name": "x", "inner": {"rate": 1, "steps": 2}, "rates": {"vision.stage5": 1e-4, "projector": 3e-4}}
    items = ["inner.rate=5e-4", "rates.vision.stage5=2e-4", "tags=[a, b]", "limit=7"]
    config = load(Outer, apply_overrides(Outer, base, parse_overrides(items)))
    assert config.inner == Inner(5e-4, 2) and config.tags == ("a", "b") and config.limit == 7
    assert config.rates == {"vision.stage5": 2e-4, "projector": 3e-4}
    assert load(Outer, apply_overrides(Outer, base, {"rates": {"llm": 1.0}})).rates == {"llm": 1.0}
    with pytest.raises(ConfigLoadError, match=r"inner: unknown key\(s\) \['rat'\]"):
        load(Outer, apply_overrides(Outer, base, parse_overrides(["inner.rat=1"])), "cli")
    with pytest.raises(ConfigLoadError, match=r"unknown key\(s\) \['name.first'\]"):
        load(Outer, apply_overrides(Outer, base, parse_overrides(["name.first=1"])), "cli")
    with pytest.raises(ConfigLoadError, match="override 'lr': expected key=value"):
        parse_overrides(["lr"])


def test_keys_given_by_the_caller_are_not_accepted_from_the_data():
    @dataclass(frozen=True)
    class WithSource:
        name: str
        source_path: str = ""

    assert load(WithSource, {"name": "n"}, source_path="p.yaml").source_path == "p.yaml"
    with pytest.raises(ConfigLoadError, match=r"unknown key\(s\) \['source_path'\]; known keys: \['name'\]"):
        load(WithSource, {"name": "n", "source_path": "x"}, source_path="p.yaml")


def test_every_shipped_config_loads():
    from jobs.dag.config import PipelineConfig
    from jobs.evaluate.suite import load_suite
    from jobs.train.config import StageConfig

    configs = sorted((ROOT / "jobs/configs").rglob("*.yaml"))
    shipped = ("demo.yaml", "cluster.yaml", "llava.yaml")
    pipelines = [p for p in configs if p.parent.name == "configs" and p.name in shipped]
    suites = [p for p in configs if p.parent.name == "suites"]
    stages = [p for p in configs if p not in pipelines and p not in suites]
    assert len(pipelines) == 3 and len(suites) == 2 and len(stages) == 6
    for path in stages:
        assert StageConfig.from_yaml(path).stage in (1, 2, 3)
    for path in suites:
        assert load_suite(str(path))[1]
    demo = PipelineConfig.from_yaml(ROOT / "jobs/configs/demo.yaml")
    assert (demo.demo_data.captions, demo.demo_data.eval, demo.preprocess.resolution) == (2400, 200, 256)
    assert demo.eval.key() == {"suite": "demo", "max_new_tokens": 16}
    cluster = PipelineConfig.from_yaml(ROOT / "jobs/configs/cluster.yaml")
    assert cluster.demo_data is None and cluster.preprocess.mode == "square"
    assert cluster.mixture("captions", Path("/data")).sources[0].annotations.startswith("s3://")
    # Relative paths under an s3:// data root stay URIs (not "s3:/bucket/..." local paths)
    (captions,) = demo.mixture("captions", "s3://lab-raw/demo/").sources
    assert (captions.annotations, captions.image_root) == ("s3://lab-raw/demo/captions.json", "s3://lab-raw/demo")
    (local,) = demo.mixture("captions", Path("/data/demo")).sources
    assert (local.annotations, local.image_root) == ("/data/demo/captions.json", "/data/demo")
    for config in (demo, cluster):
        assert all(config.stage_config(n, "shards", None).name == n for n in ("stage1", "stage2", "stage3"))


def test_pipeline_config_errors_name_the_file_and_the_section(tmp_path):
    import yaml

    from jobs.dag.config import PipelineConfig, PipelineConfigError

    raw = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    cases = {
        "eval": ({**raw, "eval": {"suite": "demo", "limt": 3}}, r"demo\.yaml: eval: unknown key\(s\) \['limt'\]"),
        "demo_data": ({**raw, "demo_data": {"eval": 3}}, r"demo\.yaml: demo_data: demo data: eval must be even"),
        "preprocess": ({**raw, "preprocess": {"resolution": "x"}}, r"preprocess\.resolution: expected a number"),
        "sources": (
            {**raw, "datasets": {"captions": {"sources": [{"name": "c"}]}}},
            r"datasets\.captions\.sources\[0\]: missing required key\(s\) \['annotations', 'image_root'\]",
        ),
        "s3 data_root, demo data": (
            {**raw, "data_root": "s3://raw"},
            r"demo\.yaml: demo_data is generated into data_root, which must then be a local folder, not s3://raw",
        ),
        "s3 data_root, no eval data_root": (
            {k: v for k, v in raw.items() if k != "demo_data"} | {"data_root": "s3://raw"},
            r"demo\.yaml: eval\.data_root: the eval suite's files are read from a local folder",
        ),
        "stage": (
            {
                **raw,
                "stages": {
                    **raw["stages"],
                    "stage2": {"config": "tiny/stage2.yaml", "data": "captions", "overrides": {"lr": "fast"}},
                },
            },
            None,
        ),
    }
    for data, message in cases.values():
        path = tmp_path / "demo.yaml"
        path.write_text(yaml.safe_dump(data))
        if message is None:  # stage overrides are checked when the stage is resolved, naming the node
            with pytest.raises(ValueError, match=r"stages\.stage2\.overrides: lr: expected a number"):
                PipelineConfig.from_yaml(path).stage_config("stage2", "shards", None)
            continue
        with pytest.raises(PipelineConfigError, match=message):
            PipelineConfig.from_yaml(path)


def _pipeline(tmp_path: Path, stages: dict, name: str = "shape.yaml") -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**raw, "stages": stages}, sort_keys=False))
    return path


def test_a_pipeline_is_any_ordered_list_of_stages(tmp_path):
    """What a new user tries first: the demo without stage 2 and with stage 3 renamed `finetune`; LLaVA's two-stage
    recipe as shipped; the nodes, names and order follow the YAML."""
    import yaml

    from jobs.dag.config import PipelineConfig

    raw = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())["stages"]
    two = PipelineConfig.from_yaml(_pipeline(tmp_path, {"stage1": raw["stage1"], "finetune": raw["stage3"]}))
    assert two.nodes == ("preprocess", "stage1", "finetune", "eval")
    finetune = two.stage_config("finetune", "shards", "ckpt")
    assert (finetune.name, finetune.trainable, finetune.init_from) == ("finetune", ("projector", "llm"), "ckpt")
    swapped = PipelineConfig.from_yaml(_pipeline(tmp_path, {"finetune": raw["stage3"], "stage1": raw["stage1"]}, "b"))
    assert swapped.nodes == ("preprocess", "finetune", "stage1", "eval")
    assert swapped.config_hash() != two.config_hash()  # the order is part of the configuration
    assert two.node("finetune") == 2 and two.node("eval") == 3

    llava = PipelineConfig.from_yaml(ROOT / "jobs/configs/llava.yaml")
    assert llava.nodes == ("preprocess", "pretrain", "finetune", "eval")
    pretrain, tune = (llava.stage_config(n, "s3://b/shards", None) for n in ("pretrain", "finetune"))
    assert (pretrain.name, pretrain.lr, pretrain.global_batch_size, pretrain.epochs) == ("pretrain", 1e-3, 256, 1)
    assert pretrain.trainable == ("vision.stage5", "projector")  # ConvLLaVA's fifth stage starts from scratch
    assert (tune.name, tune.lr, tune.global_batch_size, tune.trainable) == ("finetune", 2e-5, 128, ("projector", "llm"))
    paper = PipelineConfig.from_yaml(ROOT / "jobs/configs/cluster.yaml")
    assert paper.nodes == ("preprocess", "stage1", "stage2", "stage3", "eval")


def test_pipeline_shape_errors_name_the_stage_and_the_nodes(tmp_path):
    import yaml

    from jobs.dag.config import PipelineConfig, PipelineConfigError

    stage = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())["stages"]["stage1"]
    cases = [
        ({}, r"shape\.yaml: stages: give at least one stage"),
        ({"eval": stage}, r"stages\.eval: a stage name is a letter then .*neither 'preprocess' nor 'eval'"),
        ({"high res": stage}, r"stages\.high res: a stage name is a letter"),
        ({"s": {**stage, "init_from": "models:/convllava"}}, r"stages\.s\.init_from: a registered model is models:/"),
        ({"s": {**stage, "data": "nope"}}, r"stages\.s\.data: unknown dataset 'nope'"),
    ]
    for stages, message in cases:
        with pytest.raises(PipelineConfigError, match=message):
            PipelineConfig.from_yaml(_pipeline(tmp_path, stages))
    for init in ("models:/convllava/3", "models:/convllava@champion", "s3://b/ckpt", "/ckpt"):
        config = PipelineConfig.from_yaml(_pipeline(tmp_path, {"s": {**stage, "init_from": init}}))
        assert config.stages["s"].init_from == init
    with pytest.raises(PipelineConfigError, match=r"--from stage2: not a node of .* its nodes are preprocess, s, eval"):
        config.node("stage2")
