"""Segments -> ``input_ids`` and ``labels``, built side by side so the mask is exact."""

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


def encode_segments(
    segs: list[tuple[str, str]], tok: PreTrainedTokenizerBase, num_image_tokens: int
) -> Tokenized:
    """Tokenize each segment on its own; answers and their end token are the only labels.

    The image occupies ``num_image_tokens`` copies of the ``<image>`` id, which is how HF
    ``LlavaForConditionalGeneration`` expects expanded prompts.
    """
    ids: list[int] = [tok.bos_token_id] if tok.bos_token_id is not None else []
    out = Tokenized(ids, [IGNORE] * len(ids))
    question = 0
    for kind, text in segs:
        if kind == templates.IMAGE_SLOT:
            piece = [image_token_id(tok)] * num_image_tokens
        elif kind == templates.END and not text:
            piece = [tok.eos_token_id]
        else:
            piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained = kind in (templates.ANSWER, templates.END)
        out.labels += piece if trained else [IGNORE] * len(piece)
        if kind == templates.QUESTION:
            question += len(piece)
        elif kind == templates.ANSWER:
            out.question_tokens.append(question)
            out.answer_tokens.append(len(piece))
            question = 0
    return out
