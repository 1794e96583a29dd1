"""Eval report: ``metrics.json``, ``report.md`` (overall / per answer type / per modality, and
the worst-scored examples), ``metrics.png`` (bar chart) and ``predictions.jsonl``."""

from __future__ import annotations

import io
import json

import numpy as np

from medvl import storage

METRICS = ("closed_accuracy", "open_recall", "exact_match", "token_f1", "bleu4", "rouge_l")
PLOTTED = ("closed_accuracy", "open_recall", "token_f1", "rouge_l")
GROUPS = ("task", "answer_type", "modality")  # the report's breakdowns (task: e.g. the demo's finding/modality)


def summarize(rows: list[dict]) -> dict:
    """Mean of each metric over the rows it applies to, the row count and the closed
    questions' chance accuracy (a score means little without it)."""
    out: dict = {"n": len(rows)}
    if (chance := closed_chance(rows)) is not None:
        out["closed_chance"] = chance
    for m in METRICS:
        vals = [r["scores"][m] for r in rows if m in r["scores"]]
        if vals:
            out[m] = float(np.mean(vals))
    return out


def closed_chance(rows: list[dict]) -> float | None:
    """Accuracy of guessing uniformly among the choices (yes/no: 0.5)."""
    closed = [r for r in rows if r["answer_type"] == "closed"]
    if not closed:
        return None
    return float(np.mean([1 / len(r["choices"]) if r.get("choices") else 0.5 for r in closed]))


def aggregate(rows: list[dict]) -> dict:
    groups = {key: {v: summarize([r for r in rows if r.get(key) == v]) for v in sorted({r.get(key) for r in rows})}
              for key in GROUPS}
    return {"n": len(rows), "errors": sum(bool(r["error"]) for r in rows), "overall": summarize(rows),
            "closed_chance": closed_chance(rows), **{f"by_{key}": groups[key] for key in GROUPS}}


def worst(rows: list[dict], k: int = 10) -> list[dict]:
    """Lowest-scoring examples (closed: accuracy; otherwise token F1), errors first."""
    def key(r):
        s = r["scores"]
        return (not r["error"], s.get("closed_accuracy", s["token_f1"]), r["index"])
    return sorted(rows, key=key)[:k]


def markdown(metrics: dict, rows: list[dict]) -> str:
    head = "| group | n | " + " | ".join(METRICS) + " | closed chance |"
    lines = [f"# Evaluation: {metrics['model']}", "", f"Data: `{metrics['data']}`, {metrics['n']} questions, "
             f"{metrics['errors']} unreadable inputs (scored wrong).", ""]
    if metrics["closed_chance"] is not None:
        lines += [f"Chance accuracy on the closed questions: {metrics['closed_chance']:.3f}.", ""]
    lines += ["The table is medvl's protocol (closed: the answer named alone, yes/no folded in Chinese "
              "and English; open: character-level recall).", ""]
    if (lm := metrics.get("llava_med")) is not None:
        lines += [f"LLaVA-Med's protocol (its `run_eval.py`, comparable with published figures): closed "
                  f"accuracy {lm['closed_accuracy']:.3f} over the {lm['closed_counted']} of "
                  f"{lm['closed_total']} closed answers it counts, open recall {lm['open_recall']:.3f}.", ""]
    lines += [head, "|" + "---|" * (len(METRICS) + 3)]
    groups = [("overall", metrics["overall"])]
    for key in GROUPS:
        groups += [(f"{key}: {v}", s) for v, s in metrics.get(f"by_{key}", {}).items()]
    for name, s in groups:
        cells = " | ".join(f"{s[m]:.3f}" if m in s else "–" for m in METRICS)
        chance = f"{s['closed_chance']:.3f}" if "closed_chance" in s else "–"
        lines.append(f"| {name} | {s['n']} | {cells} | {chance} |")
    lines += ["", "## Worst-scored examples", "", "| id | question | expected | predicted | note |",
              "|---|---|---|---|---|"]
    for r in worst(rows):
        cell = [str(x).replace("|", "\\|").replace("\n", " ") for x in
                (r["id"], r["question"], r["answer"], r["prediction"], r["error"])]
        lines.append("| " + " | ".join(cell) + " |")
    return "\n".join(lines) + "\n"


ASCII_NAMES = {"磁共振": "MR", "X线": "X-ray", "超声": "US", "病理": "pathology", "未知": "unknown"}


def _tick(label: str, cjk: bool) -> str:
    """Chinese group names need a CJK font; without one, use English names (no tofu boxes)."""
    return label if cjk or label.isascii() else ASCII_NAMES.get(label, label.encode("unicode_escape").decode())


def bar_chart(metrics: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    cjk_fonts = [f.name for f in font_manager.fontManager.ttflist
                 if any(k in f.name for k in ("CJK", "WenQuanYi", "SimHei", "Hei", "Ming"))]
    if cjk_fonts:
        plt.rcParams["font.sans-serif"] = [cjk_fonts[0], *plt.rcParams["font.sans-serif"]]
    shown = {"overall": metrics["overall"]}
    for key in GROUPS:
        by = metrics.get(f"by_{key}", {})
        if key != "task" or len(by) > 1:  # one task ("vqa") would only repeat "overall"
            shown.update(by)
    groups = {_tick(k, bool(cjk_fonts)): v for k, v in shown.items()}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 3.5))
    width = 0.8 / len(PLOTTED)
    for j, m in enumerate(PLOTTED):
        ax.bar(np.arange(len(groups)) + j * width, [g.get(m, 0.0) for g in groups.values()], width, label=m)
    label = "chance (closed)"
    for i, g in enumerate(groups.values()):  # closed accuracy's chance level, over its group's bars
        if "closed_chance" in g:
            ax.hlines(g["closed_chance"], i - width / 2, i + 0.8 - width / 2, colors="black",
                      linestyles="--", linewidth=1, label=label)
            label = None  # one legend entry
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, list(groups), rotation=20)
    ax.set(ylim=(0, 1), ylabel="score", title="medvl eval")
    ax.legend(fontsize=7, ncols=len(PLOTTED))
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(rows: list[dict], output: str, meta: dict) -> dict:
    metrics = {**meta, **aggregate(rows)}
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, ensure_ascii=False, indent=2))
    storage.write_text(storage.join(output, "report.md"), markdown(metrics, rows))
    storage.write_bytes(storage.join(output, "metrics.png"), bar_chart(metrics))
    keep = ("id", "image", "modality", "answer_type", "question", "answer", "choices", "prediction",
            "error", "scores")
    storage.write_text(storage.join(output, "predictions.jsonl"), "".join(
        json.dumps({k: r[k] for k in keep}, ensure_ascii=False) + "\n" for r in rows))
    return metrics
