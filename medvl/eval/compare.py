"""Paired comparisons of eval answers on the same questions: two runs (``medvl eval compare
RUN_A RUN_B``), or one run's real images against its controls. Paired tests, because the same
questions are easy or hard for both: closed accuracy by exact McNemar on the discordant
pairs, open recall (and token F1) by a paired bootstrap."""

from __future__ import annotations

import json

from medvl import storage
from medvl.eval.report import group_rows
from medvl.eval.stats import ALPHA, mcnemar, paired_bootstrap


def paired_by_group(a: list[dict], b: list[dict]) -> dict[str, dict]:
    """Group name -> metric -> test of ``b`` against ``a`` (rows in the same question order)."""
    if [r["id"] for r in a] != [r["id"] for r in b]:
        raise ValueError("paired comparison needs the same questions in the same order")
    index = {id(r): i for i, r in enumerate(a)}
    out = {}
    for name, rows in group_rows(a).items():
        pairs = [(r, b[index[id(r)]]) for r in rows]
        tests = {}
        closed = [(x, y) for x, y in pairs if "closed_accuracy" in x["scores"]]
        if closed:
            tests["closed_accuracy"] = mcnemar([x["scores"]["closed_accuracy"] == 1 for x, _ in closed],
                                               [y["scores"]["closed_accuracy"] == 1 for _, y in closed])
        for m in ("open_recall", "token_f1"):
            if scored := [(x, y) for x, y in pairs if m in x["scores"]]:
                tests[m] = paired_bootstrap([x["scores"][m] for x, _ in scored], [y["scores"][m] for _, y in scored])
        if tests:
            out[name] = tests
    return out


def load_predictions(run: str) -> list[dict]:
    """A run's answers with real images, in question order (``condition`` absent: older runs)."""
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "predictions.jsonl")).splitlines() if x]
    return [r for r in rows if r.get("condition", "image") == "image"]


def compare_runs(run_a: str, run_b: str) -> dict[str, dict]:
    """Paired tests of run B against run A; the runs must have answered the same questions."""
    a, b = load_predictions(run_a), load_predictions(run_b)
    by_id = {r["id"]: r for r in b}
    if len(by_id) != len(b) or sorted(by_id) != sorted(r["id"] for r in a):
        raise ValueError(f"{run_a} and {run_b} did not answer the same questions (ids differ)")
    if any(by_id[r["id"]]["answer"] != r["answer"] for r in a):
        raise ValueError(f"{run_a} and {run_b} hold different answers for the same ids")
    return paired_by_group(a, [by_id[r["id"]] for r in a])


def compare_markdown(run_a: str, run_b: str, tests: dict[str, dict]) -> str:
    """One line per group and metric: B - A, its 95% interval, p, and a plain verdict."""
    lines = [f"# {run_b} (B) vs {run_a} (A), paired on the same questions", "",
             "| group | metric | n | A | B | B − A [95% CI] | test | p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for name, per_metric in tests.items():
        for m, t in per_metric.items():
            said = ("B better" if t["diff"] > 0 else "A better") if t["p"] < ALPHA else "no significant difference"
            lines.append(f"| {name} | {m} | {t['n']} | {t['a']:.3f} | {t['b']:.3f} | {t['diff']:+.3f} "
                         f"[{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] | {t['test']} | {t['p']:.3g} | {said} |")
    return "\n".join(lines) + "\n"
