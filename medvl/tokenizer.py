"""Load any HF tokenizer directory (local or ``s3://``) and give it the tokens LLaVA needs.

The same function runs in preprocessing, training and serving, so the ``<image>`` and pad
token ids always agree with the model's ``image_token_index`` and ``pad_token_id``.
"""

from __future__ import annotations

import functools

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from medvl import storage

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def prepare(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``<image>`` (and a pad token when missing) as special tokens, idempotently.

    The pad token is added to the vocabulary, not just named: a name the vocabulary lacks
    would silently map padding to ``<unk>`` (Llama-2's tokenizer has no pad token).
    """
    extra: dict = {}
    if tok.pad_token is None:
        extra["pad_token"] = PAD_TOKEN
    if IMAGE_TOKEN not in tok.get_vocab():
        extra["additional_special_tokens"] = [IMAGE_TOKEN]
    if extra:
        tok.add_special_tokens(extra)
    return tok


@functools.lru_cache(maxsize=4)
def load(uri: str) -> PreTrainedTokenizerBase:
    """Tokenizer from a directory URI, cached per process (Ray tasks reuse workers)."""
    with storage.local_dir(uri, weights=False) as local:  # a model directory's weights stay behind
        return prepare(AutoTokenizer.from_pretrained(local))


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)
