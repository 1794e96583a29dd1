"""VQA and caption metrics following LLaVA-Med's protocol, for Chinese and English answers.

Closed questions (yes/no or multiple choice) score accuracy after normalisation: the
prediction is mapped to one of the candidate choices (Chinese and English yes/no forms
are folded together first). Open questions score recall (the share of ground-truth
tokens found in the prediction, LLaVA-Med's headline open metric), exact match and
token F1. Free text also gets BLEU-4 (sacrebleu) and ROUGE-L (rouge-score), both at
character level for Chinese, as is usual for Chinese generation.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

# 包含/不包含 (contains / does not): SLAKE's Chinese answers to "Does the picture contain X?"
YES = {"是", "是的", "对", "有", "正确", "包含", "包括", "yes", "y", "true", "correct"}
NO = {"否", "不是", "不", "没有", "无", "不对", "错误", "不包含", "不包括", "no", "n", "false", "incorrect"}
LEAD_YES = {"是", "对", "有", "yes", "y", "true", "correct"}  # first token of a longer answer
LEAD_NO = {"否", "不", "没", "无", "错", "no", "n", "false", "incorrect"}
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[a-z0-9]+(?:\.[0-9]+)?")


def normalize(text: str) -> str:
    """NFKC (full-width -> ASCII), lower case, no punctuation or spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if not unicodedata.category(c).startswith(("P", "Z", "C")))


def canonical(text: str) -> str:
    """``normalize`` plus yes/no folding: 「是的」, 'Yes.' and 'yes' all become 'yes'."""
    norm = normalize(text)
    return "yes" if norm in YES else "no" if norm in NO else norm


def tokens(text: str) -> list[str]:
    """Words for scoring: one token per CJK character, Latin words and numbers whole."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def leading_yes_no(prediction: str) -> str | None:
    """'yes'/'no' when an answer opens with one: 「是，这是CT图像」, 「不是」, 'No, it is not'."""
    words = tokens(prediction)
    if not words:
        return None
    return "yes" if words[0] in LEAD_YES else "no" if words[0] in LEAD_NO else None


def choose(prediction: str, choices: list[str]) -> str | None:
    """The choice a free-text prediction names: exact match, a leading yes/no, else the single
    choice it contains (None when it names none or several)."""
    canon = {canonical(c): c for c in choices}
    if (pred := canonical(prediction)) in canon:
        return canon[pred]
    lead = leading_yes_no(prediction)
    if lead and {"yes", "no"} <= canon.keys():
        return canon[lead]
    words = f" {' '.join(tokens(prediction))} "  # whole tokens: "no" is not inside "normal"
    found = [c for c in choices if tokens(c) and f" {' '.join(tokens(c))} " in words]
    return found[0] if len(found) == 1 else None


def options(answer: str, choices: list[str] | None) -> list[str]:
    """What a closed answer is chosen from: its choices, yes/no, else the answer alone."""
    return list(choices) if choices else (["yes", "no"] if canonical(answer) in ("yes", "no") else [answer])


def closed_correct(prediction: str, answer: str, choices: list[str] | None) -> bool:
    picked = choose(prediction, options(answer, choices))
    return picked is not None and canonical(picked) == canonical(answer)


def named_answer(prediction: str, record: dict) -> str:
    """The normalised answer a prediction gives: for a closed question the choice it names
    (「是的，可以看到」 -> 'yes'), otherwise its own normalised text."""
    picked = choose(prediction, options(record["answer"], record.get("choices"))) \
        if answer_type(record) == "closed" else None
    return canonical(prediction if picked is None else picked)


def exact_match(prediction: str, answer: str) -> float:
    return float(canonical(prediction) == canonical(answer))


def recall(prediction: str, answer: str) -> float:
    """Share of the answer's tokens that appear in the prediction (LLaVA-Med's open metric)."""
    ref = tokens(answer)
    if not ref:
        return 0.0
    pred = set(tokens(prediction))
    return sum(t in pred for t in ref) / len(ref)


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD-style F1 over the multisets of tokens."""
    pred, ref = tokens(prediction), tokens(answer)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


class _CharTokenizer:
    """rouge-score's tokenizer interface, splitting like ``tokens`` (its default drops CJK)."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


_BLEU = BLEU(tokenize="zh", effective_order=True)  # 'zh': every CJK character is a token
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())


def bleu4(prediction: str, answer: str) -> float:
    """Sentence BLEU-4 in [0, 1] (sacrebleu reports percent)."""
    return _BLEU.sentence_score(prediction, [answer]).score / 100.0


def rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F-measure at character level."""
    return _ROUGE.score(answer, prediction)["rougeL"].fmeasure


def answer_type(record: dict) -> str:
    """``closed`` / ``open`` / ``caption`` from the record, inferring closed for yes/no answers."""
    kind = str(record.get("answer_type") or "").lower()
    if kind in ("closed", "open", "caption"):
        return kind
    return "closed" if record.get("choices") or canonical(record["answer"]) in ("yes", "no") else "open"


def score(prediction: str, record: dict) -> dict[str, float]:
    """All metrics that apply to one example (``record``: answer, answer_type, choices)."""
    answer, kind = record["answer"], answer_type(record)
    out = {"exact_match": exact_match(prediction, answer), "token_f1": token_f1(prediction, answer)}
    if kind == "closed":
        out["closed_accuracy"] = float(closed_correct(prediction, answer, record.get("choices")))
    else:
        out["open_recall"] = recall(prediction, answer)
        out["bleu4"] = bleu4(prediction, answer)
        out["rouge_l"] = rouge_l(prediction, answer)
    return out
