"""Activation memory of one training micro-batch, measured without memory: the model runs on fake tensors.

`measure_activations` builds the model on the meta device, swaps every parameter for a `FakeTensor` (shapes and
dtypes, no storage), and runs one forward and backward of a micro-batch of the given geometry under torch's `MemTracker`,
which counts the bytes of every tensor storage while it is alive. What it reports is what autograd really keeps:
frozen parts save nothing, gradient checkpointing keeps each layer's input and recomputes the rest in backward,
the loss keeps its float32 log-softmax. Weights and their gradients are not counted (a gradient is dropped the
moment it is accumulated, as ZeRO moves it into its buckets); they are model states, planned separately.

Attention is counted the way the fused kernels (flash-attn, sdpa's flash / memory-efficient backends) hold it:
the output and one float32 log-sum-exp per query row, never the T×T matrix. Fake tensors would otherwise take
sdpa's math path and count that matrix, which no GPU run holds. `attention="eager"` counts the eager path.

A 7B model at 1536² and 2048 tokens measures in about ten seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.modeling.trainable import set_trainable
from convllava.processing.buckets import STRIDE

FUSED_ATTENTION = "convllava_fused_attention_plan"


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes of one micro-batch's activations.

    forward_bytes: alive when forward ends (what backward will read, plus the loss's own buffers).
    peak_bytes: the most alive at once over forward and backward (recomputation and gradients of activations).
    """

    forward_bytes: int
    peak_bytes: int


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and a float32 log-sum-exp per row."""

    @staticmethod
    def forward(ctx, query, key, value):  # (B, H, T, D) each, key/value possibly with fewer heads
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_attention_plan(module, query, key, value, attention_mask, **kwargs):
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


def _register_fused_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FUSED_ATTENTION, _fused_attention_plan)


def fake_model(config: ConvLlavaConfig, dtype: torch.dtype) -> tuple[ConvLlavaForCausalLM, object]:
    """The model with every parameter and buffer a FakeTensor of its real shape and `dtype`, and the fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model = ConvLlavaForCausalLM(config)
    model = model.to(dtype)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)
    return model, mode


def measure_activations(
    config: ConvLlavaConfig,
    trainable: tuple[str, ...] | list[str],
    *,
    micro_batch_size: int,
    seq_len: int,
    image_size: tuple[int, int] | None,
    dtype: torch.dtype,
    gradient_checkpointing: bool,
    attention: str = "fused",
) -> ActivationMemory:
    """Activation bytes of one training micro-batch: `micro_batch_size` sequences of `seq_len` tokens, each with one
    image of `image_size` (H, W) whose visual tokens lead the sequence (None: text only).

    Args:
        trainable: the stage's trainable groups (`convllava.modeling.trainable`); frozen parts save no activations.
        attention: "fused" (flash-attn / sdpa's fused backends) or "eager" (the T×T matrix is kept).
    """
    if attention not in ("fused", "eager"):
        raise ValueError(f"attention must be 'fused' or 'eager', got {attention!r}")
    n_visual = 0 if image_size is None else (image_size[0] // STRIDE) * (image_size[1] // STRIDE)
    if seq_len <= n_visual:
        raise ValueError(f"seq_len {seq_len} must exceed the image's {n_visual} visual tokens")
    if attention == "fused":
        _register_fused_attention()
    config = ConvLlavaConfig.from_dict(config.to_dict())  # a copy: the attention switch stays local
    config.text_config._attn_implementation = FUSED_ATTENTION if attention == "fused" else "eager"
    model, mode = fake_model(config, dtype)
    model.train()
    set_trainable(model, list(trainable))
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda param: setattr(param, "grad", None))
    with mode:
        ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
        mask = torch.ones_like(ids)
        pixels = (
            None if image_size is None else torch.zeros(micro_batch_size, 3, *image_size, dtype=dtype, device="meta")
        )
        inputs = [t for t in (ids, mask, pixels) if t is not None]
        tracker = _tracker()  # torch's storage-level tracker; weights and the inputs are "external", not counted
        tracker.track_external(model, *inputs)
        with tracker:
            start = _total(tracker, "current")
            embeds = model.get_input_embeddings()(ids)
            if pixels is not None:  # the placeholders' positions, as `embed_inputs` scatters them (no data reads)
                features = model.get_image_features(pixels).view(micro_batch_size, n_visual, -1)
                embeds = torch.cat([features.to(embeds.dtype), embeds[:, n_visual:]], dim=1)
            # The output stays alive through backward, its logits with it, as in the training loop
            # (`out = engine(...); engine.backward(out.loss)`).
            out = model.language_model(inputs_embeds=embeds, attention_mask=mask, labels=ids, use_cache=False)
            forward = _total(tracker, "current") - start
            out.loss.backward()
        peak = _total(tracker, "peak") - start
    return ActivationMemory(forward_bytes=forward, peak_bytes=peak)


def _tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """MemTracker that also takes frozen weights (it hooks every weight's gradient, which frozen ones refuse).
        A weight's gradient is then counted as the temporary it is: dropped as soon as it is accumulated."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        def _update_peak_stats(self, peak_state) -> None:
            # Only the process-wide peak: the per-module peaks MemTracker also keeps cost a walk over every module
            # per operator (minutes for a 7B model), and the plan reads none of them.
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return Tracker()


def _total(tracker, kind: str) -> int:
    return int(sum(per_device["Total"] for per_device in tracker.get_tracker_snapshot(kind).values()))


def largest_layer_params(model: nn.Module) -> int:
    """Parameters held directly by the largest single module (what ZeRO-3 gathers at once, DeepSpeed's estimator)."""
    return max(
        (sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters(recurse=False)) for m in model.modules()),
        default=0,
    )
