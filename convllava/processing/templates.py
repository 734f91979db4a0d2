"""Conversation templates as data.

A template renders a conversation into (text, learned) segments. Only the assistant replies (and the
marker that ends them, so the model learns to stop) are learned; everything else is context. The
processor tokenizes the concatenated text once and labels tokens by these character spans, so the
rendered template and the labels cannot drift apart silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

IMAGE_TOKEN = "<image>"
# How a rendered prompt becomes tokens: in one pass with character offsets (ours), or per chunk around each image
# tag as LLaVA's `tokenizer_image_token` does (the tokens the released LLaVA-trained checkpoints saw).
Tokenization = Literal["one_pass", "llava"]
TOKENIZATIONS: tuple[str, ...] = get_args(Tokenization)

# LLaVA-style records say "human"/"gpt"; chat APIs say "user"/"assistant".
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message names the sample and the turn."""


@dataclass(frozen=True)
class ConversationTemplate:
    """How one chat format lays out system prompt, user turns and assistant replies.

    Attributes:
        name: registry key.
        system: default system prompt.
        system_format: wraps the system prompt ("{system}").
        user_format: wraps a user turn ("{content}").
        assistant_prefix: precedes each reply; context, not learned. A generation prompt ends with it.
        reply_format: the learned part: the reply and the end-of-reply marker ("{content}").
        after_reply: context appended after each reply (e.g. a newline between ChatML turns).
        stop: the string that ends a reply; generation stops on its token.
        user_image_only: keep only the `<image>` tags of user turns (LLaVA's `plain` pretraining format).
    """

    name: str
    system: str = ""
    system_format: str = "{system}"
    user_format: str = "{content}"
    assistant_prefix: str = ""
    reply_format: str = "{content}"
    after_reply: str = ""
    stop: str = ""
    user_image_only: bool = False

    def render(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = False,
        sample_id: str = "?",
    ) -> list[tuple[str, bool]]:
        """Render `messages` ([{"role"|"from": ..., "content"|"value": ...}]) to (text, learned) segments.

        Raises:
            ConversationError: unknown role, empty turn, or roles that do not alternate user/assistant
                starting with the user (after an optional leading system message).
        """
        turns = normalize_messages(messages, sample_id)
        system = self.system
        if turns and turns[0][0] == "system":
            system = turns[0][1]
            turns = turns[1:]
        for i, (role, _) in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ConversationError(
                    f"sample {sample_id}: turn {i} is from {role!r}, expected {expected!r} "
                    "(turns must alternate user/assistant, starting with the user)"
                )
        segments: list[tuple[str, bool]] = []
        if system:
            segments.append((self.system_format.format(system=system), False))
        for role, content in turns:
            if role == "user":
                if self.user_image_only:
                    content = IMAGE_TOKEN * content.count(IMAGE_TOKEN)
                segments.append((self.user_format.format(content=content), False))
            else:
                segments.append((self.assistant_prefix, False))
                segments.append((self.reply_format.format(content=content), True))
                if self.after_reply:
                    segments.append((self.after_reply, False))
        if add_generation_prompt:
            if turns and turns[-1][0] != "user":
                raise ConversationError(f"sample {sample_id}: a generation prompt must end with a user turn")
            segments.append((self.assistant_prefix, False))
        return [(text, learned) for text, learned in segments if text]


def normalize_messages(messages: list[dict[str, str]], sample_id: str = "?") -> list[tuple[str, str]]:
    """[(role, content)] with roles mapped to user/assistant/system; rejects malformed turns."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"sample {sample_id}: 'conversations' must be a non-empty list")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConversationError(f"sample {sample_id}: turn {i} is not an object")
        raw_role = message.get("from", message.get("role"))
        content = message.get("value", message.get("content"))
        if raw_role not in ROLE_ALIASES:
            raise ConversationError(f"sample {sample_id}: turn {i} has unknown role {raw_role!r}")
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"sample {sample_id}: turn {i} ({raw_role}) is empty")
        role = ROLE_ALIASES[raw_role]
        if role == "system" and i != 0:
            raise ConversationError(f"sample {sample_id}: turn {i}: a system message may only come first")
        turns.append((role, content))
    return turns


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, ConversationTemplate] = {
    # LLaVA's conv_vicuna_v1 (sep " ", sep2 "</s>"), used by ConvLLaVA in all three stages.
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1",
        system=VICUNA_SYSTEM,
        system_format="{system} ",
        user_format="USER: {content} ",
        assistant_prefix="ASSISTANT:",
        reply_format=" {content}</s>",
        stop="</s>",
    ),
    # LLaVA's conv_llava_plain: image then caption, for projector pretraining.
    "plain": ConversationTemplate(
        name="plain",
        user_format="{content}",
        reply_format="{content}\n",
        stop="\n",
        user_image_only=True,
    ),
    # ChatML (Qwen, many modern chat models).
    "chatml": ConversationTemplate(
        name="chatml",
        system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        reply_format="{content}<|im_end|>",
        after_reply="\n",
        stop="<|im_end|>",
    ),
}


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}") from None
