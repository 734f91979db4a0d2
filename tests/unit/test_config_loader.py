"""The config spine (`convllava.io.config.ConfigModel`): typed values, errors naming the file and the field
path, `key=value` overrides, frozen configs, round trips and stable hashes; and every shipped YAML loading through it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field, ValidationError, model_validator

from convllava.io.config import ConfigLoadError, ConfigModel, parse_overrides, stable_hash

ROOT = Path(__file__).resolve().parents[2]
TINY_STAGE1 = ROOT / "jobs/configs/tiny/stage1.yaml"


class Inner(ConfigModel):
    rate: float
    steps: int = 1
    kind: Literal["a", "b"] = "a"

    @model_validator(mode="after")
    def _check(self) -> Inner:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        return self


class Outer(ConfigModel):
    name: str
    inner: Inner
    tags: tuple[str, ...] = ()
    sizes: list[int] = Field(default_factory=list)
    rates: dict[str, float] = Field(default_factory=dict)
    parts: dict[str, Inner] = Field(default_factory=dict)
    limit: int | None = None
    flag: bool = False


def _yaml(tmp_path: Path, data: dict, name: str = "f.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_nested_optional_list_tuple_dict_and_literal_values_are_typed():
    data = {
        "name": "x",
        "inner": {"rate": "1e-4", "steps": 2.0, "kind": "b"},  # YAML 1.1 reads 1e-4 as a string
        "tags": ["p", "q"],
        "sizes": [1, 2],
        "rates": {"llm": "2e-5"},
        "parts": {"a": {"rate": 1}},
        "limit": None,
        "flag": True,
    }
    config = Outer.from_dict(data, "f.yaml")
    want = Outer(
        name="x",
        inner=Inner(rate=1e-4, steps=2, kind="b"),
        tags=("p", "q"),
        sizes=[1, 2],
        rates={"llm": 2e-5},
        parts={"a": Inner(rate=1.0)},
        flag=True,
    )
    assert config == want
    assert (
        type(config.inner.rate) is float and type(config.inner.steps) is int and type(config.parts["a"].rate) is float
    )
    assert Outer.from_dict({"name": "x", "inner": {"rate": 1}, "limit": "3"}).limit == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (  # an unknown key, with the keys that are known
            {"name": "x", "inner": {"rate": 1, "stpes": 2}},
            r"^{f}: inner\.stpes: unknown key; known keys: \['kind', 'rate', 'steps'\]$",
        ),
        (  # a wrong type
            {"name": "x", "inner": {"rate": "abc"}},
            r"^{f}: inner\.rate: Input should be a valid number, unable to parse string as a number \(got 'abc'\)$",
        ),
        ({"name": "x", "inner": {"rate": 1, "steps": 2.5}}, r"^{f}: inner\.steps: .*fractional part \(got 2\.5\)$"),
        (
            {"name": "x", "inner": {"rate": 1, "kind": "c"}},
            r"^{f}: inner\.kind: Input should be 'a' or 'b' \(got 'c'\)$",
        ),
        ({"name": "x", "inner": {}}, r"^{f}: inner\.rate: missing required key$"),
        (
            {"name": "x", "inner": {"rate": 1}, "parts": {"p": {"rate": []}}},
            r"^{f}: parts\.p\.rate: .* \(got a list\)$",
        ),
        (
            {"name": "x", "inner": {"rate": 1}, "sizes": [1, "two"]},
            r"^{f}: sizes\[1\]: .*valid integer.*\(got 'two'\)$",
        ),
        ({"name": 3, "inner": {"rate": 1}}, r"^{f}: name: Input should be a valid string \(got 3\)$"),
        ({"name": "x", "inner": {"rate": 1, "steps": 0}}, r"^{f}: inner: steps: must be >= 1, got 0$"),  # its own check
        ({"name": "x", "inner": [1]}, r"^{f}: inner: Input should be a valid dictionary .*\(got a list\)$"),
        # pydantic's lax mode would read these as 1, True and False: a flag is true/false, a number is not one
        ({"name": "x", "inner": {"rate": 1, "steps": True}}, r"^{f}: inner\.steps: expected a number, not true$"),
        ({"name": "x", "inner": {"rate": False}}, r"^{f}: inner\.rate: expected a number, not false$"),
        ({"name": "x", "inner": {"rate": 1}, "limit": True}, r"^{f}: limit: expected a number, not true$"),
        ({"name": "x", "inner": {"rate": 1}, "flag": 1}, r"^{f}: flag: expected true or false \(got 1\)$"),
        ({"name": "x", "inner": {"rate": 1}, "flag": "off"}, r"^{f}: flag: expected true or false \(got 'off'\)$"),
    ],
)
def test_yaml_errors_name_the_file_and_the_field_path(tmp_path, data, message):
    path = _yaml(tmp_path, data)
    with pytest.raises(ConfigLoadError, match=message.replace("{f}", re.escape(str(path)))):
        Outer.from_yaml(path)


def test_every_error_of_a_file_is_named_on_its_own_line(tmp_path):
    path = _yaml(tmp_path, {"name": 3, "inner": {"rate": "abc", "stpes": 2}})
    with pytest.raises(ConfigLoadError) as info:
        Outer.from_yaml(path)
    lines = str(info.value).splitlines()
    assert [line.split(": ")[:2] for line in lines] == [
        [str(path), "name"],
        [str(path), "inner.rate"],
        [str(path), "inner.stpes"],
    ]


def test_dotted_overrides_reach_nested_fields_and_replace_other_values_whole(tmp_path):
    path = _yaml(tmp_path, {"name": "x", "inner": {"rate": 1, "steps": 2}, "rates": {"vision.stage5": 1e-4, "a": 3}})
    items = ["inner.rate=5e-4", "rates.vision.stage5=2e-4", "tags=[a, b]", "limit=7", "parts.p.rate=2"]
    config = Outer.from_yaml(path, items)
    assert config.inner == Inner(rate=5e-4, steps=2) and config.tags == ("a", "b") and config.limit == 7
    assert config.rates == {"vision.stage5": 2e-4, "a": 3.0} and config.parts == {"p": Inner(rate=2.0)}
    assert Outer.from_yaml(path, {"rates": {"llm": 1.0}}).rates == {"llm": 1.0}  # a mapping value replaces whole
    assert parse_overrides(["a.b=[1, 2]", "c= x=y "]) == {"a.b": [1, 2], "c": "x=y"}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            ["inner.rat=1"],
            r"^{f}: override inner\.rat=1: inner\.rat: unknown key; known keys: \['kind', 'rate', 'steps'\]$",
        ),
        (["name.first=1"], r"^{f}: override name\.first=1: name\.first: unknown key; known keys: \['flag', "),
        (["nope=1"], r"^{f}: override nope=1: nope: unknown key"),
        (["inner.rate=abc"], r"^{f}: override inner\.rate=abc: inner\.rate: Input should be a valid number"),
        (["sizes=[1, x]"], r"^{f}: override sizes=\[1, \"x\"\]: sizes\[1\]: Input should be a valid integer"),
        (["inner.rate=[1"], r"^{f}: override 'inner\.rate=\[1': the value is not valid YAML"),
        (["inner.rate"], r"^{f}: override 'inner\.rate': expected key=value$"),
        (["flag=1"], r"^{f}: override flag=1: flag: expected true or false \(got 1\)$"),
        (["inner.steps=yes"], r"^{f}: override inner\.steps=true: inner\.steps: expected a number, not true$"),
    ],
)
def test_bad_overrides_name_the_file_the_override_and_the_field(tmp_path, items, message):
    path = _yaml(tmp_path, {"name": "x", "inner": {"rate": 1}})
    with pytest.raises(ConfigLoadError, match=message.replace("{f}", re.escape(str(path)))):
        Outer.from_yaml(path, items)


def test_stage_yaml_errors_name_the_file_and_the_field(tmp_path):
    """The same on a shipped stage config: an unknown key, a wrong type, a bad override."""
    from jobs.train.config import StageConfig

    raw = yaml.safe_load(TINY_STAGE1.read_text())
    unknown, wrong = (
        _yaml(tmp_path, {**raw, "learning_rate": 1}, "a.yaml"),
        _yaml(tmp_path, {**raw, "lr": "x"}, "b.yaml"),
    )
    with pytest.raises(
        ConfigLoadError, match=rf"^{re.escape(str(unknown))}: learning_rate: unknown key; known keys: \["
    ):
        StageConfig.from_yaml(unknown)
    with pytest.raises(ConfigLoadError, match=rf"^{re.escape(str(wrong))}: lr: Input should be a valid number"):
        StageConfig.from_yaml(wrong)
    f = re.escape(str(TINY_STAGE1))
    with pytest.raises(ConfigLoadError, match=rf"^{f}: override lr=abc: lr: Input should be a valid number.*'abc'"):
        StageConfig.from_yaml(TINY_STAGE1, ["lr=abc"])
    with pytest.raises(
        ConfigLoadError, match=rf"^{f}: stage config 'stage1': lr_groups: 'llm' is not one of the trainable"
    ):
        StageConfig.from_yaml(TINY_STAGE1, ["lr_groups.llm=1"])  # a check across fields names the file and its field
    with pytest.raises(ConfigLoadError, match=rf"^{f}: override deepspeed\.stage=3: deepspeed\.stage: unknown key"):
        StageConfig.from_yaml(TINY_STAGE1, ["deepspeed.stage=3"])


def test_configs_are_frozen_and_replace_validates_a_copy():
    config = Outer(name="x", inner=Inner(rate=1))
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.name = "y"
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.inner.rate = 2
    changed = config.replace(**{"name": "y", "inner.steps": 3})
    assert (changed.name, changed.inner, config.name, config.inner.steps) == ("y", Inner(rate=1, steps=3), "x", 1)
    with pytest.raises(ConfigLoadError, match=r"^Outer\.replace: override inner\.steps=0: inner: steps: must be >= 1"):
        config.replace(**{"inner.steps": 0})
    with pytest.raises(ConfigLoadError, match=r"^Outer: inner\.rate: missing required key$"):
        Outer(name="x", inner={})


def test_round_trip_and_a_hash_that_only_the_content_changes():
    config = Outer.from_dict(
        {"name": "x", "inner": {"rate": 1}, "tags": ["a"], "rates": {"b": 2, "a": 1}, "parts": {"p": {"rate": 3}}}
    )
    plain = config.to_dict()
    assert plain["tags"] == ["a"] and plain["inner"] == {"rate": 1.0, "steps": 1, "kind": "a"}
    assert Outer.from_dict(plain) == config and Outer.from_dict(plain).config_hash() == config.config_hash()
    assert yaml.safe_load(config.to_yaml()) == plain
    reordered = Outer.from_dict({**plain, "rates": {"a": 1, "b": 2}})  # a mapping's key order is not content
    assert reordered.config_hash() == config.config_hash() == stable_hash(plain)
    assert len(config.config_hash()) == 16 and int(config.config_hash(), 16) >= 0
    assert config.replace(**{"rates.a": 1.5}).config_hash() != config.config_hash()


def test_every_shipped_config_loads():
    from jobs.dag.config import PipelineConfig
    from jobs.evaluate.suite import load_suite
    from jobs.train.config import StageConfig

    configs = sorted((ROOT / "jobs/configs").rglob("*.yaml"))
    shipped = ("demo.yaml", "cluster.yaml", "llava.yaml")
    pipelines = [p for p in configs if p.parent.name == "configs" and p.name in shipped]
    suites = [p for p in configs if p.parent.name == "suites"]
    stages = [p for p in configs if p not in pipelines and p not in suites]
    assert len(pipelines) == 3 and len(suites) == 2 and len(stages) == 7  # 3 paper, 3 tiny, quickstart
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
    from jobs.dag.config import PipelineConfig

    raw = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    cases = {
        "eval": ({**raw, "eval": {"suite": "demo", "limt": 3}}, r"demo\.yaml: eval\.limt: unknown key; known keys"),
        "demo_data": ({**raw, "demo_data": {"eval": 3}}, r"demo\.yaml: demo_data: demo data: eval must be even"),
        "preprocess": (
            {**raw, "preprocess": {"resolution": "x"}},
            r"demo\.yaml: preprocess\.resolution: Input should be a valid integer",
        ),
        "sources": (
            {**raw, "datasets": {"captions": {"sources": [{"name": "c"}]}}},
            r"datasets\.captions\.sources\[0\]\.annotations: missing required key\n"
            r".*datasets\.captions\.sources\[0\]\.image_root: missing required key",
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
            with pytest.raises(
                ConfigLoadError, match=r"demo\.yaml: stages\.stage2\.overrides: override lr=fast: lr: Input should be"
            ):
                PipelineConfig.from_yaml(path).stage_config("stage2", "shards", None)
            continue
        with pytest.raises(ConfigLoadError, match=message):
            PipelineConfig.from_yaml(path)


def _pipeline(tmp_path: Path, stages: dict, name: str = "shape.yaml") -> Path:
    raw = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**raw, "stages": stages}, sort_keys=False))
    return path


def test_a_pipeline_is_any_ordered_list_of_stages(tmp_path):
    """What a new user tries first: the demo without stage 2 and with stage 3 renamed `finetune`; LLaVA's two-stage
    recipe as shipped; the nodes, names and order follow the YAML."""
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
    from jobs.dag.config import PipelineConfig

    stage = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())["stages"]["stage1"]
    cases = [
        ({}, r"shape\.yaml: stages: give at least one stage"),
        ({"eval": stage}, r"stages\.eval: a stage name is a letter then .*neither 'preprocess' nor 'eval'"),
        ({"high res": stage}, r"stages\.high res: a stage name is a letter"),
        ({"s": {**stage, "init_from": "models:/convllava"}}, r"stages\.s\.init_from: a registered model is models:/"),
        ({"s": {**stage, "data": "nope"}}, r"stages\.s\.data: unknown dataset 'nope'"),
    ]
    for stages, message in cases:
        with pytest.raises(ConfigLoadError, match=message):
            PipelineConfig.from_yaml(_pipeline(tmp_path, stages))
    for init in ("models:/convllava/3", "models:/convllava@champion", "s3://b/ckpt", "/ckpt"):
        config = PipelineConfig.from_yaml(_pipeline(tmp_path, {"s": {**stage, "init_from": init}}))
        assert config.stages["s"].init_from == init
    with pytest.raises(ConfigLoadError, match=r"--from stage2: not a node of .* its nodes are preprocess, s, eval"):
        config.node("stage2")


def test_suite_errors_name_the_file_and_the_benchmark(tmp_path):
    from jobs.evaluate.suite import load_suite

    cases = {
        "a.yaml": (
            {"benchmarks": [{"kind": "demo", "annotation": "x.json"}]},
            r"benchmarks\[0\]\.annotation: unknown key",
        ),
        "b.yaml": ({"benchmarks": [{"kind": "dmeo"}]}, r"benchmarks\[0\]\.kind: unknown kind 'dmeo' \(kinds: \["),
        "c.yaml": ({"benchmarks": []}, r"benchmarks: no benchmarks"),
    }
    for name, (data, message) in cases.items():
        path = _yaml(tmp_path, data, name)
        with pytest.raises(ConfigLoadError, match=rf"^{re.escape(str(path))}: {message}"):
            load_suite(str(path))


def test_the_manifest_carries_a_typed_preprocess_config():
    import json

    from convllava.data.preprocess_config import PreprocessConfig
    from convllava.data.shards import Manifest, ManifestError

    config = PreprocessConfig(resolution=256, tokenization="llava")
    run = {"processed": 1, "reused": 0, "removed": 0, "resumed": 0, "seconds": 0.0}
    data = {k: None for k in Manifest.__dataclass_fields__} | {"config": config.to_dict(), "run": run}
    data |= {"sources": {}, "shards": []}
    manifest = Manifest.from_dict(data, "out/manifest.json")
    assert manifest.config == config and manifest.config.tokenization == "llava"
    assert json.loads(manifest.to_json())["config"] == config.to_dict()  # plain data only in the file
    legacy = {k: v for k, v in config.to_dict().items() if k != "tokenization"}  # written before the option
    assert Manifest.from_dict({**data, "config": legacy}).config.tokenization == "one_pass"
    with pytest.raises(ManifestError, match=r"^out/manifest\.json: config: resolutoin: unknown key.*re-run preprocess"):
        Manifest.from_dict({**data, "config": {"resolutoin": 256}}, "out/manifest.json")
