"""ConvLlavaForCausalLM: ConvNeXt tower → projector → any Hugging Face causal LM.

The processor expands each `<image>` into as many `image_token_id` placeholders as the image has visual
tokens ((H/64)·(W/64)); the model runs the tower, projects the features to the LM's width and scatters
them into those placeholder positions, in order. Every other token goes through the LM's embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from convllava.modeling.config import ConvLlavaConfig
from convllava.processing.buckets import STRIDE


def build_projector(projector_type: str, vision_dim: int, text_dim: int) -> nn.Module:
    """LLaVA's projectors. `mlp2x_gelu` keeps LLaVA's module indices (0 and 2) so released weights map 1:1."""
    if projector_type == "mlp2x_gelu":
        projector = nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
    elif projector_type == "linear":
        projector = nn.Linear(vision_dim, text_dim)
    else:
        raise ValueError(f"unknown projector_type {projector_type!r}")
    for module in projector.modules():
        if isinstance(module, nn.Linear):
            module._convllava_projector = True  # ConvLlavaPreTrainedModel._init_weights: fan-in init
    return projector


class ConvLlavaPreTrainedModel(PreTrainedModel):
    config_class = ConvLlavaConfig
    config: ConvLlavaConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        from timm.models.convnext import ConvNeXtBlock

        super()._init_weights(module)
        # timm's layer scale is a bare parameter the generic initializer does not know.
        if isinstance(module, ConvNeXtBlock) and module.gamma is not None:
            init.constant_(module.gamma, self.config.vision_ls_init_value)
        # The projector keeps the tower's feature scale (fan-in init) rather than the LM's `initializer_range`:
        # with std 0.02 a narrow projector's visual tokens are too small next to text embeddings to be learnt from.
        if isinstance(module, nn.Linear) and getattr(module, "_convllava_projector", False):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)


class ConvLlavaForCausalLM(ConvLlavaPreTrainedModel, GenerationMixin):
    """ConvNeXt tower (with the fifth stage) → MLP projector → any causal LM.

    The processor expands each `<image>` into (H/64)·(W/64) placeholder tokens; `forward` scatters the projected
    visual features into those positions and raises with both counts when they differ. Loads with transformers'
    `AutoModelForCausalLM` / `AutoModelForImageTextToText` after `import convllava`.
    """

    def __init__(self, config: ConvLlavaConfig) -> None:
        from convllava.modeling.vision import (
            ConvNeXtTower,  # timm, imported where a model is built (not by `import convllava`)
        )

        super().__init__(config)
        self.vision_tower = ConvNeXtTower(
            depths=tuple(config.vision_depths),
            dims=tuple(config.vision_dims),
            stage5_depth=config.vision_stage5_depth,
            stage5_dim=config.vision_stage5_dim,
            ls_init_value=config.vision_ls_init_value,
            drop_path_rate=config.vision_drop_path_rate,
        )
        self.projector = build_projector(
            config.projector_type, config.vision_stage5_dim, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # --- embeddings / heads delegate to the LM, so resize_token_embeddings and tying work as usual
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        # transformers switches the LM's layers; the timm tower has its own switch.
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        self.vision_tower.set_grad_checkpointing(enable)

    def get_image_features(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Projected visual tokens of all images, concatenated in image order: (sum_i N_i, D_lm).

        `pixel_values` is a (B, 3, H, W) tensor or a list of (3, H, W) tensors of any stride-aligned sizes;
        images of equal size go through the tower together.
        """
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.ndim != 4:
                raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
            features = self.vision_tower(pixel_values.to(self.dtype))  # (B, N, C5)
            return self.projector(features).flatten(0, 1)  # (B·N, D)
        if not pixel_values:
            raise ValueError("pixel_values is an empty list")
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(pixel_values):
            if image.ndim != 3:
                raise ValueError(f"pixel_values[{i}] must be (3, H, W), got shape {tuple(image.shape)}")
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        per_image: list[torch.Tensor | None] = [None] * len(pixel_values)
        for indices in by_size.values():
            batch = torch.stack([pixel_values[i] for i in indices]).to(self.dtype)
            projected = self.projector(self.vision_tower(batch))  # (b, N, D)
            for j, i in enumerate(indices):
                per_image[i] = projected[j]
        return torch.cat(per_image, dim=0)

    def embed_inputs(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | Sequence[torch.Tensor] | None
    ) -> torch.Tensor:
        """LM input embeddings with image features scattered into the placeholder positions."""
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        # Placeholders may lie outside the LM's vocabulary; their embeddings are overwritten anyway.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        n_placeholders = int(image_mask.sum())
        if pixel_values is None:
            if n_placeholders:
                raise ValueError(
                    f"input_ids hold {n_placeholders} image placeholder tokens (id {self.config.image_token_id}) "
                    "but no pixel_values were given"
                )
            if self.training and torch.is_grad_enabled():
                # Data-parallel training needs every rank to run the same modules on every micro-batch: ZeRO-3
                # gathers the tower's and projector's parameters with collectives, and gradient reduction expects
                # a gradient for every trainable parameter. A text-only batch therefore runs one blank
                # STRIDE×STRIDE image (one visual token) through tower and projector and adds it times zero. It
                # stays inside forward: run from the recipe after the engine's forward, ZeRO-3 ranks desynchronise.
                blank = torch.zeros(1, 3, STRIDE, STRIDE, dtype=self.dtype, device=inputs_embeds.device)
                inputs_embeds = inputs_embeds + 0.0 * self.get_image_features(blank).sum().to(inputs_embeds.dtype)
            return inputs_embeds
        features = self.get_image_features(pixel_values)  # (N_total, D)
        if n_placeholders != features.shape[0]:
            raise ValueError(
                f"image features and image tokens do not match: input_ids hold {n_placeholders} placeholder "
                f"tokens but the images give {features.shape[0]} visual tokens"
            )
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Args:
        input_ids: (B, T) token ids, each image expanded into its placeholders.
        pixel_values: (B_img, 3, H, W) or a list of (3, H, W); images in the order their placeholders appear.
        labels: (B, T), -100 where no loss is taken (the processor masks all but assistant replies).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values cannot be combined with inputs_embeds; embed the images first")
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component: trunk (stages 1–4 + stem), stage 5, projector, LM."""
        tower = self.vision_tower
        stage5 = sum(p.numel() for p in tower.stage5.parameters())
        return {
            "vision_trunk": sum(p.numel() for p in tower.parameters()) - stage5,
            "vision_stage5": stage5,
            "projector": sum(p.numel() for p in self.projector.parameters()),
            "language_model": sum(p.numel() for p in self.language_model.parameters()),
        }

    @classmethod
    def from_llava_checkpoint(cls, path, **kwargs) -> ConvLlavaForCausalLM:
        """Load a released ConvLLaVA checkpoint (LLaVA layout); see `convllava.modeling.llava_checkpoint`."""
        from convllava.modeling.llava_checkpoint import from_llava_checkpoint  # that module imports this one

        model, _ = from_llava_checkpoint(path, **kwargs)
        return model


# Both Auto classes a user may reach for: a causal LM that also reads images.
AutoModelForCausalLM.register(ConvLlavaConfig, ConvLlavaForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(ConvLlavaConfig, ConvLlavaForCausalLM, exist_ok=True)
