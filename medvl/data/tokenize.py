"""A rendered prompt -> ``input_ids`` and ``labels``, as LLaVA's ``tokenizer_image_token``
tokenizes it, with labels read off each token's character offsets."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from medvl.data import templates
from medvl.tokenizer import image_token_id

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    question_tokens: list[int] = field(default_factory=list)  # per answered turn
    answer_tokens: list[int] = field(default_factory=list)


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> int | None:
    """Index of the span that characters ``[start, end)`` touch (an empty range: contains)."""
    for i, (a, b) in enumerate(spans):
        if (start < b and end > a) if end > start else a <= start < b:
            return i
    return None


def bos_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """The BOS a tokenizer adds by itself (Llama: ``<s>``; Qwen: none), kept once in front."""
    first = tok("").input_ids[:1]
    return first if first and first[0] == tok.bos_token_id else []


def encode(prompt: templates.Prompt, tok: PreTrainedTokenizerBase, num_image_tokens: int) -> Tokenized:
    """Tokenize the text between ``<image>`` tags chunk by chunk (each with the tokenizer's own
    leading-space handling, as LLaVA's chunks), one BOS in front, ``num_image_tokens`` image
    ids per tag (HF ``LlavaForConditionalGeneration``'s expanded form); a token is a label
    when it covers a character of a trained span (answer, its prefix, its end)."""
    ids = bos_ids(tok)
    out = Tokenized(ids, [IGNORE] * len(ids), [0] * len(prompt.questions), [0] * len(prompt.answers))
    base = 0
    for k, chunk in enumerate(prompt.text.split(templates.IMAGE)):
        if k:
            ids += [image_token_id(tok)] * num_image_tokens
            out.labels += [IGNORE] * num_image_tokens
            base += len(templates.IMAGE)
        enc = tok(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            s, e = s + base, e + base
            ids.append(token)
            out.labels.append(token if _overlaps(s, e, prompt.trained) is not None else IGNORE)
            for counts, spans in ((out.question_tokens, prompt.questions), (out.answer_tokens, prompt.answers)):
                if (i := _overlaps(s, e, spans)) is not None:
                    counts[i] += 1
        base += len(chunk)
    return out


def encode_turns(turns: list[tuple[str, str | None]], template: templates.Template,
                 tok: PreTrainedTokenizerBase, num_image_tokens: int) -> Tokenized:
    """``render`` + ``encode``: what preprocessing, serving and eval call."""
    return encode(templates.render(turns, template, tok.eos_token), tok, num_image_tokens)
