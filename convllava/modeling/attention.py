"""Which attention kernel a model runs with: flash-attn where it imports and the device can run it, else sdpa.

The paper configs ask for `flash_attention_2`; on a machine without flash-attn (or without an Ampere-or-newer GPU)
transformers raises at model construction. `resolve_attn_implementation` turns that request into `sdpa` instead and
says why (`attention_unavailable`), so the same YAML trains on any machine and the run records what it used.
"""

from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger(__name__)

FLASH = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
FALLBACK = "sdpa"


def attention_unavailable(requested: str | None, device: torch.device | str | None = None) -> str | None:
    """Why `requested` cannot run on `device` (None: it can). `device` None means the current CUDA device if any."""
    if requested not in FLASH:
        return None
    try:
        importlib.import_module(FLASH[requested])
    except Exception as e:  # noqa: BLE001 - a broken install (ABI mismatch) is as unusable as a missing one
        return f"{FLASH[requested]} does not import ({type(e).__name__}: {e})"
    device = torch.device(device) if device is not None else None
    if device is None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return f"it needs a CUDA device, this worker computes on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"it needs compute capability >= 8.0, {torch.cuda.get_device_name(device)} has {major}.{minor}"
    return None


def resolve_attn_implementation(requested: str | None, device: torch.device | str | None = None) -> str | None:
    """`requested` when it can run on `device`, else `sdpa` (logged with the reason). None stays None (the default)."""
    why = attention_unavailable(requested, device)
    if why is None:
        return requested
    log.warning("attention: %s requested, using %s: %s", requested, FALLBACK, why)
    return FALLBACK
