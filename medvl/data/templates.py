"""Conversation templates: LLaVA's prompt strings, exactly, with the trained spans marked.

A conversation is rendered to the one string LLaVA v1.1.1 builds (``conv.get_prompt()``,
after ``preprocess_multimodal`` moved ``<image>`` to the front of its turn), and the
character span of every answer is recorded as the string is built. ``tokenize.encode``
then tokenizes that string as LLaVA's ``tokenizer_image_token`` does (split only at
``<image>``) and labels each token by the characters it covers, never by re-tokenising
pieces: LLaVA's length arithmetic is what silently masks whole samples when a tokenizer
does not behave like Llama-2's (LLaVA #661/#1166). Serving builds its prompts with the
same function, so a generation prompt is the training sample up to its first label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

IMAGE = "<image>"


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # text before the first turn
    user: str  # before each question
    assistant: str  # between a question and its answer: a generation prompt ends here
    answer_prefix: str  # trained text before an answer (v1: the space after "ASSISTANT:")
    answer_end: str | None  # closes an answer, trained; None = the tokenizer's EOS token
    turn_sep: str = ""  # after each answer, not trained
    keep_question: bool = True  # "plain" keeps only the image from the human turn


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES = {
    # Stage 1, feature alignment: "<image>" + caption + "\n" (LLaVA conv_llava_plain).
    "plain": Template("plain", "", "", "", "", "\n", keep_question=False),
    # Stage 2 of Qilin-Med-VL: LLaVA conv_vicuna_v1 (sep " ", sep2 "</s>"):
    # "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>".
    "v1": Template("v1", VICUNA_SYSTEM + " ", "USER: ", " ASSISTANT:", " ", None),
    # Qwen-style ChatML.
    "chatml": Template(
        "chatml",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
        "",
        "<|im_end|>",
        turn_sep="\n",
    ),
}


@dataclass
class Prompt:
    """A rendered conversation: the text and, per answered turn, character spans."""

    text: str
    trained: list[tuple[int, int]] = field(default_factory=list)  # prefix + answer + end
    questions: list[tuple[int, int]] = field(default_factory=list)  # for token statistics
    answers: list[tuple[int, int]] = field(default_factory=list)


def get(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; choose from {sorted(TEMPLATES)}") from None


def image_first(text: str) -> str:
    """LLaVA's ``preprocess_multimodal``: a turn with ``<image>`` becomes ``<image>\\n`` + the
    rest, stripped (a bare ``<image>`` stays bare)."""
    if IMAGE not in text:
        return text
    return (IMAGE + "\n" + text.replace(IMAGE, "").strip()).strip()


def render(turns: list[tuple[str, str | None]], template: Template, eos: str) -> Prompt:
    """``[(question, answer), ...]`` -> the prompt string and its spans. ``eos`` is the
    tokenizer's EOS text (``</s>`` for Llama). A final ``answer`` of ``None`` leaves the
    assistant turn open: the prompt for generation."""
    out = Prompt(template.system)

    def add(text: str) -> tuple[int, int]:
        start = len(out.text)
        out.text += text
        return start, len(out.text)

    for question, answer in turns:
        add(template.user)
        # "plain": the image alone stands for the human turn.
        q = image_first(question) if template.keep_question else (IMAGE if IMAGE in question else "")
        tag = len(q) - len(q.removeprefix(IMAGE).removeprefix("\n")) if q.startswith(IMAGE) else 0
        start = add(q)[0]
        span = (start + tag, len(out.text))  # the question without its image tag
        add(template.assistant)
        if answer is None:
            break
        start = add(template.answer_prefix)[0]
        out.answers.append(add(answer))
        out.trained.append((start, add(template.answer_end if template.answer_end is not None else eos)[1]))
        out.questions.append(span)
        add(template.turn_sep)
    return out


def chat_template(t: Template) -> str:
    """The Jinja chat template of ``t``: what ``render`` builds, for transformers' and vLLM's
    ``apply_chat_template`` (an image part puts ``<image>\\n`` in front of its turn's text;
    system messages are ignored, as by ``medvl serve``: the template's own is the trained one)."""
    q = json.dumps
    end = q(t.answer_end) if t.answer_end is not None else "eos_token"
    keep = "text" if t.keep_question else "''"
    return (
        "{{- " + q(t.system) + " -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- set img = false -%}"
        "{%- else -%}{%- set text = m['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}"
        "{%- set img = (m['content'] | selectattr('type', 'equalto', 'image') | list | length) > 0 -%}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{- " + q(t.user) + " + ((('<image>\\n' + " + keep + ".strip()) | trim) if img else " + keep + ") -}}"
        "{%- else -%}"
        "{{- " + q(t.assistant + t.answer_prefix) + " + text + " + end + " + " + q(t.turn_sep) + " -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + q(t.assistant) + " -}}{%- endif -%}"
    )
