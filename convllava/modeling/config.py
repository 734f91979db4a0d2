"""`ConvLlavaConfig`: vision tower + projector + any Hugging Face causal LM, and the named presets."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from convllava.processing.buckets import check_resolution
from convllava.processing.image_processing import MODES

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


class ConvLlavaConfig(PreTrainedConfig):
    """Configuration of a ConvLLaVA model.

    Args:
        text_config: any Hugging Face causal-LM config (object or dict with `model_type`).
        vision_depths / vision_dims: the 4-stage timm ConvNeXt trunk (CLIP ConvNeXt-L: 3,3,27,3 / 192..1536).
        vision_stage5_depth / vision_stage5_dim: ConvLLaVA's added fifth stage (6 blocks of width 3072).
        vision_ls_init_value: layer-scale init of the ConvNeXt blocks.
        vision_drop_path_rate: stochastic depth in the tower (0 for fine-tuning, as in the paper).
        projector_type: `mlp2x_gelu` (Linear, GELU, Linear) or `linear`.
        image_token_id: id of the `<image>` placeholder. It may lie outside the LM's vocabulary (released
            LLaVA checkpoints have 32000 rows and `<image>` = 32000): placeholders never reach the embedding.
        image_resolution / image_mode: the input the model was trained on; the processor's defaults.
        template: the conversation template the model was trained with.
        attn_implementation: passed to the LM (`sdpa`, `eager`, `flash_attention_2`).

    Raises:
        ValueError: naming the first invalid field.
    """

    model_type = "convllava"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vision_depths: list[int] | tuple[int, ...] = (3, 3, 27, 3)
    vision_dims: list[int] | tuple[int, ...] = (192, 384, 768, 1536)
    vision_stage5_depth: int = 6
    vision_stage5_dim: int = 3072
    vision_ls_init_value: float = 1e-6
    vision_drop_path_rate: float = 0.0
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = 32000
    image_resolution: int = 768
    image_mode: str = "bucket"
    template: str = "vicuna_v1"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.vision_depths = list(self.vision_depths)
        self.vision_dims = list(self.vision_dims)
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True
        self.validate_fields()

    def validate_fields(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"ConvLlavaConfig.{field}: {why}")

        for name in ("vision_depths", "vision_dims"):
            value = getattr(self, name)
            if len(value) != 4 or not all(isinstance(v, int) and v > 0 for v in value):
                fail(name, f"need 4 positive integers (one per trunk stage), got {value}")
        if not (isinstance(self.vision_stage5_depth, int) and self.vision_stage5_depth > 0):
            fail("vision_stage5_depth", f"must be a positive integer, got {self.vision_stage5_depth}")
        if not (isinstance(self.vision_stage5_dim, int) and self.vision_stage5_dim > 0):
            fail("vision_stage5_dim", f"must be a positive integer, got {self.vision_stage5_dim}")
        if not 0.0 <= self.vision_drop_path_rate < 1.0:
            fail("vision_drop_path_rate", f"must be in [0, 1), got {self.vision_drop_path_rate}")
        if self.projector_type not in PROJECTOR_TYPES:
            fail("projector_type", f"must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if not (isinstance(self.image_token_id, int) and self.image_token_id >= 0):
            fail("image_token_id", f"must be a non-negative integer, got {self.image_token_id}")
        try:
            check_resolution(self.image_resolution)
        except ValueError as e:
            fail("image_resolution", str(e))
        if self.image_mode not in MODES:
            fail("image_mode", f"must be one of {MODES}, got {self.image_mode!r}")
        for attr in ("hidden_size", "vocab_size"):
            if not getattr(self.text_config, attr, None):
                fail("text_config", f"{type(self.text_config).__name__} has no {attr}; is it a causal-LM config?")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ConvLlavaConfig:
        """A named configuration: `tiny`, `convllava-768`, `convllava-1024`, `convllava-1536`.

        `overrides` replace top-level fields (e.g. `attn_implementation="eager"`).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs["text_config"] = LlamaConfig(**kwargs["text_config"])
        kwargs.update(overrides)
        return cls(**kwargs)


# The documented extension point, so Auto* classes (tokenizer loading from a checkpoint directory,
# lmms-eval, pipelines) recognise `"model_type": "convllava"`.
AutoConfig.register(ConvLlavaConfig.model_type, ConvLlavaConfig, exist_ok=True)

# Vicuna-7B v1.5 (Llama-2 7B shape), as in the paper.
_VICUNA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _paper_preset(resolution: int) -> dict[str, Any]:
    return dict(text_config=_VICUNA_7B, image_resolution=resolution, image_mode="square", image_token_id=32000)


PRESETS: dict[str, dict[str, Any]] = {
    "convllava-768": _paper_preset(768),
    "convllava-1024": _paper_preset(1024),
    "convllava-1536": _paper_preset(1536),
    # Seconds on a CPU: for tests and the demo. Pairs with the tokenizer shipped in convllava/assets.
    "tiny": dict(
        text_config=dict(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        vision_depths=(1, 1, 1, 1),
        vision_dims=(16, 32, 64, 96),
        vision_stage5_depth=1,
        vision_stage5_dim=128,
        image_token_id=4,
        image_resolution=256,
        image_mode="bucket",
    ),
}
