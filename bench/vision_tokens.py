"""Visual tokens, forward GFLOPs and parameters: ConvLLaVA's 5-stage ConvNeXt tower vs a CLIP ViT-L/14 tower.

For each resolution R in 768, 1024, 1536 it measures, at batch 1 and an R×R input:

- ours: `convllava.modeling.vision.ConvNeXtTower()` with its paper-size defaults (CLIP ConvNeXt-L trunk, depths 3,3,27,3,
  dims 192,384,768,1536, plus the fifth stage of 6 blocks × 3072). Tokens = (R/64)² (`num_visual_tokens`).
- ViT-L/14: timm `vit_large_patch14_clip_224` with random init, `img_size` set to R (or, where R is not a multiple
  of 14, the largest multiple of 14 below it, e.g. 1526 for 1536). Tokens = (img_size/14)² patch tokens.

plus one reference row: ViT-L/14 at 336 (LLaVA-1.5, 576 tokens), and the ViT/ours ratios of GFLOPs and tokens.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts only matrix products and convolutions
(mm, addmm, bmm, baddbmm, convolution, SDPA kernels) and counts one multiply-add as 2 FLOPs; norms, activations,
softmax, residual adds and layer scale are not counted. GFLOPs = FLOPs / 1e9. Models and inputs are built on the
meta device, so nothing is allocated or computed; before measuring, the script asserts that meta and real CPU
tensors give the same count on small cases (ours at 256², ViT-L/14 at 224²). Attention runs under the math SDPA
backend while counting: on CPU, PyTorch's default fused kernel (`_scaled_dot_product_flash_attention_for_cpu`)
has no FlopCounterMode formula and its attention matmuls would silently go uncounted.

Run (about 20–25 s on 2 CPU cores, nearly all of it the real-tensor sanity check):

    .venv/bin/python bench/vision_tokens.py [--out bench/results/vision_tokens.json]

It prints a markdown table and writes the same rows (with a per-op FLOP breakdown) as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from convllava.modeling.vision import ConvNeXtTower
from convllava.processing.buckets import num_visual_tokens

RESOLUTIONS = (768, 1024, 1536)
VIT_NAME = "vit_large_patch14_clip_224"
VIT_PATCH = 14
REFERENCE_VIT_SIZE = 336  # LLaVA-1.5's CLIP ViT-L/14-336
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "vision_tokens.json"


def build_ours() -> nn.Module:
    return ConvNeXtTower()


def build_vit(img_size: int) -> nn.Module:
    return timm.create_model(VIT_NAME, pretrained=False, img_size=img_size, num_classes=0)


def vit_size(resolution: int) -> int:
    """Largest multiple of the patch size not above `resolution`."""
    return resolution // VIT_PATCH * VIT_PATCH


def vit_tokens(img_size: int) -> int:
    if img_size % VIT_PATCH:
        raise ValueError(f"ViT input {img_size} is not a multiple of the patch size {VIT_PATCH}")
    return (img_size // VIT_PATCH) ** 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _instantiate(build: Callable[[], nn.Module], device: str) -> nn.Module:
    """Build on meta (no allocation, no init); for a real device, allocate and fill with zeros (values don't matter)."""
    with torch.device("meta"):
        model = build().eval()
    if device != "meta":
        model = model.to_empty(device=device)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.zero_()
    return model


def count_flops(build: Callable[[], nn.Module], size: int, device: str = "meta") -> dict:
    """Forward FLOPs of `build()` on a (1, 3, size, size) input; falls back to CPU if an op has no meta kernel."""
    try:
        model = _instantiate(build, device)
        x = torch.zeros(1, 3, size, size, device=device)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    except (NotImplementedError, RuntimeError) as exc:
        if device != "meta":
            raise
        print(f"note: meta device failed ({type(exc).__name__}: {exc}); counting on real CPU tensors", file=sys.stderr)
        return count_flops(build, size, device="cpu")
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return {
        "flops": int(counter.get_total_flops()),
        "by_op": by_op,
        "counted_on": device,
        "params": count_params(model),
    }


def sanity_check() -> list[dict]:
    """Meta-device counts must equal real-CPU counts on small cases."""
    cases = [("ours", build_ours, 256), ("ViT-L/14", lambda: build_vit(224), 224)]
    checks = []
    for name, build, size in cases:
        meta = count_flops(build, size, "meta")
        cpu = count_flops(build, size, "cpu")
        assert meta["counted_on"] == "meta", f"{name}: meta counting fell back to CPU"
        assert meta["flops"] == cpu["flops"], f"{name} at {size}: meta {meta['flops']} != cpu {cpu['flops']} FLOPs"
        assert meta["by_op"] == cpu["by_op"], f"{name} at {size}: per-op counts differ: {meta['by_op']} {cpu['by_op']}"
        checks.append({"model": name, "input": size, "flops": meta["flops"], "meta_equals_cpu": True})
    return checks


def measure() -> list[dict]:
    rows = []
    for resolution in RESOLUTIONS:
        ours = count_flops(build_ours, resolution)
        ours_tokens = num_visual_tokens(resolution, resolution)
        rows.append(_row("ConvLLaVA ConvNeXt-L + stage 5 (ours)", resolution, resolution, ours_tokens, ours, ""))
        size = vit_size(resolution)
        vit = count_flops(lambda size=size: build_vit(size), size)
        note = "" if size == resolution else f"{resolution} is not a multiple of 14; ViT input {size}×{size}"
        row = _row("CLIP ViT-L/14", resolution, size, vit_tokens(size), vit, note)
        row["gflops_ratio_vit_over_ours"] = vit["flops"] / ours["flops"]
        row["tokens_ratio_vit_over_ours"] = row["visual_tokens"] / ours_tokens
        rows.append(row)
    size = REFERENCE_VIT_SIZE
    ref = count_flops(lambda: build_vit(size), size)
    rows.append(_row("CLIP ViT-L/14 (LLaVA-1.5 reference)", size, size, vit_tokens(size), ref, "reference row"))
    return rows


def _row(model: str, resolution: int, input_size: int, tokens: int, result: dict, notes: str) -> dict:
    return {
        "model": model,
        "resolution": resolution,
        "input": f"{input_size}x{input_size}",
        "visual_tokens": tokens,
        "gflops": result["flops"] / 1e9,
        "flops": result["flops"],
        "flops_by_op": result["by_op"],
        "params_m": result["params"] / 1e6,
        "params": result["params"],
        "counted_on": result["counted_on"],
        "gflops_ratio_vit_over_ours": None,
        "tokens_ratio_vit_over_ours": None,
        "notes": notes,
    }


def markdown_table(rows: list[dict]) -> str:
    header = ["model", "R", "input", "visual tokens", "GFLOPs", "params (M)", "GFLOPs ViT/ours", "tokens ViT/ours"]
    header.append("notes")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    for r in rows:
        cells = [
            r["model"],
            str(r["resolution"]),
            r["input"].replace("x", "×"),
            f"{r['visual_tokens']:,}",
            f"{r['gflops']:,.1f}",
            f"{r['params_m']:,.1f}",
            ratio(r["gflops_ratio_vit_over_ours"]),
            ratio(r["tokens_ratio_vit_over_ours"]),
            r["notes"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path (default: %(default)s)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    checks = sanity_check()
    rows = measure()
    elapsed = time.perf_counter() - start

    print(markdown_table(rows))
    print()
    print(
        "GFLOPs = FLOPs / 1e9 from torch.utils.flop_counter.FlopCounterMode, forward pass, batch 1; a multiply-add "
        "counts as 2 FLOPs. Only matmuls and convolutions are counted (not norms, activations, softmax, adds)."
    )
    print(
        "Models and inputs on the meta device; sanity check passed: meta == real CPU counts for "
        + ", ".join(f"{c['model']} at {c['input']}² ({c['flops'] / 1e9:.1f} GFLOPs)" for c in checks)
        + f". Took {elapsed:.1f} s."
    )

    payload = {
        "description": __doc__.splitlines()[0],
        "flop_convention": "FlopCounterMode: 1 multiply-add = 2 FLOPs; GFLOPs = FLOPs / 1e9; forward, batch 1",
        "counted_ops": "matmul (mm/addmm/bmm/baddbmm), convolution, SDPA (math backend -> bmm); no elementwise ops",
        "vit_model": VIT_NAME,
        "vit_tokens": "patch tokens (img_size/14)^2, CLS token excluded",
        "sanity_checks": checks,
        "rows": rows,
        "environment": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
