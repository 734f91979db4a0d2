"""Build the byte-level BPE tokenizer that ships with the `tiny` preset (convllava/assets/tiny-tokenizer).

No hub download is possible or wanted for tests and the demo, so the tiny preset carries its own
tokenizer: byte-level (any text is encodable), 1024 ids, Llama-style special tokens, merges learnt
from a small corpus of the words the demo data and the chat templates use. Rebuild with
`python -m convllava.processing.tiny_tokenizer`; a test checks the shipped files match this builder.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 1024
# Fixed ids, Llama-like: unk 0, bos 1, eos 2, pad 3; the tiny preset's image_token_id is 4.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]

_COLOURS = "red green blue yellow orange purple pink brown black white gray cyan magenta".split()
_SHAPES = "circle square triangle star rectangle ellipse diamond hexagon cross heart line dot".split()
_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_PLACES = "left right top bottom center middle upper lower corner side above below near far next to".split()
_WORDS = """
the a an is are was were there this that these those it its of in on at to from with and or but not no yes
what which who where when why how many much color colour shape count number digit object objects image picture
photo scene show shows shown describe description caption short brief detailed answer question single word
phrase please provide box bounding coordinates region located location position size small large big tiny
huge bright dark background foreground light first second third last other each every all some any both
do does did can could would should will have has had be been being i you he she we they me my your our their
cat dog person man woman people astronaut rocket coffee cup camera text letter page document chart table
sky grass water tree building street car sign window door face hand head
assistant user system chat between curious artificial intelligence gives helpful detailed polite answers
questions human gpt render clear concise summary following provided look closely carefully written
inside outside over under around only also very more most less than same different
""".split()


def corpus() -> list[str]:
    """Deterministic training text: word lists, their pairings and typical template lines."""
    lines = [
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "USER: <image>\nWhat is in the image? ASSISTANT: A red circle.</s>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>",
        "Answer the question using a single word or phrase.",
        "Is there a blue square in the image? Answer yes or no.",
        "How many triangles are there? Please provide the bounding box coordinate of the region.",
        "0123456789 0.0 0.1 0.25 0.5 0.75 1.0 [0.12, 0.34, 0.56, 0.78] 100 1000",
    ]
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"a {colour} {shape}. The {colour} {shape} is on the left. {colour} {shape}s")
    for number, shape in itertools.product(_NUMBERS, _SHAPES):
        lines.append(f"There are {number} {shape}s. How many {shape}s are there? {number.capitalize()}.")
    for place in _PLACES:
        lines.append(f"The object is at the {place} of the image, {place}.")
    lines.append(" ".join(_WORDS))
    lines.extend(w.capitalize() for w in _WORDS)
    return lines * 4


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def main(out_dir: str | None = None) -> None:
    from convllava.processing.tokenizer import TINY_TOKENIZER_DIR

    target = Path(out_dir) if out_dir else TINY_TOKENIZER_DIR
    build_tiny_tokenizer().save_pretrained(str(target))
    print(f"wrote {target}")


if __name__ == "__main__":
    main(*sys.argv[1:])
