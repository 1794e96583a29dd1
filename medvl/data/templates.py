"""Conversation templates, rendered as segments so labels can never drift from tokens.

LLaVA renders a whole conversation to one string, tokenizes it, then re-tokenizes pieces
to guess where answers start; when the guesses disagree with the real tokenization the
whole sample is silently masked (LLaVA #661/#1166). Here a conversation becomes a list
of segments (prompt text, answer text, end-of-answer, image), each tokenized on its own
and concatenated, so every token's label is known by construction. Serving builds its
prompts with the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = "<image>"

# Segment kinds. A question is prompt text too (never trained); its own kind lets the
# token statistics count it from the same tokenisation.
PROMPT, QUESTION, ANSWER, END, IMAGE_SLOT = "prompt", "question", "answer", "end", "image"


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user_prefix: str
    assistant_prefix: str  # text between a question and its answer
    answer_end: str | None  # text closing an answer; None = the tokenizer's EOS token
    turn_sep: str = ""  # text after each answer, not trained
    keep_question: bool = True  # "plain" keeps only the image from the human turn


TEMPLATES = {
    # Stage 1, feature alignment: image then caption (LLaVA "plain").
    "plain": Template("plain", "", "", "", None, keep_question=False),
    # Stage 2 of Qilin-Med-VL: Vicuna v1 (LLaVA "v1").
    "v1": Template(
        "v1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. ",
        "USER: ",
        " ASSISTANT: ",
        None,
    ),
    # Qwen-style ChatML.
    "chatml": Template(
        "chatml",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>",
        turn_sep="\n",
    ),
}


def get(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; choose from {sorted(TEMPLATES)}") from None


def _question_segments(text: str, template: Template) -> list[tuple[str, str]]:
    """A human turn -> prompt/image segments; ``<image>`` (and one newline after it) -> slot."""
    segs: list[tuple[str, str]] = []
    parts = text.split(IMAGE)
    for i, part in enumerate(parts):
        if i > 0:
            segs.append((IMAGE_SLOT, ""))
            part = part.removeprefix("\n")
        if template.keep_question and part:
            segs.append((QUESTION, part))
    return segs


def render(turns: list[tuple[str, str | None]], template: Template) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` -> ``[(kind, text), ...]``.

    A final ``answer`` of ``None`` leaves the assistant turn open: the prompt for generation.
    """
    segs: list[tuple[str, str]] = [(PROMPT, template.system)] if template.system else []
    for question, answer in turns:
        if template.user_prefix:
            segs.append((PROMPT, template.user_prefix))
        segs += _question_segments(question, template)
        if template.assistant_prefix:
            segs.append((PROMPT, template.assistant_prefix))
        if answer is None:
            break
        segs += [(ANSWER, answer), (END, template.answer_end or "")]
        if template.turn_sep:
            segs.append((PROMPT, template.turn_sep))
    return segs
