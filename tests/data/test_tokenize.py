"""Token ids and labels: exactly LLaVA v1.1.1's on the Llama-2 vocabulary, and exact labels
(the trained tokens are the answers) on any tokenizer."""

from pathlib import Path

import pytest

from medvl.data import templates
from medvl.data.tokenize import IGNORE, encode_turns
from medvl.tokenizer import image_token_id
from tests.conftest import CHINESE_QA_TEXT

TURNS = [
    ("<image>\n" + CHINESE_QA_TEXT[1], CHINESE_QA_TEXT[2]),
    ("这是什么检查？", CHINESE_QA_TEXT[0]),
]
LLAMA2 = Path(__file__).parents[1] / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="module")
def llama2():
    from medvl.tokenizer import load

    return load(str(LLAMA2))


# --- LLaVA v1.1.1, re-implemented from llava/conversation.py and llava/train/train.py ---------
LLAVA_IMAGE = -200  # IMAGE_TOKEN_INDEX
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def llava_multimodal(value: str) -> str:
    """preprocess_multimodal (mm_use_im_start_end off)."""
    if "<image>" in value:
        value = "<image>\n" + value.replace("<image>", "").strip()
        value = value.strip()
    return value


def llava_tokenizer_image_token(prompt: str, tok) -> list[int]:
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, c in enumerate(chunks):  # insert_separator(chunks, [IMAGE] * (offset + 1)), each item [offset:]
        if i:
            ids += ([LLAVA_IMAGE] * (offset + 1))[offset:]
        ids += c[offset:]
    return ids


def llava_v1(turns: list[tuple[str, str]], tok) -> tuple[list[int], list[int]]:
    """conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO) + preprocess_v1's round-length mask."""
    messages = [m for q, a in turns for m in (("USER", llava_multimodal(q)), ("ASSISTANT", a))]
    seps = [" ", "</s>"]
    prompt = VICUNA_SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        prompt += role + ": " + message + seps[i % 2]
    ids = llava_tokenizer_image_token(prompt, tok)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE] * cur
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(llava_tokenizer_image_token(rou, tok))
        instruction_len = len(llava_tokenizer_image_token(parts[0], tok)) - 2
        target[cur:cur + instruction_len] = [IGNORE] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    if cur != len(ids):  # LLaVA's "tokenization mismatch" warning: the sample trains on nothing
        target = [IGNORE] * len(ids)
    return ids, target


def llava_plain(caption: str, tok) -> tuple[list[int], list[int]]:
    """preprocess_plain: "<image>" + caption + conv_llava_plain.sep ("\\n")."""
    ids = llava_tokenizer_image_token("<image>" + caption + "\n", tok)
    n = len(llava_tokenizer_image_token("<image>", tok))
    return ids, [IGNORE] * n + ids[n:]


def ours(turns, template: str, tok) -> tuple[list[int], list[int]]:
    """Our encoding with LLaVA's unexpanded image (one placeholder, id -200)."""
    enc = encode_turns(turns, templates.get(template), tok, num_image_tokens=1)
    img = image_token_id(tok)
    return [LLAVA_IMAGE if t == img else t for t in enc.input_ids], enc.labels


RECORDS = {
    "zh, image first": [("<image>\n" + CHINESE_QA_TEXT[1], CHINESE_QA_TEXT[2]), ("这是什么检查？", "磁共振")],
    "zh, image last": [(CHINESE_QA_TEXT[1] + "\n<image>", CHINESE_QA_TEXT[2])],
    "en, image mid, 3 turns": [("What is <image> shown here?", "A chest X-ray."),
                               ("Any effusion?", "Yes, on the left."), ("Is it large?", "No")],
    "en, image only": [("<image>", "Normal study.")],
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_v1_ids_and_labels_equal_llava(llama2, name):
    turns = RECORDS[name]
    ids, labels = ours(turns, "v1", llama2)
    ref_ids, ref_labels = llava_v1(turns, llama2)
    assert ids == ref_ids
    assert labels == ref_labels


@pytest.mark.parametrize("caption", ["胸部X线片显示右下肺野片状阴影。", "Axial CT of the abdomen.", " spaced "])
def test_plain_ids_and_labels_equal_llava(llama2, caption):
    question = "<image>\nDescribe the image briefly."  # plain drops the human text
    assert ours([(question, caption)], "plain", llama2) == llava_plain(caption, llama2)


def test_v1_generation_prompt_is_llavas_and_the_training_prefix(llama2):
    """Serving ends its prompt with "ASSISTANT:", as LLaVA's; that is the training sample up to
    its first label, so the model continues where training taught it to."""
    question = "What is <image> shown here?"
    ids, labels = ours([(question, "A chest X-ray.")], "v1", llama2)
    prompt, _ = ours([(question, None)], "v1", llama2)
    assert prompt == ids[:next(i for i, t in enumerate(labels) if t != IGNORE)]
    ref = llava_tokenizer_image_token(f"{VICUNA_SYSTEM} USER: {llava_multimodal(question)} ASSISTANT:", llama2)
    assert prompt == ref


def test_where_llavas_round_arithmetic_fails_ours_does_not(bpe_tokenizer):
    """A byte-level BPE without BOS (Qwen-like; our demo tokenizer's vocabulary): LLaVA's per-round lengths
    (a BOS counted per round, "- 2" for BOS + a lone "▁") do not add up to the sample's length,
    so LLaVA masks the whole sample (its "tokenization mismatch", LLaVA #661/#1166). Ours
    trains on exactly " " + answer + EOS of every turn, with the same token ids."""
    from transformers import PreTrainedTokenizerFast

    from medvl.tokenizer import prepare

    tok = prepare(PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="</s>",
                                          add_bos_token=False))
    turns = [("<image>\n这是什么检查？", "胸部X线"), ("左侧还是右侧？", "右侧")]
    assert tok("").input_ids == []  # no BOS
    enc = encode_turns(turns, templates.get("v1"), tok, num_image_tokens=1)
    assert [tok.decode(s) for s in _trained_spans(enc.labels)] == [f" {a}{tok.eos_token}" for _, a in turns]
    ids, _ = ours(turns, "v1", tok)
    ref_ids, ref_labels = llava_v1(turns, tok)
    assert ids == ref_ids
    assert set(ref_labels) == {IGNORE}


def _trained_spans(labels):
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
    ("spm_tokenizer", "v1"), ("spm_tokenizer", "plain"), ("llama2", "v1"), ("llama2", "plain"),
])
def test_labels_decode_exactly_to_answers(tok_name, template, request):
    tok = request.getfixturevalue(tok_name)
    turns = TURNS[:1] if template == "plain" else TURNS
    tpl = templates.get(template)
    enc = encode_turns(turns, tpl, tok, num_image_tokens=7)
    assert len(enc.input_ids) == len(enc.labels)
    spans = _trained_spans(enc.labels)
    assert len(spans) == len(turns)
    end = tok.eos_token if tpl.answer_end is None else tpl.answer_end
    for span, (_, answer) in zip(spans, turns, strict=True):
        assert tok.decode(span).strip() == (answer + end).strip()  # the model learns to stop
    # Every trained token is the input token at that position (no drift).
    assert all(lab in (IGNORE, t) for t, lab in zip(enc.input_ids, enc.labels, strict=True))
    assert enc.input_ids.count(image_token_id(tok)) == 7
    assert enc.input_ids[0] == tok.bos_token_id  # one BOS in front (the demo model collapsed without it)
    assert len(enc.answer_tokens) == len(turns) and all(n > 0 for n in enc.answer_tokens)
    assert all(n > 0 for n in enc.question_tokens) == tpl.keep_question


def test_generation_prompt_is_the_training_prefix(bpe_tokenizer):
    """Serving's open prompt equals the training sample up to the first answer."""
    tpl = templates.get("v1")
    train = encode_turns(TURNS[:1], tpl, bpe_tokenizer, 4)
    prompt = encode_turns([(TURNS[0][0], None)], tpl, bpe_tokenizer, 4)
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
