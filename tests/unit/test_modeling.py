import pytest
import torch
from PIL import Image
from transformers import Qwen2Config

from convllava.modeling.checkpoint import load_model, save_checkpoint
from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.inference import GenerationOptions, chat_reply, generate
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.processor import ConvLlavaProcessor

CONV = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red box."}]


def _images():
    return [Image.new("RGB", (300, 150), (220, 20, 20)), Image.new("RGB", (160, 320), (20, 20, 220))]


def test_list_of_sizes_equals_per_image_forward(tiny_model, tiny_processor):
    """Images of different sizes in one batch: each sample's logits equal a batch of one."""
    images = _images()
    batch = tiny_processor(conversations=[CONV, CONV], images=images)
    assert isinstance(batch["pixel_values"], list)  # (3, 192, 320) and (3, 320, 192)
    with torch.no_grad():
        joint = tiny_model(**batch).logits
        for row in range(2):
            single = tiny_processor(conversations=[CONV], images=[images[row]])
            alone = tiny_model(**single).logits[0]
            n = single["attention_mask"][0].sum()
            assert torch.allclose(joint[row, :n], alone[:n], atol=1e-5)


def test_scatter_places_features_in_placeholder_order(tiny_model, tiny_processor):
    batch = tiny_processor(conversations=[CONV], images=[_images()[0]])
    with torch.no_grad():
        embeds = tiny_model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        features = tiny_model.get_image_features(batch["pixel_values"])
    mask = batch["input_ids"][0] == tiny_processor.image_token_id
    assert torch.equal(embeds[0, mask], features)
    text_ids = batch["input_ids"][0, ~mask]
    assert torch.equal(embeds[0, ~mask], tiny_model.get_input_embeddings()(text_ids))


def test_count_mismatch_raises_with_both_counts(tiny_model, tiny_processor):
    batch = tiny_processor(conversations=[CONV], images=[_images()[0]])  # 15 placeholders
    with pytest.raises(ValueError, match="hold 15 placeholder tokens but the images give 16 visual tokens"):
        tiny_model(input_ids=batch["input_ids"], pixel_values=torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="15 image placeholder tokens .* but no pixel_values"):
        tiny_model(input_ids=batch["input_ids"])


def test_loss_only_on_replies(tiny_model, tiny_processor):
    batch = tiny_processor(conversations=[CONV], images=[_images()[0]])
    labels = batch["labels"]
    logits = tiny_model(**batch).logits
    shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
    keep = shift_labels != -100
    expected = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    assert torch.allclose(tiny_model(**batch).loss, expected, atol=1e-5)
    assert keep.sum() == len(tiny_processor.tokenizer(" A red box.</s>", add_special_tokens=False).input_ids)


def test_generate_batched_equals_one_by_one_with_and_without_images(tiny_model, tiny_processor):
    questions = ["What is this?", "Tell me a story about the sea.", "Which colour?"]
    images = [_images()[0], None, _images()[1]]
    options = GenerationOptions(max_new_tokens=12)
    batched = generate(tiny_model, tiny_processor, questions, images, options)
    singles = [
        generate(tiny_model, tiny_processor, [q], [i], options)[0] for q, i in zip(questions, images, strict=True)
    ]
    assert batched == singles
    assert all(len(tiny_processor.tokenizer(a).input_ids) > 1 for a in batched)  # the random model emits tokens


def test_kv_cache_matches_full_recompute(tiny_model, tiny_processor):
    batch = tiny_processor.prompts(["What is this?"], [_images()[0]])
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=3)
    with torch.no_grad():
        cached = tiny_model.generate(**batch, use_cache=True, **kwargs)
        uncached = tiny_model.generate(**batch, use_cache=False, **kwargs)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 10
    assert torch.equal(cached, uncached)


def test_chat_reply_multi_turn(tiny_model, tiny_processor):
    messages = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A box."},
        {"role": "user", "content": "Which colour?"},
    ]
    reply = chat_reply(tiny_model, tiny_processor, messages, _images()[0], GenerationOptions(max_new_tokens=5))
    assert isinstance(reply, str) and "</s>" not in reply


def test_save_and_load_round_trip_gives_identical_logits(tmp_path, tiny_model, tiny_processor):
    batch = tiny_processor(conversations=[CONV], images=[_images()[0]])
    save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded, processor = load_model(tmp_path / "ckpt", attn_implementation="eager")  # same backend as the fixture
    with torch.no_grad():
        again = processor(conversations=[CONV], images=[_images()[0]])
        assert torch.equal(tiny_model(**batch).logits, loaded(**again).logits)


def test_gradient_checkpointing_covers_tower_and_lm_and_keeps_gradients(tiny_config, tiny_processor):
    torch.manual_seed(0)
    model = ConvLlavaForCausalLM(tiny_config).train()
    batch = tiny_processor(conversations=[CONV], images=[_images()[0]])
    model(**batch).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(stage.grad_checkpointing for stage in model.vision_tower.model.stages)
    assert all(layer.gradient_checkpointing for layer in model.language_model.model.layers)
    model(**batch).loss.backward()
    for name, grad in reference.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name
    model.activation_checkpointing_disable()
    assert not any(stage.grad_checkpointing for stage in model.vision_tower.model.stages)


def test_any_causal_lm_works_including_tied_embeddings(tmp_path, tiny_processor):
    text = Qwen2Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    config = ConvLlavaConfig.from_preset("tiny", text_config=text, attn_implementation="eager")
    torch.manual_seed(0)
    model = ConvLlavaForCausalLM(config).eval()
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    processor = ConvLlavaProcessor.for_model(config, tiny_processor.tokenizer)
    batch = processor(conversations=[CONV], images=[_images()[0]])
    save_checkpoint(model, processor, tmp_path / "qwen")
    loaded, _ = load_model(tmp_path / "qwen", attn_implementation="eager")
    assert type(loaded.language_model).__name__ == "Qwen2ForCausalLM"
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert generate(loaded, processor, ["What?"], [_images()[0]], GenerationOptions(max_new_tokens=3))


def test_text_only_training_batch_runs_tower_and_projector_with_zero_weight(tiny_model):
    """Every data-parallel rank must run the same modules (ZeRO-3 gathers parameters per module): a text-only batch
    in training mode runs a blank image through tower and projector, which changes neither loss nor gradients."""
    from convllava.modeling.trainable import set_trainable

    set_trainable(tiny_model, ["vision.stage5", "projector", "llm"])
    ids = torch.randint(5, 100, (2, 12))
    eval_loss = tiny_model(input_ids=ids, labels=ids).loss
    seen = []
    hook = tiny_model.vision_tower.register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape)))
    tiny_model.train()
    loss = tiny_model(input_ids=ids, labels=ids).loss
    loss.backward()
    hook.remove()
    assert seen == [(1, 3, 64, 64)]  # one blank stride-sized image
    assert torch.equal(loss.detach(), eval_loss.detach())
    grads = {n: p.grad for n, p in tiny_model.named_parameters() if p.requires_grad}
    tower = {n: g for n, g in grads.items() if n.startswith(("vision_tower.", "projector."))}
    assert tower and all(g is not None and not g.any() for g in tower.values())  # present, and exactly zero
    assert any(g is not None and g.any() for n, g in grads.items() if n.startswith("language_model."))
    with torch.no_grad():
        seen.clear()
        tiny_model.vision_tower.register_forward_hook(lambda _m, args, _o: seen.append(1))
        tiny_model(input_ids=ids)
    assert seen == []  # no blank image without gradients (inference)


def test_projector_init_keeps_visual_tokens_at_the_towers_scale(tiny_config, tiny_processor):
    """Fan-in init (std 1/sqrt(in_features), zero bias) for the projector, whatever the LM's initializer_range:
    visual tokens enter the LM at least as large as text embeddings, and carry the image's differences."""
    torch.manual_seed(0)
    model = ConvLlavaForCausalLM(tiny_config).eval()
    for layer in (model.projector[0], model.projector[2]):
        assert layer.weight.std().item() == pytest.approx(layer.in_features**-0.5, rel=0.05)
        assert torch.count_nonzero(layer.bias) == 0
    lm_linear = model.language_model.model.layers[0].mlp.down_proj.weight
    assert lm_linear.std().item() == pytest.approx(tiny_config.text_config.initializer_range, rel=0.05)
    colours = [Image.new("RGB", (256, 256), c) for c in ((220, 30, 30), (30, 70, 220))]
    batch = tiny_processor(conversations=[CONV, CONV], images=colours)
    with torch.no_grad():
        visual = model.get_image_features(batch["pixel_values"])  # a tensor or a list: both are accepted
        text = model.get_input_embeddings().weight
    assert visual.norm(dim=-1).mean() > 2 * text.norm(dim=-1).mean()
    red, blue = visual.chunk(2)
    assert (red - blue).norm(dim=-1).mean() > text.norm(dim=-1).mean()  # two colours: far apart, not one blur


def test_loading_a_checkpoint_keeps_its_projector_weights(tmp_path, tiny_config, tiny_processor):
    """The init rule only applies to new models: trained projector weights survive save → load unchanged."""
    model = ConvLlavaForCausalLM(tiny_config).eval()
    with torch.no_grad():
        model.projector[0].weight.fill_(0.125)
        model.projector[2].bias.fill_(-0.5)
    save_checkpoint(model, tiny_processor, tmp_path / "ckpt")
    loaded, _ = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.projector[0].weight, torch.full_like(loaded.projector[0].weight, 0.125))
    assert torch.equal(loaded.projector[2].bias, torch.full_like(loaded.projector[2].bias, -0.5))
    assert torch.equal(loaded.projector[2].weight, model.projector[2].weight)
