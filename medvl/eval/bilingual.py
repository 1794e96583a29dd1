"""Cross-language agreement: does the model give the same answer to the same question asked
in Chinese and in English about the same image? Qilin-Med-VL's users ask in Chinese, and a
benchmark score in one language says nothing about the other.

Records of the same question in two languages share a ``pair`` key and carry ``lang``
(``medvl import-vqa --format slake`` sets both). A pair agrees when both answers are right,
or both are wrong with the same normalised answer (yes/no folded across 是/否, a closed
answer mapped to the choice it names). Two right answers agree even when each is in its own
language (Lung / 肺); two wrong open answers agree only if they are the same text, because
free text in two languages cannot be compared without a translation: the figure is then a
lower bound where both are wrong in their own words.
"""

from __future__ import annotations

from collections import defaultdict

from medvl.eval.metrics import named_answer
from medvl.eval.report import group_rows
from medvl.eval.stats import wilson


def right(row: dict) -> bool:
    """A closed answer that names the reference, or an open one that holds all of it."""
    s = row["scores"]
    return s.get("closed_accuracy", s.get("open_recall", 0.0)) == 1.0


def agrees(a: dict, b: dict) -> bool:
    if right(a) or right(b):
        return right(a) and right(b)
    return named_answer(a["prediction"], a) == named_answer(b["prediction"], b)


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(first-language row, other-language row) for every ``pair`` key held by exactly two rows
    in two languages; an unmatched half (the other language filtered out or limited away) is
    left out."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("pair"):
            by_key[r["pair"]].append(r)
    out = []
    for two in by_key.values():
        if len(two) == 2 and two[0].get("lang") != two[1].get("lang"):
            out.append(tuple(sorted(two, key=lambda r: str(r.get("lang")))))
    return out


def agreement(rows: list[dict]) -> dict:
    """``pairs`` (count) and, per report group (of the pair's English or first-language row),
    ``n``, ``agree``, ``agreement`` with its 95% Wilson interval and ``both_right``."""
    found = pairs(rows)
    if not found:
        return {"pairs": 0}
    partner = {id(a): b for a, b in found}
    groups = {}
    for name, firsts in group_rows([a for a, _ in found]).items():
        if not firsts:
            continue
        k = sum(agrees(a, partner[id(a)]) for a in firsts)
        groups[name] = {"n": len(firsts), "agree": k, "agreement": k / len(firsts),
                        "agreement_ci": list(wilson(k, len(firsts))),
                        "both_right": sum(right(a) and right(partner[id(a)]) for a in firsts)}
    return {"pairs": len(found), "groups": groups}
