"""The vision tower: a timm ConvNeXt trunk plus ConvLLaVA's added fifth stage (total stride 64).

The paper compresses visual tokens by one more stage of the hierarchy instead of pooling: stage 5 is
a 2×2 stride-2 downsample (LayerNorm, Conv) from 1536 to 3072 channels followed by 6 ConvNeXt blocks.
The tokens are the last stage's feature map flattened row-major, with no final norm.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

from convllava.processing.buckets import STRIDE, check_size

# Importing timm imports wandb when it is installed (`timm.utils.summary`'s optional run logging, a helper of timm's
# training scripts that we never call): 1.3 s of CPU in every process that builds a model, each training worker
# included. wandb is kept out of timm's import only; importing it afterwards works as usual.
_WANDB_UNSET = "wandb" not in sys.modules
if _WANDB_UNSET:
    sys.modules["wandb"] = None  # `import wandb` raises ImportError, which timm catches
try:
    from timm.layers import LayerNorm, LayerNorm2d
    from timm.models.convnext import ConvNeXt, ConvNeXtStage
finally:
    if _WANDB_UNSET and sys.modules.get("wandb", 0) is None:
        del sys.modules["wandb"]


class ConvNeXtTower(nn.Module):
    """ConvNeXt with five stages. `forward` maps (B, 3, H, W) to (B, H/64 · W/64, dims[-1]) tokens."""

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 27, 3),
        dims: tuple[int, ...] = (192, 384, 768, 1536),
        stage5_depth: int = 6,
        stage5_dim: int = 3072,
        ls_init_value: float = 1e-6,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"the timm trunk has 4 stages: got depths={depths}, dims={dims}")
        # timm builds the (CLIP ConvNeXt-L shaped) 4-stage trunk; the classifier head is dropped.
        self.model = ConvNeXt(
            depths=tuple(depths),
            dims=tuple(dims),
            num_classes=0,
            global_pool="",
            ls_init_value=ls_init_value,
            drop_path_rate=drop_path_rate,
        )
        self.model.reset_classifier(0, "", reset_other=True)
        # ConvLLaVA's fifth stage is an ordinary timm ConvNeXt stage with a 2×2 stride-2 downsample,
        # appended to the trunk's stage list so that timm's forward, gradient checkpointing and
        # forward_intermediates cover it like any other stage.
        self.model.stages.append(
            ConvNeXtStage(
                dims[-1],
                stage5_dim,
                stride=2,
                depth=stage5_depth,
                drop_path_rates=[drop_path_rate] * stage5_depth,
                ls_init_value=ls_init_value,
                norm_layer=LayerNorm2d,
                norm_layer_cl=LayerNorm,
            )
        )
        self.model.feature_info.append(dict(num_chs=stage5_dim, reduction=STRIDE, module="stages.4"))
        self.model.num_features = self.model.head_hidden_size = stage5_dim
        self.hidden_size = stage5_dim

    @property
    def trunk_stages(self) -> nn.Sequential:
        return self.model.stages[:4]

    @property
    def stage5(self) -> nn.Module:
        return self.model.stages[4]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, C5, H/64, W/64) feature map of the last stage."""
        check_size(pixel_values.shape[-2], pixel_values.shape[-1])
        return self.model.forward_features(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(pixel_values)  # (B, C5, h, w)
        return features.flatten(2).transpose(1, 2)  # (B, h·w, C5), row-major


# Hugging Face ConvNextModel key → timm ConvNeXt key (both with 5 stages). Ordered; first match wins.
_HF_TO_TIMM = [
    (r"^embeddings\.patch_embeddings\.(weight|bias)$", r"stem.0.\1"),
    (r"^embeddings\.layernorm\.(weight|bias)$", r"stem.1.\1"),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(weight|bias)$", r"stages.\1.downsample.\2.\3"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.(weight|bias)$", r"stages.\1.blocks.\2.conv_dw.\3"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(weight|bias)$", r"stages.\1.blocks.\2.norm.\3"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc1.\3"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc2.\3"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
]
# Keys of the HF model that the tower does not use: the pooled-output LayerNorm (ConvLLaVA takes the
# last stage's map before any norm) and a classifier head if the checkpoint has one.
_HF_UNUSED = re.compile(r"^(layernorm|classifier|pooler)\.")
_HF_PREFIXES = ("model.vision_tower.vision_tower.", "vision_tower.vision_tower.", "vision_tower.", "convnext.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face `ConvNextModel` state dict (ConvLLaVA's released towers) onto `ConvNeXtTower.model`.

    Accepts keys with or without the usual prefixes (`convnext.`, LLaVA's `model.vision_tower.vision_tower.`).
    Already-timm keys pass through unchanged.

    Raises:
        KeyError: a key that is neither a known HF ConvNext key nor a timm key, named in the message.
    """
    out = {}
    for key, value in state_dict.items():
        k = key
        for prefix in _HF_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        if _HF_UNUSED.match(k):
            continue
        if k.startswith(("stem.", "stages.")):
            out[k] = value
            continue
        for pattern, repl in _HF_TO_TIMM:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = value
                break
        else:
            raise KeyError(f"vision tower checkpoint key {key!r} is not a ConvNext key this loader knows")
    return out
