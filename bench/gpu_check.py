"""GPU check of the model library: bf16 + sdpa on CUDA, the paper-size tower, and the 7B preset end to end.

Run on a machine with one GPU (the CPU tests cannot cover CUDA/bf16):

    python bench/gpu_check.py --out results.json

1. tiny preset, bf16 on the GPU: fp32-GPU logits equal CPU logits; a few training steps on the real sample
   photos lower the loss; batched greedy generation equals one-by-one generation.
2. the convllava-1536 tower (669M parameters) in bf16: tokens at 1536² and images/s, against a CLIP ViT-L/14
   (timm, random init) at 336² and at 1526² — the same comparison as bench/vision_tokens.py, in seconds.
3. the convllava-1536 model (Vicuna-7B-shaped LM, random init, bf16): forward with one 1536² image, KV-cache
   generation, and a stage-1 style backward (stage 5 + projector trainable, gradient checkpointing) with peak memory.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import transformers

from convllava.data.sample_images import sample_photos
from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.inference import GenerationOptions, generate
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.image_processing import load_image
from convllava.processing.processor import ConvLlavaProcessor


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def check_tiny(dev: str) -> dict:
    config = ConvLlavaConfig.from_preset("tiny", attn_implementation="sdpa")
    processor = ConvLlavaProcessor.for_model(config, "tiny")
    torch.manual_seed(0)
    cpu = ConvLlavaForCausalLM(config).eval()
    photos = sample_photos()
    images = [load_image(p.path) for p in photos]
    convs = [
        [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": p.subject}] for p in photos
    ]
    batch = processor(conversations=convs, images=images)
    with torch.no_grad():
        ref = cpu(**batch).logits
        gpu = ConvLlavaForCausalLM(config).eval()
        gpu.load_state_dict(cpu.state_dict())
        gpu = gpu.to(dev)
        moved = {k: (v.to(dev) if torch.is_tensor(v) else [x.to(dev) for x in v]) for k, v in batch.items()}
        fp32_diff = (gpu(**moved).logits.cpu() - ref).abs().max().item()
    model = gpu.to(torch.bfloat16).train()
    model.activation_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        moved["pixel_values"] = (
            [x.to(torch.bfloat16) for x in moved["pixel_values"]]
            if isinstance(moved["pixel_values"], list)
            else moved["pixel_values"].to(torch.bfloat16)
        )
        loss = model(**moved).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    questions = ["What is this?"] * len(images)
    opts = GenerationOptions(max_new_tokens=6)
    batched = generate(model, processor, questions, images, opts)
    single = [generate(model, processor, [q], [im], opts)[0] for q, im in zip(questions, images, strict=True)]
    subjects = [p.subject for p in photos]
    return {
        "fp32_gpu_vs_cpu_max_abs_logit_diff": fp32_diff,
        "bf16_loss_first_last": [losses[0], losses[-1]],
        "batched_equals_single": batched == single,
        "answers": batched,
        "correct": sum(a.strip(" .").lower() == s for a, s in zip(batched, subjects, strict=True)),
    }


def check_tower(dev: str) -> dict:
    from convllava.modeling.vision import ConvNeXtTower

    out = {}
    with torch.device(dev):
        tower = ConvNeXtTower().to(torch.bfloat16).eval()
    x = torch.randn(4, 3, 1536, 1536, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        out["tokens_1536"] = tower(x[:1]).shape[1]
        sec = timed(lambda: tower(x))
    out["ours_1536_images_per_s"] = 4 / sec
    for size in (336, 1526):
        vit = timm.create_model("vit_large_patch14_clip_224", pretrained=False, img_size=size, num_classes=0)
        vit = vit.to(dev, torch.bfloat16).eval()
        y = torch.randn(4, 3, size, size, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            out[f"vit_l14_{size}_images_per_s"] = 4 / timed(lambda vit=vit, y=y: vit.forward_features(y))
        del vit
    out["ours_1536_vs_vit_1526_speedup"] = out["ours_1536_images_per_s"] / out["vit_l14_1526_images_per_s"]
    return out


def check_7b(dev: str) -> dict:
    config = ConvLlavaConfig.from_preset("convllava-1536", attn_implementation="sdpa")
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(dev):
        model = ConvLlavaForCausalLM(config).to(torch.bfloat16).eval()
    build_s = time.perf_counter() - start
    from convllava.processing.tokenizer import load_tokenizer

    # The tiny tokenizer stands in for Vicuna's (no hub here); its ids are < 32000 and <image> is remapped.
    tokenizer = load_tokenizer("tiny")
    processor = ConvLlavaProcessor.for_model(
        ConvLlavaConfig.from_preset("convllava-1536", image_token_id=tokenizer.convert_tokens_to_ids("<image>")),
        tokenizer,
    )
    model.config.image_token_id = processor.image_token_id
    photo = load_image(sample_photos()[3].path)
    batch = processor.prompts(["Describe the image."], [photo])
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        inputs = {
            "input_ids": batch["input_ids"].to(dev),
            "attention_mask": batch["attention_mask"].to(dev),
            "pixel_values": batch["pixel_values"].to(dev, torch.bfloat16),
        }
        t = time.perf_counter()
        logits = model(**inputs).logits
        torch.cuda.synchronize()
        forward_s = time.perf_counter() - t
        t = time.perf_counter()
        gen = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=3, eos_token_id=None)
        torch.cuda.synchronize()
        gen_s = time.perf_counter() - t
    # stage-1 style step: only stage 5 + projector train
    model.train()
    model.activation_checkpointing_enable()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("vision_tower.model.stages.4", "projector")))
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, -100)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    torch.cuda.synchronize()
    grads_ok = all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    frozen_untouched = all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    return {
        "parameters": model.parameter_counts(),
        "build_s": build_s,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "visual_tokens": int((inputs["input_ids"] == processor.image_token_id).sum()),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "forward_s": forward_s,
        "generated_tokens": gen.shape[1] - inputs["input_ids"].shape[1],
        "generate_16_s": gen_s,
        "stage1_backward_s": time.perf_counter() - t,
        "stage1_loss": loss.item(),
        "stage1_grads_only_on_trainable": grads_ok and frozen_untouched,
        "stage1_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    dev = "cuda"
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
    }
    for name, fn in (("tiny", check_tiny), ("tower", check_tower), ("convllava_1536", check_7b)):
        t = time.perf_counter()
        try:
            result[name] = fn(dev)
        except Exception as e:  # report every check, even when one fails
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name]["seconds"] = round(time.perf_counter() - t, 1)
        torch.cuda.empty_cache()
        print(json.dumps({name: result[name]}, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
