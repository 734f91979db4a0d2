import json

import pytest
from PIL import Image

from convllava.processing.image_processing import CLIP_MEAN, CLIP_STD, ImageProcessorConfig
from convllava.processing.labels import IGNORE_INDEX, PreflightError, SequenceTooLongError
from convllava.processing.processor import ConvLlavaProcessor
from convllava.processing.processor_config import ProcessorConfig
from convllava.processing.templates import VICUNA_SYSTEM, ConversationError, ConversationTemplate, get_template
from convllava.processing.tiny_tokenizer import build_tiny_tokenizer
from convllava.processing.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "And the square?"},
    {"from": "gpt", "value": "Blue."},
]


def _learned(processor, sample) -> str:
    return processor.tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_vicuna_v1_renders_exactly_like_llava():
    text = "".join(t for t, _ in get_template("vicuna_v1").render(CONV))
    assert text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>"
        "USER: And the square? ASSISTANT: Blue.</s>"
    )
    assert _generation_prompt(get_template("vicuna_v1"), "Hi?") == f"{VICUNA_SYSTEM} USER: Hi? ASSISTANT:"


def _generation_prompt(template, question: str) -> str:
    return "".join(t for t, _ in template.render([{"role": "user", "content": question}], add_generation_prompt=True))


def test_labels_cover_only_assistant_replies_and_images_expand(tiny_processor):
    sample = tiny_processor.tokenize(CONV, [(192, 320)], sample_id="a")
    assert sample.num_image_tokens == 3 * 5
    assert sample.input_ids.count(tiny_processor.image_token_id) == 15
    assert _learned(tiny_processor, sample) == " Red.</s> Blue.</s>"
    image_positions = [i for i, t in enumerate(sample.input_ids) if t == tiny_processor.image_token_id]
    assert all(sample.labels[i] == IGNORE_INDEX for i in image_positions)
    assert image_positions == list(range(image_positions[0], image_positions[0] + 15))  # contiguous


def test_plain_and_chatml_templates(tiny_processor):
    tok = tiny_processor.tokenizer
    plain = ConvLlavaProcessor(tok, ProcessorConfig(template="plain"))
    caption = [
        {"from": "human", "value": "<image>\nRender a clear and concise summary."},
        {"from": "gpt", "value": "A cat."},
    ]
    s = plain.tokenize(caption, [(256, 256)], sample_id="p")
    assert tok.decode([t for t in s.input_ids if t != plain.image_token_id]) == "<s>A cat.\n"
    assert _learned(plain, s) == "A cat.\n"
    chatml = ConvLlavaProcessor(tok, ProcessorConfig(template="chatml"))
    s = chatml.tokenize(CONV, [(256, 256)], sample_id="c")
    assert _learned(chatml, s) == "Red.<|im_end|>Blue.<|im_end|>"
    assert chatml.stop_token_ids() == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})


@pytest.mark.parametrize(
    ("conv", "sizes", "message"),
    [
        ([{"from": "gpt", "value": "hi"}], [], "turn 0 is from 'assistant', expected 'user'"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], [], "turn 1 is from 'user'"),
        ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "b"}], [], "turn 0 \\(human\\) is empty"),
        ([{"from": "robot", "value": "a"}], [], "unknown role 'robot'"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], [(256, 256)], "0 <image> tag"),
        ([{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}], [(256, 256)], "2 <image> tag"),
        ([], [], "non-empty list"),
    ],
)
def test_malformed_conversations_name_the_sample(tiny_processor, conv, sizes, message):
    with pytest.raises(ConversationError, match=f"sample bad-1: .*{message}"):
        tiny_processor.tokenize(conv, sizes, sample_id="bad-1")


def test_truncation_policies(tiny_processor):
    tok = tiny_processor.tokenizer
    long_conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * 200}]
    cut = ConvLlavaProcessor(tok, ProcessorConfig(max_length=128))
    sample = cut.tokenize(long_conv, [(256, 256)], sample_id="long")
    assert sample.truncated and len(sample.input_ids) == 128 and sample.num_label_tokens > 0
    strict = ConvLlavaProcessor(tok, ProcessorConfig(max_length=128, truncation="error"))
    with pytest.raises(SequenceTooLongError, match="sample long: .* exceed max_length 128"):
        strict.tokenize(long_conv, [(256, 256)], sample_id="long")
    tight = ConvLlavaProcessor(tok, ProcessorConfig(max_length=40))
    with pytest.raises(SequenceTooLongError, match="would cut an image"):
        tight.tokenize(long_conv, [(256, 512)], sample_id="long")


def test_preflight_refuses_samples_that_train_on_nothing(tiny_processor):
    tok = tiny_processor.tokenizer
    conv = [{"from": "human", "value": "<image>\n" + "Describe it. " * 20}, {"from": "gpt", "value": "Red."}]
    proc = ConvLlavaProcessor(tok, ProcessorConfig(max_length=80))
    with pytest.raises(PreflightError, match="sample s9: every label is masked after truncation to 80 tokens"):
        proc.tokenize(conv, [(256, 256)], sample_id="s9")


def test_preflight_catches_template_tokenizer_disagreement(tiny_processor):
    proc = ConvLlavaProcessor(tiny_processor.tokenizer)
    # A reply boundary inside a word: BPE merges " red" across it, so labels would be off by a token.
    proc.template = ConversationTemplate(
        name="glued", user_format="USER: {content} ", assistant_prefix="The answer is: re", reply_format="d circle</s>"
    )
    with pytest.raises(
        PreflightError, match="sample g1: template 'glued' and the tokenizer disagree: token 9 \\(' red'\\)"
    ):
        proc.tokenize([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], sample_id="g1")


def test_batches_pad_right_for_training_and_left_for_generation(tiny_processor):
    images = [Image.new("RGB", (300, 150), (200, 0, 0)), None]
    convs = [CONV, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]]
    batch = tiny_processor(conversations=convs, images=images)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1, 0] == 1 and batch["attention_mask"][1, -1] == 0
    assert tuple(batch["pixel_values"].shape) == (1, 3, 192, 320)
    prompts = tiny_processor.prompts(["What is it?", "Hi"], images)
    assert prompts["attention_mask"][1, 0] == 0 and prompts["attention_mask"][1, -1] == 1
    assert (prompts["input_ids"][0] == tiny_processor.image_token_id).sum() == 15


def test_processor_round_trip(tmp_path, tiny_processor):
    proc = ConvLlavaProcessor(
        tiny_processor.tokenizer,
        ProcessorConfig(
            template="chatml", max_length=512, image=ImageProcessorConfig(resolution=384, mode="short-side")
        ),
    )
    proc.save_pretrained(tmp_path)
    loaded = ConvLlavaProcessor.from_pretrained(tmp_path)
    assert loaded.config == proc.config
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "ConvLlavaProcessor"
    assert saved["image_processor"]["image_processor_type"] == "ConvLlavaImageProcessor"
    assert saved["image_processor"]["mode"] == "short-side"
    assert loaded.tokenize(CONV, [(384, 384)], sample_id="x").input_ids == proc.tokenize(CONV, [(384, 384)]).input_ids


def test_processor_config_of_the_earlier_layout_still_loads(tmp_path, tiny_processor):
    """Checkpoints saved before the processor became a ProcessorMixin keep the image settings under `image`."""
    proc = ConvLlavaProcessor(
        tiny_processor.tokenizer,
        ProcessorConfig(
            template="chatml", max_length=512, image=ImageProcessorConfig(resolution=384, mode="short-side")
        ),
    )
    proc.save_pretrained(tmp_path)
    old = {
        "template": "chatml",
        "max_length": 512,
        "truncation": "truncate",
        "tokenization": "one_pass",
        "image": {
            "resolution": 384,
            "mode": "short-side",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "max_aspect": 4.0,
        },
    }
    (tmp_path / "processor_config.json").write_text(json.dumps(old))
    assert ConvLlavaProcessor.from_pretrained(tmp_path).config == proc.config


def test_shipped_tiny_tokenizer_matches_its_builder():
    shipped = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    rebuilt = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    assert shipped["model"]["vocab"] == rebuilt["model"]["vocab"]
    assert shipped["model"]["merges"] == rebuilt["model"]["merges"]
    tok = load_tokenizer("tiny")
    assert len(tok) == 1024
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>"]) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- LLaVA's tokenization (released checkpoints)
IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX; the reference inserts it, then expands it like the processor


def tokenizer_image_token(prompt: str, encode) -> list[int]:
    """LLaVA's `tokenizer_image_token`, as in its repository, with `tokenizer(chunk).input_ids` = `encode(chunk)`."""
    prompt_chunks = [encode(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]  # noqa: B905 (verbatim)

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == 1:  # bos_token_id
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand_images(ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    counts, out = iter(counts), []
    for i in ids:
        out.extend([image_token_id] * next(counts) if i == IMAGE_INDEX else [i])
    return out


@pytest.fixture(scope="module")
def vicuna_llava(vicuna_tokenizer_dir):
    return ConvLlavaProcessor(load_tokenizer(vicuna_tokenizer_dir), ProcessorConfig(tokenization="llava"))


def _human_gpt(*turns: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


LLAVA_CASES = {
    "image-first": (_human_gpt("<image>\nWhat colour is the circle?", "Red."), [(128, 192)], False),
    "image-last": (_human_gpt("What colour is the circle?\n<image>", "Red 42."), [(192, 128)], False),
    "image-mid": (
        _human_gpt("Look at <image> and <image>: how many objects?", "Two, 0.25 each."),
        [(128, 128), (64, 256)],
        False,
    ),
    "multi-turn": (
        _human_gpt("<image>\nDescribe it.", "A red circle.", "And the square?", "Blue.", "Yes?", "No."),
        [(256, 192)],
        False,
    ),
    "generation": (_human_gpt("<image>\nDescribe it in 12 words."), [(128, 192)], True),
    "generation-image-last": (_human_gpt("Describe it.\n<image>"), [(128, 192)], True),
}


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_tokenization_is_tokenizer_image_token(vicuna_llava, llama_reference, case):
    conv, sizes, generation = LLAVA_CASES[case]
    proc, sp = vicuna_llava, llama_reference.sp
    sample = proc.tokenize(conv, sizes, sample_id=case, add_generation_prompt=generation)  # preflight runs: passes
    text = "".join(t for t, _ in proc.template.render(conv, add_generation_prompt=generation))
    counts = [(h // 64) * (w // 64) for h, w in sizes]
    assert sample.input_ids == expand_images(
        tokenizer_image_token(text, llama_reference.encode), proc.image_token_id, counts
    )
    assert sample.num_image_tokens == sum(counts) and sample.input_ids[0] == 1 and sample.input_ids.count(1) == 1
    # A dummy-prefix ▁ follows every image whose text goes on with "\n" or " ", and is context, not learned.
    dummy = sp.piece_to_id("▁")
    ends = [i for i, t in enumerate(sample.input_ids[:-1]) if t == proc.image_token_id != sample.input_ids[i + 1]]
    assert len(ends) == len(sizes)
    for i in ends:
        assert sample.input_ids[i + 1] == dummy and sample.labels[i + 1] == IGNORE_INDEX
    replies = [t["value"] for t in conv[1::2]]
    assert _learned(proc, sample) == " ".join(f"{r}</s>" for r in replies)
    assert sample.num_label_tokens == sum(len(llama_reference.sp_no_prefix.encode(f" {r}")) + 1 for r in replies)
    assert not sample.boundary_conflicts


def test_llava_tokenization_differs_from_one_pass_by_the_dummy_prefix(vicuna_tokenizer_dir, vicuna_llava):
    conv, sizes, _ = LLAVA_CASES["image-first"]
    one_pass = ConvLlavaProcessor(vicuna_llava.tokenizer, ProcessorConfig())
    a, b = vicuna_llava.tokenize(conv, sizes), one_pass.tokenize(conv, sizes)
    after = a.input_ids.index(vicuna_llava.image_token_id) + 6  # the 2×3 visual tokens
    dummy = vicuna_llava.tokenizer.convert_tokens_to_ids("▁")
    assert a.input_ids[after] == dummy and b.input_ids[after] != dummy
    assert a.input_ids[:after] + a.input_ids[after + 1 :] == b.input_ids
    assert a.labels[:after] + a.labels[after + 1 :] == b.labels


def test_llava_tokenization_with_a_byte_level_tokenizer_is_tokenizer_image_token_verbatim(tiny_processor):
    tok = tiny_processor.tokenizer
    proc = ConvLlavaProcessor(tok, ProcessorConfig(tokenization="llava"))
    for conv, sizes, generation in LLAVA_CASES.values():
        sample = proc.tokenize(conv, sizes, add_generation_prompt=generation)
        text = "".join(t for t, _ in proc.template.render(conv, add_generation_prompt=generation))
        counts = [(h // 64) * (w // 64) for h, w in sizes]
        want = tokenizer_image_token(text, lambda chunk: tok(chunk).input_ids)
        assert sample.input_ids == expand_images(want, proc.image_token_id, counts)
    # The plain template starts with the image: LLaVA keeps the empty first chunk's BOS.
    plain = ConvLlavaProcessor(tok, ProcessorConfig(template="plain", tokenization="llava"))
    s = plain.tokenize(_human_gpt("<image>\nA caption please.", "A cat."), [(64, 64)])
    assert s.input_ids == [1, plain.image_token_id, *tok("A cat.\n").input_ids[1:]]
    assert _learned(plain, s) == "A cat.\n"


def test_llava_tokenization_keeps_truncation_rules(vicuna_llava):
    tok = vicuna_llava.tokenizer
    long_conv = _human_gpt("<image>\nDescribe.", "word " * 200)
    cut = ConvLlavaProcessor(tok, ProcessorConfig(max_length=128, tokenization="llava"))
    sample = cut.tokenize(long_conv, [(256, 256)], sample_id="long")
    assert sample.truncated and len(sample.input_ids) == 128 and sample.num_label_tokens > 0
    assert sample.input_ids == vicuna_llava.tokenize(long_conv, [(256, 256)]).input_ids[:128]
    tight = ConvLlavaProcessor(tok, ProcessorConfig(max_length=40, tokenization="llava"))
    with pytest.raises(SequenceTooLongError, match="would cut an image"):
        tight.tokenize(long_conv, [(256, 512)], sample_id="long")
    glued = ConvLlavaProcessor(tok, ProcessorConfig(tokenization="llava"))
    glued.template = ConversationTemplate(
        name="glued", user_format="USER: {content} ", assistant_prefix="ASSISTANT: Re", reply_format="d circle</s>"
    )
    with pytest.raises(PreflightError, match="sample g1: template 'glued' and the tokenizer disagree"):
        glued.tokenize(_human_gpt("<image>\nhi", "x"), [(64, 64)], sample_id="g1")


def test_llava_prompts_are_the_generation_prompt_left_padded(vicuna_llava, llama_reference):
    images = [Image.new("RGB", (128, 64), (0, 0, 200)), None]
    batch = vicuna_llava.prompts(["Describe it.", "Hi?"], images)
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    h, w = batch["pixel_values"].shape[-2:]
    n = (h // 64) * (w // 64)

    def prompt(question: str) -> str:
        return _generation_prompt(vicuna_llava.template, question)

    want = tokenizer_image_token(prompt("<image>\nDescribe it."), llama_reference.encode)
    assert rows[0] == expand_images(want, vicuna_llava.image_token_id, [n])
    assert rows[1] == llama_reference.encode(prompt("Hi?"))
    assert batch["attention_mask"][1, 0] == 0


def test_tokenization_option_is_validated_persisted_and_reaches_for_model(tmp_path, tiny_config, tiny_processor):
    assert tiny_processor.config.tokenization == "one_pass"  # our models' default
    with pytest.raises(ValueError, match=r"^ProcessorConfig: tokenization: Input should be 'one_pass' or 'llava'"):
        ProcessorConfig(tokenization="llama")
    proc = ConvLlavaProcessor.for_model(tiny_config, tiny_processor.tokenizer, tokenization="llava")
    assert proc.config.tokenization == "llava" and proc.config.template == tiny_config.template
    chatml = ConvLlavaProcessor.for_model(tiny_config, tiny_processor.tokenizer, template="chatml", max_length=64)
    assert (chatml.config.template, chatml.config.max_length, chatml.config.tokenization) == ("chatml", 64, "one_pass")
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["tokenization"] == "llava"
    assert ConvLlavaProcessor.from_pretrained(tmp_path).config == proc.config
    # processor_config.json written before the option existed: one_pass.
    raw = json.loads((tmp_path / "processor_config.json").read_text())
    del raw["tokenization"]
    (tmp_path / "processor_config.json").write_text(json.dumps(raw))
    assert ConvLlavaProcessor.from_pretrained(tmp_path).config.tokenization == "one_pass"


def test_llava_processor_round_trips_with_the_sentencepiece_tokenizer(tmp_path, vicuna_llava):
    """Saved (tokenizer.json now) and loaded again, the converted tokenizer keeps LLaVA's ids, leading spaces too."""
    conv, sizes, _ = LLAVA_CASES["image-last"]
    vicuna_llava.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = ConvLlavaProcessor.from_pretrained(tmp_path)
    assert loaded.config == vicuna_llava.config and loaded.image_token_id == vicuna_llava.image_token_id == 800
    want = vicuna_llava.tokenize(conv, sizes)
    got = loaded.tokenize(conv, sizes)
    assert (got.input_ids, got.labels) == (want.input_ids, want.labels)


def _membership_by_scan(offsets, spans):
    """The definition: inside = held by a reply's span; crosses = not held but overlapping one."""
    out = []
    for start, end in offsets:
        inside = start < end and any(a <= start and end <= b for a, b in spans)
        crosses = start < end and not inside and any(start < b and a < end for a, b in spans)
        out.append((inside, crosses))
    return out


def test_reply_membership_matches_the_scan_of_every_span():
    """`reply_membership` (two bisections a token) gives what checking every span for every token gives, on random
    disjoint spans (empty ones, adjacent ones, unsorted) and token ranges (empty, overlapping, out of order)."""
    import random

    from convllava.processing.labels import reply_membership

    rng = random.Random(0)
    held = crossed = 0
    for _ in range(20000):
        length = rng.randint(1, 40)
        spans, pos = [], rng.randint(0, 3)
        while pos < length and rng.random() < 0.75:
            n = rng.choice([0, 0, 1, 2, 3, 5, 8])
            if pos + n > length:
                break
            spans.append((pos, pos + n))
            pos += n + rng.choice([0, 1, 1, 2, 4])
        rng.shuffle(spans)
        offsets = [tuple(sorted((rng.randint(0, length), rng.randint(0, length)))) for _ in range(rng.randint(0, 12))]
        pos = 0
        while pos < length:  # and a tiling, as a tokenizer gives
            n = rng.randint(1, 4)
            offsets.append((pos, min(length, pos + n)))
            pos += n
        got = reply_membership(offsets, spans)
        assert got == _membership_by_scan(offsets, spans), (offsets, spans)
        held += sum(i for i, _ in got)
        crossed += sum(c for _, c in got)
    assert held > 10000 and crossed > 10000  # both cases were exercised
