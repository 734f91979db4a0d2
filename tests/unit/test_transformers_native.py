"""Our artifacts through transformers' own Auto classes, as a user loads them after `import convllava`."""

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

import convllava
from convllava.modeling.checkpoint import save_checkpoint

IMAGES = [Image.new("RGB", (300, 150), (220, 20, 20)), Image.new("RGB", (160, 320), (20, 20, 220))]


@pytest.fixture()
def checkpoint(tmp_path, tiny_model, tiny_processor):
    save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return "".join(t for t, _ in processor.template.render(messages, add_generation_prompt=True))


def test_package_exports_the_public_api():
    assert convllava.ConvLlavaProcessor.__name__ == "ConvLlavaProcessor"
    assert convllava.ConvLlavaForCausalLM.config_class is convllava.ConvLlavaConfig
    assert callable(convllava.generate) and callable(convllava.load_model)


def test_importing_the_package_registers_without_the_vision_stack(checkpoint):
    """`import convllava` is what every Ray worker of a pipeline pays (preprocessing actors build no model): it
    registers the Auto classes but leaves timm to the first model built, which imports timm without the wandb it
    would pull in (1.3 s of CPU per process); wandb itself still imports."""
    import subprocess
    import sys

    code = (
        "import sys, convllava\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "assert 'timm' not in sys.modules and 'wandb' not in sys.modules, 'imported by convllava'\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})\n"
        "assert type(model).__name__ == 'ConvLlavaForCausalLM' and 'timm' in sys.modules\n"
        "assert 'wandb' not in sys.modules, 'imported with timm'\n"
        "import wandb\n"
        "assert wandb.__version__ and sys.modules['wandb'] is wandb\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_auto_processor_gives_our_input_ids_and_pixel_values(checkpoint, tiny_processor):
    auto = AutoProcessor.from_pretrained(checkpoint)
    assert isinstance(auto, convllava.ConvLlavaProcessor) and auto.config == tiny_processor.config
    texts = [_prompt(tiny_processor, "<image>\nWhat is this?"), _prompt(tiny_processor, "<image>\nWhich colour?")]
    got = auto(images=IMAGES, text=texts, return_tensors="pt", padding_side="left")
    want = tiny_processor.prompts(["What is this?", "Which colour?"], IMAGES)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert len(got["pixel_values"]) == 2  # two sizes: a list of (3, H, W)
    for ours, theirs in zip(got["pixel_values"], want["pixel_values"], strict=True):
        assert torch.equal(ours, theirs)
    # One image per text, nested as transformers accepts it, and one size: a (B, 3, H, W) tensor.
    same = auto(images=[[IMAGES[0]], [IMAGES[0]]], text=texts, return_tensors="pt")
    assert same["pixel_values"].shape == (2, 3, 192, 320)
    assert (same["input_ids"] == tiny_processor.image_token_id).sum() == 2 * 15
    with pytest.raises(ValueError, match="2 <image> tag"):
        auto(images=IMAGES[:1], text=texts)


def test_auto_image_processor_matches_ours(checkpoint, tiny_processor):
    auto = AutoImageProcessor.from_pretrained(checkpoint)
    assert type(auto) is type(tiny_processor.image_processor) and auto.config == tiny_processor.image_processor.config
    pixels = auto(IMAGES[0], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels[0], tiny_processor.image_processor.transform(IMAGES[0]))


@pytest.mark.parametrize("auto_class", [AutoModelForImageTextToText, AutoModelForCausalLM])
def test_auto_model_loads_the_checkpoint_with_the_same_logits(checkpoint, tiny_model, tiny_processor, auto_class):
    loaded = auto_class.from_pretrained(checkpoint, attn_implementation="eager").eval()
    assert type(loaded) is convllava.ConvLlavaForCausalLM
    batch = tiny_processor.prompts(["What is this?", "Hi"], [IMAGES[0], None])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, tiny_model(**batch).logits)


def test_generate_runs_the_tower_once_at_prefill_and_matches_full_recompute(tiny_model, tiny_processor):
    batch = tiny_processor.prompts(["What is this?", "Which colour?"], [IMAGES[0], IMAGES[0]])
    calls = []
    tiny_model.vision_tower.register_forward_hook(lambda _m, args, _o: calls.append(tuple(args[0].shape)))
    kwargs = dict(
        max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tiny_processor.tokenizer.pad_token_id
    )
    with torch.no_grad():
        cached = tiny_model.generate(**batch, use_cache=True, **kwargs)
        assert calls == [(2, 3, 192, 320)]  # pixel_values reach the model only at the prefill step
        calls.clear()
        recomputed = tiny_model.generate(**batch, use_cache=False, **kwargs)
    assert len(calls) == 8  # without a cache every step re-reads the images
    assert cached.shape[1] == batch["input_ids"].shape[1] + 8
    assert torch.equal(cached, recomputed)
