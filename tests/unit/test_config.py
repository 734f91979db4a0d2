import pytest
import torch

from convllava.modeling.config import PRESETS, ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.modeling.vision import ConvNeXtTower


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_validates(name):
    config = ConvLlavaConfig.from_preset(name)
    assert config.text_config.model_type == "llama"
    assert config.vision_stage5_dim == (128 if name == "tiny" else 3072)


@pytest.mark.parametrize("name", ["convllava-768", "convllava-1024", "convllava-1536"])
def test_paper_presets_have_the_papers_parameter_counts(name):
    with torch.device("meta"):  # shapes only: nothing of the 7B model is allocated
        model = ConvLlavaForCausalLM(ConvLlavaConfig.from_preset(name))
    counts = model.parameter_counts()
    assert counts["vision_trunk"] == pytest.approx(196e6, rel=0.01)
    assert counts["vision_stage5"] == pytest.approx(473e6, rel=0.01)
    assert counts["projector"] == 3072 * 4096 + 4096 + 4096 * 4096 + 4096
    assert counts["language_model"] == pytest.approx(6.74e9, rel=0.01)


@pytest.mark.parametrize(
    ("h", "w", "tokens"), [(768, 768, 144), (1024, 1024, 256), (1536, 1536, 576), (1536, 2048, 768)]
)
def test_full_size_tower_emits_the_papers_token_counts(h, w, tokens):
    with torch.device("meta"):
        tower = ConvNeXtTower()
        out = tower(torch.empty(1, 3, h, w))
    assert tuple(out.shape) == (1, tokens, 3072)


def test_tower_refuses_sizes_off_the_stride():
    tower = ConvNeXtTower(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), stage5_depth=1, stage5_dim=8)
    with pytest.raises(ValueError, match="200x256.*multiple of the vision tower's stride 64"):
        tower(torch.zeros(1, 3, 200, 256))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("projector_type", "mlp3x", "projector_type"),
        ("vision_depths", [3, 3, 27], "vision_depths"),
        ("image_resolution", 700, "image_resolution"),
        ("image_mode", "crop", "image_mode"),
        ("vision_stage5_dim", 0, "vision_stage5_dim"),
        ("image_token_id", -1, "image_token_id"),
    ],
)
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=f"ConvLlavaConfig.{message}"):
        ConvLlavaConfig.from_preset("tiny", **{field: value})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ConvLlavaConfig.from_preset("huge")


def test_config_round_trips_through_json(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = ConvLlavaConfig.from_pretrained(tmp_path)
    assert loaded.vision_dims == tiny_config.vision_dims
    assert loaded.text_config.hidden_size == tiny_config.text_config.hidden_size
    assert loaded.image_token_id == 4 and loaded.template == "vicuna_v1"
