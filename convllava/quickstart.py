"""`convllava quickstart`: fine-tune the tiny model on real photos in about a minute and ask about them.

It builds the tiny preset, fine-tunes every part of it (tower, projector, LM) on real photos shipped
with scikit-image — bucketed at their own aspect ratios, Vicuna template, labels on replies only —
saves a safetensors checkpoint, reloads it and asks each photo what it shows. A model that only learnt
the text would answer the same thing for every photo; the per-photo answers show the image path works.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from convllava.checkpoint import load_model, save_checkpoint
from convllava.config import ConvLlavaConfig
from convllava.image_processing import load_image
from convllava.inference import generate
from convllava.modeling import ConvLlavaForCausalLM
from convllava.processor import ConvLlavaProcessor
from convllava.sample_images import sample_photos

QUESTION = "What is the main subject of this photo? Answer with one word."


def _conversations(photo) -> list[list[dict[str, str]]]:
    return [
        [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": photo.subject}],
        [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": photo.caption}],
    ]


def run_quickstart(workdir: str | Path = "work/quickstart", steps: int = 120, seed: int = 0, lr: float = 2e-3) -> int:
    """Train the tiny model on the sample photos, save, reload, answer. Returns 0 when every photo is named."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    photos = sample_photos()
    images = [load_image(p.path) for p in photos]
    config = ConvLlavaConfig.from_preset("tiny")
    processor = ConvLlavaProcessor.for_model(config, "tiny")
    model = ConvLlavaForCausalLM(config)
    counts = model.parameter_counts()
    print(f"tiny ConvLLaVA: {sum(counts.values()):,} parameters ({', '.join(f'{k} {v:,}' for k, v in counts.items())})")
    for photo, image in zip(photos, images, strict=True):
        bucket = processor.image_processor.bucket_for(*image.size)
        print(
            f"  {photo.path.name:24s} {image.size[0]}x{image.size[1]} → bucket {bucket.name} ({bucket.tokens()} tokens)"
        )

    samples = [
        (conv, image, f"{p.name}-{i}")
        for p, image in zip(photos, images, strict=True)
        for i, conv in enumerate(_conversations(p))
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start, first_loss, batch_size = time.time(), None, 8
    for step in range(1, steps + 1):
        batch_samples = random.sample(samples, batch_size)
        convs, imgs, ids = zip(*batch_samples, strict=True)
        batch = processor(conversations=list(convs), images=list(imgs), sample_ids=list(ids))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = first_loss if first_loss is not None else loss.item()
        if step % 20 == 0 or step == 1:
            print(f"step {step:4d}/{steps}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    print(f"trained {steps} steps in {time.time() - start:.1f}s: loss {first_loss:.3f} → {loss.item():.3f}")

    checkpoint = save_checkpoint(model.eval(), processor, workdir / "model")
    model, processor = load_model(checkpoint)
    answers = generate(model, processor, [QUESTION] * len(photos), images)
    correct = 0
    print(f"\n{'photo':24s} {'expected':12s} answer")
    for photo, answer in zip(photos, answers, strict=True):
        ok = answer.lower().strip(" .") == photo.subject
        correct += ok
        print(f"{photo.path.name:24s} {photo.subject:12s} {answer!r} {'✓' if ok else '✗'}")
    print(f"\n{correct}/{len(photos)} photos named correctly; checkpoint (safetensors) at {checkpoint}")
    print(f'try: convllava chat --model {checkpoint} --image {photos[1].path} "{QUESTION}"')
    return 0 if correct == len(photos) else 1
