"""Measures one real training micro-batch's activation memory on the CPU, for the plan's tests to compare against.

    python tests/activation_probe.py SPEC_JSON   → prints {"forward_bytes": ..., "peak_bytes": ...}

SPEC: {"config": ConvLlavaConfig dict, "trainable": [...], "micro_batch_size": B, "seq_len": T,
"image_size": [H, W] or null, "gradient_checkpointing": bool}. The model is built with real fp32 weights, the batch
is B sequences whose first (H/64)·(W/64) tokens are the image placeholder, and forward + backward run through
`ConvLlavaForCausalLM.forward` as training does, twice: the second step is measured. Weight gradients are dropped as they are accumulated (they are
model states, planned apart). What is measured is the process's anonymous resident memory (RssAnon, sampled every
millisecond) above its value just before the forward; glibc is told to map every allocation over 64 KiB on its own
(MALLOC_MMAP_THRESHOLD_, set by the caller) so that freed activations leave the resident set at once.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise KeyError("RssAnon")


def main() -> None:
    from convllava.modeling.config import ConvLlavaConfig
    from convllava.modeling.model import ConvLlavaForCausalLM
    from convllava.modeling.trainable import set_trainable
    from convllava.processing.buckets import STRIDE

    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    config = ConvLlavaConfig.from_dict(spec["config"])
    model = ConvLlavaForCausalLM(config).train()
    set_trainable(model, spec["trainable"])
    if spec["gradient_checkpointing"]:
        model.activation_checkpointing_enable()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda param: setattr(param, "grad", None))
    b, t, size = spec["micro_batch_size"], spec["seq_len"], spec["image_size"]
    n_visual = 0 if size is None else (size[0] // STRIDE) * (size[1] // STRIDE)
    ids = torch.randint(5, config.text_config.vocab_size, (b, t))
    ids[ids == config.image_token_id] = 5
    ids[:, :n_visual] = config.image_token_id
    labels = ids.clone()
    labels[:, :n_visual] = -100
    pixels = None if size is None else torch.randn(b, 3, *size)

    def step():
        return model(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, labels=labels, use_cache=False
        )

    # The same step once, unmeasured: a first step also allocates what stays for the process's lifetime (oneDNN
    # primitives and their scratchpads, sized by the CPU's kernels and the inputs; lazily imported modules), which is
    # not activation memory and differs from one CPU to another.
    step().loss.backward()
    baseline, peak, done = _rss_anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = step()
    forward = _rss_anon() - baseline
    out.loss.backward()
    done.set()
    sampler.join()
    print(json.dumps({"forward_bytes": forward, "peak_bytes": max(peak[0], _rss_anon()) - baseline}))


if __name__ == "__main__":
    main()
