"""LLaVA-Med's scoring (``llava/eval/run_eval.py``), reproduced so our figures can sit beside
published ones. It differs from ours on purpose-free details that move the numbers:

- text is lower-cased and VQA-normalised (punctuation dropped or spaced, periods not before a
  digit removed, number words to digits, articles dropped; the script's contraction table,
  which only rewrites English words typed without their apostrophe, is not reproduced);
- closed questions: a prediction containing ``yes`` or ``no`` *anywhere* (``"not"``, ``"know"``
  count) scores 1 when it contains the normalised answer, and is **left out of the average**
  when it does not; a prediction with neither scores 0;
- open questions: recall over whitespace tokens with repeats (a Chinese sentence is one token).
"""

from __future__ import annotations

import re
from collections import Counter

PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!"]
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the script's pattern, look-behind typo included
DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def normalize(text: str) -> str:
    text = text.lower()
    out = text
    for p in PUNCT:  # dropped next to a space (or anywhere, once a digit comma is seen), else spaced
        spaced = p + " " in text or " " + p in text or DIGIT_COMMA.search(text) is not None
        out = out.replace(p, "" if spaced else " ")
    out = PERIOD.sub("", out)
    words = [NUMBERS.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in ARTICLES).replace(",", "")


def recall(prediction: str, answer: str) -> float:
    """``calculate_f1score``'s recall: shared tokens weighted by their count in the prediction."""
    pred, ref = Counter(normalize(prediction).split()), Counter(normalize(answer).split())
    if not pred or not ref:
        return 0.0
    tp = sum(n for w, n in pred.items() if w in ref)
    fn = sum(n for w, n in ref.items() if w not in pred)
    return tp / (tp + fn) if tp else 0.0


def closed_hit(prediction: str, answer: str) -> int | None:
    """1, 0, or ``None`` (left out of the average, as the script does)."""
    pred, ref = normalize(prediction), normalize(answer)
    if "yes" in pred or "no" in pred:
        return 1 if ref in pred else None
    return 0


def scores(rows: list[dict]) -> dict:
    """LLaVA-Med's two headline figures over eval rows (``prediction``, ``answer``,
    ``answer_type``), with the number of closed answers the script actually counts."""
    closed = [closed_hit(r["prediction"], r["answer"]) for r in rows if r["answer_type"] == "closed"]
    counted = [h for h in closed if h is not None]
    opened = [recall(r["prediction"], r["answer"]) for r in rows if r["answer_type"] == "open"]
    return {"closed_accuracy": sum(counted) / len(counted) if counted else 0.0,
            "closed_counted": len(counted), "closed_total": len(closed),
            "open_recall": sum(opened) / len(opened) if opened else 0.0}
