"""The label mask is exact: unmasked label tokens decode to precisely the answers."""

import pytest

from medvl.data import templates
from medvl.data.tokenize import IGNORE, encode_segments
from medvl.tokenizer import image_token_id
from tests.conftest import CHINESE_QA_TEXT

TURNS = [
    ("<image>\n" + CHINESE_QA_TEXT[1], CHINESE_QA_TEXT[2]),
    ("这是什么检查？", CHINESE_QA_TEXT[0]),
]


def _answer_spans(labels):
    """Contiguous runs of trained positions."""
    spans, cur = [], []
    for t in labels:
        if t == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    return spans + ([cur] if cur else [])


# ChatML needs <|im_start|>/<|im_end|> as special tokens (Qwen's byte-level BPE has them).
@pytest.mark.parametrize("tok_name, template", [
    ("bpe_tokenizer", "v1"), ("bpe_tokenizer", "chatml"), ("bpe_tokenizer", "plain"),
    ("spm_tokenizer", "v1"), ("spm_tokenizer", "plain"),
])
def test_labels_decode_exactly_to_answers(tok_name, template, request):
    tok = request.getfixturevalue(tok_name)
    turns = TURNS[:1] if template == "plain" else TURNS
    enc = encode_segments(templates.render(turns, templates.get(template)), tok, num_image_tokens=7)
    assert len(enc.input_ids) == len(enc.labels)
    spans = _answer_spans(enc.labels)
    assert len(spans) == len(turns)
    end = templates.get(template).answer_end
    end_id = tok.eos_token_id if end is None else tok.convert_tokens_to_ids(end)
    for span, (_, answer) in zip(spans, turns, strict=True):
        assert span[-1] == end_id  # the model learns to stop
        assert tok.decode(span[:-1]) == answer
    # Every trained token is the input token at that position (no drift).
    assert all(lab in (IGNORE, t) for t, lab in zip(enc.input_ids, enc.labels, strict=True))
    assert enc.input_ids.count(image_token_id(tok)) == 7


def test_generation_prompt_is_the_training_prefix(bpe_tokenizer):
    """Serving's open prompt equals the training sample up to the first answer."""
    tpl = templates.get("v1")
    train = encode_segments(templates.render(TURNS[:1], tpl), bpe_tokenizer, 4)
    prompt = encode_segments(templates.render([(TURNS[0][0], None)], tpl), bpe_tokenizer, 4)
    first_label = next(i for i, t in enumerate(train.labels) if t != IGNORE)
    assert prompt.input_ids == train.input_ids[:first_label]


def test_prepare_adds_a_real_pad_token_to_a_llama_tokenizer(spm_tokenizer_dir):
    """Llama-2's tokenizer has no pad token: it must get its own id, not fall back to <unk>."""
    from transformers import PreTrainedTokenizerFast

    from medvl.tokenizer import prepare

    raw = PreTrainedTokenizerFast.from_pretrained(spm_tokenizer_dir)
    assert raw.pad_token is None
    tok = prepare(raw)
    ids = {tok.pad_token_id, image_token_id(tok), tok.unk_token_id}
    assert len(ids) == 3 and max(ids) < len(tok)
    assert len(prepare(tok)) == len(tok)  # idempotent
