"""Eval report: ``metrics.json``, ``report.md`` (overall / per answer type / per modality with
95% intervals, the image-dependence controls beside chance, the split's provenance and the
run's set-up, and the worst-scored examples), ``metrics.png`` (bar chart with the intervals)
and ``predictions.jsonl`` (every condition's answers)."""

from __future__ import annotations

import io
import json

import numpy as np

from medvl import storage
from medvl.eval.stats import ALPHA, bootstrap_ci, wilson

METRICS = ("closed_accuracy", "open_recall", "exact_match", "token_f1", "bleu4", "rouge_l")
PLOTTED = ("closed_accuracy", "open_recall", "token_f1", "rouge_l")
GROUPS = ("task", "answer_type", "modality")  # the report's breakdowns (task: e.g. the demo's finding/modality)
CONTROLS = {"blank": "blank (CLIP mean colour)", "shuffled": "another record's"}


def interval(metric: str, vals: list[float]) -> tuple[float, float]:
    """95% interval: Wilson for an accuracy (0/1 per question), bootstrap for the rest."""
    if metric in ("closed_accuracy", "exact_match"):
        return wilson(int(round(sum(vals))), len(vals))
    return bootstrap_ci(vals)


def summarize(rows: list[dict]) -> dict:
    """Mean of each metric over the rows it applies to with its 95% interval (``{m}_ci``), the
    row count and the closed questions' chance accuracy (a score means little without it)."""
    out: dict = {"n": len(rows)}
    if (chance := closed_chance(rows)) is not None:
        out["closed_chance"] = chance
    for m in METRICS:
        vals = [r["scores"][m] for r in rows if m in r["scores"]]
        if vals:
            out[m] = float(np.mean(vals))
            out[f"{m}_ci"] = list(interval(m, vals))
    return out


def closed_chance(rows: list[dict]) -> float | None:
    """Accuracy of guessing uniformly among the choices (yes/no: 0.5)."""
    closed = [r for r in rows if r["answer_type"] == "closed"]
    if not closed:
        return None
    return float(np.mean([1 / len(r["choices"]) if r.get("choices") else 0.5 for r in closed]))


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """``overall`` and ``{key}: {value}`` for every breakdown in ``GROUPS`` -> its rows."""
    out = {"overall": rows}
    for key in GROUPS:
        out |= {f"{key}: {v}": [r for r in rows if r.get(key) == v] for v in sorted({r.get(key) for r in rows})}
    return out


def aggregate(rows: list[dict]) -> dict:
    groups = {key: {v: summarize([r for r in rows if r.get(key) == v]) for v in sorted({r.get(key) for r in rows})}
              for key in GROUPS}
    return {"n": len(rows), "errors": sum(bool(r["error"]) for r in rows), "overall": summarize(rows),
            "closed_chance": closed_chance(rows), **{f"by_{key}": groups[key] for key in GROUPS}}


def named_groups(metrics: dict) -> dict[str, dict]:
    """The summaries in ``metrics`` under the names ``group_rows`` gives them."""
    return {"overall": metrics["overall"], **{f"{key}: {v}": s for key in GROUPS
                                              for v, s in metrics.get(f"by_{key}", {}).items()}}


def worst(rows: list[dict], k: int = 10) -> list[dict]:
    """Lowest-scoring examples (closed: accuracy; otherwise token F1), errors first."""
    def key(r):
        s = r["scores"]
        return (not r["error"], s.get("closed_accuracy", s["token_f1"]), r["index"])
    return sorted(rows, key=key)[:k]


def verdict(s: dict) -> str | None:
    """Where a closed accuracy's interval sits against chance: ``above``/``at``/``below``."""
    if "closed_accuracy" not in s or "closed_chance" not in s:
        return None
    lo, hi = s["closed_accuracy_ci"]
    return "above" if lo > s["closed_chance"] else "below" if hi < s["closed_chance"] else "at"


def control_notes(metrics: dict) -> list[str]:
    """A plain sentence for every group whose closed accuracy stays above chance without its
    image (those questions are answered from the text or a prior, not from the picture), and
    for every group not above chance even with its images (nothing shows the image is used)."""
    controls, notes = metrics["controls"], []
    if not controls:
        return notes
    for name, s in named_groups(metrics).items():
        if verdict(s) in ("at", "below"):
            lo, hi = s["closed_accuracy_ci"]
            notes.append(f"{name}: closed accuracy with the real images is {s['closed_accuracy']:.3f} "
                         f"[{lo:.3f}, {hi:.3f}], not above chance {s['closed_chance']:.3f}: nothing here shows "
                         f"that the model uses the image.")
    for cond, c in controls.items():
        for name, s in c["groups"].items():
            if verdict(s) == "above":
                lo, hi = s["closed_accuracy_ci"]
                notes.append(f"{name}: with {CONTROLS[cond]} images closed accuracy is {s['closed_accuracy']:.3f} "
                             f"[{lo:.3f}, {hi:.3f}], above chance {s['closed_chance']:.3f}: the model is not "
                             f"looking at the image for these questions.")
        notes += open_recall_notes(cond, c["tests"])
    return notes


def open_recall_notes(cond: str, tests: dict[str, dict]) -> list[str]:
    """Open recall has no chance level, so its control is the paired test itself: where the
    score does not fall significantly without the real image, it was not earned from the image
    (a fixed phrase such as 「这是一张CT图像」 shares tokens with every reference)."""
    kept = [f"{name} ({t['a']:.3f} → {t['b']:.3f}, p={t['p']:.2g})" for name, per_metric in tests.items()
            if (t := per_metric.get("open_recall")) and (t["diff"] >= 0 or t["p"] >= ALPHA)]
    if not kept:
        return []
    return [f"open recall does not fall significantly with {CONTROLS[cond]} images in {'; '.join(kept)}: "
            f"these open scores do not depend on the image."]


def _cell(s: dict, m: str) -> str:
    return f"{s[m]:.3f} [{s[m + '_ci'][0]:.2f}, {s[m + '_ci'][1]:.2f}]" if m in s else "–"


def _p(test: dict | None) -> str:
    return "–" if not test else f"{test['diff']:+.3f} (p={test['p']:.2g})"


def controls_markdown(metrics: dict) -> list[str]:
    controls, shown = metrics.get("controls") or {}, named_groups(metrics)
    if not controls:
        return ["Image-dependence controls: off (`controls: false`).", ""]
    conds = list(controls)
    lines = ["## Image-dependence controls", "",
             "Every question asked again with a blank image (CLIP's mean colour: the value the vision tower "
             "normalises to zero, and LLaVA's padding colour, so it carries no content) and with another "
             "record's image (a fixed-seed derangement of the distinct images). A model that uses the image "
             "falls to chance under both; the change against the real image is an exact McNemar test (closed) "
             "or a paired bootstrap (open recall).", "",
             "| group | n | closed: image | " + " | ".join(conds) + " | chance | "
             + " | ".join(f"image → {c}" for c in conds) + " | open recall: image | "
             + " | ".join(conds) + " |", "|" + "---|" * (5 + 3 * len(conds))]
    for name, s in shown.items():
        cs = [controls[c]["groups"].get(name, {}) for c in conds]
        tests = [controls[c]["tests"].get(name, {}) for c in conds]
        closed = [f"{_cell(x, 'closed_accuracy')} ({verdict(x) or '–'})" for x in cs]
        chance = f"{s['closed_chance']:.3f}" if "closed_chance" in s else "–"
        lines.append(f"| {name} | {s['n']} | {_cell(s, 'closed_accuracy')} | {' | '.join(closed)} | {chance} | "
                     f"{' | '.join(_p(t.get('closed_accuracy')) for t in tests)} | {_cell(s, 'open_recall')} | "
                     f"{' | '.join(_cell(x, 'open_recall') for x in cs)} |")
    notes = metrics.get("control_notes") or ["Every group's closed accuracy is above chance with its images and "
                                             "falls to chance (or below) under both controls: the answers depend "
                                             "on the image."]
    return [*lines, "", *[f"- {n}" for n in notes], ""]


def bilingual_markdown(bi: dict | None) -> list[str]:
    """Cross-language agreement per group, or one line saying no question was paired."""
    if bi is None:
        return []
    if not bi["pairs"]:
        return ["Cross-language agreement: no question here is asked in both Chinese and English (records "
                "pair them with `pair` and `lang`; `import-vqa --format slake --lang all` sets both).", ""]
    lines = ["## Cross-language agreement", "",
             f"{bi['pairs']} questions asked in both languages about the same image. A pair agrees when both "
             "answers are right, or both wrong with the same normalised answer (是/否 = yes/no, a closed answer "
             "mapped to the choice it names); two wrong open answers in their own words count as disagreeing, "
             "so where they are wrong the figure is a lower bound. 95% Wilson intervals.", "",
             "| group | pairs | agreement | both right |", "|---|---|---|---|"]
    for name, g in bi["groups"].items():
        lo, hi = g["agreement_ci"]
        lines.append(f"| {name} | {g['n']} | {g['agreement']:.3f} [{lo:.2f}, {hi:.2f}] | {g['both_right']} |")
    return [*lines, ""]


def setup_markdown(metrics: dict) -> list[str]:
    """What a published number must match before it can be compared with ours."""
    setup, prov = metrics.get("setup") or {}, metrics.get("provenance") or {}
    lines = ["## Set-up and provenance", ""]
    if setup:
        regime = setup["regime"] if setup["regime"] != "unstated" else (
            "not stated (set `regime: zero-shot` or `fine-tuned` in the eval config)")
        lines += [f"- regime: {regime}", f"- prompt template: `{setup['template']}` "
                  f"(image aspect `{setup['aspect']}`)", f"- decoding: {setup['decoding']}"]
    if prov:
        lines += [f"- split: sha256 `{prov['sha256']}` over {prov['questions']} questions and "
                  f"{prov['images']} images (ids, questions, answers and image bytes)"]
        if (imp := prov.get("imported")) is not None:
            same = "matches" if imp["sha256"] == prov["sha256"] else "DIFFERS from"
            lines.append(f"- imported by `medvl import-vqa` ({imp['format']}, split {imp['split']}) from "
                         f"{', '.join(f'`{f}`' for f in imp['sources'])}: {imp['questions']} questions, "
                         f"{imp['images']} images; this hash {same} the import's `{imp['sha256'][:16]}…`")
    return [*lines, *leakage_markdown(metrics.get("leakage")), ""]


def leakage_markdown(leak: dict | None) -> list[str]:
    """One line saying whether, and which, eval images were found in the training corpus."""
    if not leak or not leak["checked"]:
        return ["- leakage: not checked (set `leakage_data` to the training records)"]
    if not leak["overlaps"]:
        return [f"- leakage: no eval image found in `{leak['corpus']}` (exact pixels or pHash within "
                f"{leak['phash_bits']} bits)"]
    kinds = {k: len({o["eval_image"] for o in leak["overlaps"] if o["kind"] == k}) for k in ("exact", "near")}
    ids = ", ".join(f"`{i}`" for i in leak["questions"][:20]) + (" …" if len(leak["questions"]) > 20 else "")
    return [f"- leakage: {kinds['exact']} eval images with identical pixels and {kinds['near']} near duplicates "
            f"(pHash within {leak['phash_bits']} bits) in `{leak['corpus']}`, asked in {len(leak['questions'])} "
            f"questions ({'left out of the scores' if leak['dropped'] else 'still scored'}): {ids}",
            *[f"  - `{o['eval_image']}` ~ `{o['train_image']}` ({o['kind']}, {o['bits']} bits)"
              for o in leak["overlaps"][:20]]]


def markdown(metrics: dict, rows: list[dict]) -> str:
    head = "| group | n | " + " | ".join(METRICS) + " | closed chance |"
    lines = [f"# Evaluation: {metrics['model']}", "", f"Data: `{metrics['data']}`, {metrics['n']} questions, "
             f"{metrics['errors']} unreadable inputs (scored wrong).", ""]
    if metrics["closed_chance"] is not None:
        lines += [f"Chance accuracy on the closed questions: {metrics['closed_chance']:.3f}.", ""]
    lines += ["The table is medvl's protocol (closed: the answer named alone, yes/no folded in Chinese "
              "and English; open: character-level recall), each score with its 95% interval (Wilson for "
              "accuracies and exact match, percentile bootstrap for the others).", ""]
    if (lm := metrics.get("llava_med")) is not None:
        lines += [f"LLaVA-Med's protocol (its `run_eval.py`, comparable with published figures): closed "
                  f"accuracy {lm['closed_accuracy']:.3f} over the {lm['closed_counted']} of "
                  f"{lm['closed_total']} closed answers it counts, open recall {lm['open_recall']:.3f}.", ""]
    lines += [head, "|" + "---|" * (len(METRICS) + 3)]
    for name, s in named_groups(metrics).items():
        cells = " | ".join(_cell(s, m) for m in METRICS)
        chance = f"{s['closed_chance']:.3f}" if "closed_chance" in s else "–"
        lines.append(f"| {name} | {s['n']} | {cells} | {chance} |")
    lines += ["", *controls_markdown(metrics), *bilingual_markdown(metrics.get("bilingual")), *setup_markdown(metrics)]
    lines += ["## Worst-scored examples", "", "| id | question | expected | predicted | note |",
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
            shown.update({f"{key}: {v}": s for v, s in by.items()})
    ticks = [_tick(k.split(": ", 1)[-1], bool(cjk_fonts)) for k in shown]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shown)), 3.5))
    width = 0.8 / len(PLOTTED)
    for j, m in enumerate(PLOTTED):  # each bar with its 95% interval
        vals = [g.get(m, 0.0) for g in shown.values()]
        err = np.clip(np.array([[v - g[f"{m}_ci"][0], g[f"{m}_ci"][1] - v] if m in g else [0, 0]
                                for v, g in zip(vals, shown.values(), strict=True)]).T, 0, None)  # float noise at 1.0
        ax.bar(np.arange(len(shown)) + j * width, vals, width, yerr=err, capsize=2, label=m)
    label = "chance (closed)"
    for i, g in enumerate(shown.values()):  # closed accuracy's chance level, over its group's bars
        if "closed_chance" in g:
            ax.hlines(g["closed_chance"], i - width / 2, i + 0.8 - width / 2, colors="black",
                      linestyles="--", linewidth=1, label=label)
            label = None  # one legend entry
    for cond, marker in zip(metrics.get("controls") or {}, "xo", strict=False):  # closed accuracy without the image
        pts = [(i, g["closed_accuracy"]) for i, name in enumerate(shown)
               if "closed_accuracy" in (g := metrics["controls"][cond]["groups"].get(name, {}))]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, color="black", s=18, zorder=3,
                       label=f"closed, {cond} image")
    ax.set_xticks(np.arange(len(shown)) + 0.4 - width / 2, ticks, rotation=20)
    ax.set(ylim=(0, 1), ylabel="score", title="medvl eval")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the bars, not over them
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(rows: list[dict], output: str, meta: dict, tests: dict[str, dict] | None = None) -> dict:
    """Write the four files; return ``metrics.json``'s content. ``rows`` hold every condition
    (``condition``: image/blank/shuffled); the headline tables are the real images' answers.
    ``tests``: condition -> group -> metric -> the paired test of image against that control."""
    image = [r for r in rows if r.get("condition", "image") == "image"]
    metrics = {**meta, **aggregate(image), "controls": {}}
    for cond in CONTROLS:
        if cond_rows := [r for r in rows if r.get("condition") == cond]:
            metrics["controls"][cond] = {"groups": {k: summarize(v) for k, v in group_rows(cond_rows).items() if v},
                                         "tests": (tests or {}).get(cond, {})}
    metrics["control_notes"] = control_notes(metrics)
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, ensure_ascii=False, indent=2))
    storage.write_text(storage.join(output, "report.md"), markdown(metrics, image))
    storage.write_bytes(storage.join(output, "metrics.png"), bar_chart(metrics))
    keep = ("id", "condition", "image", "task", "modality", "answer_type", "lang", "pair", "question", "answer",
            "choices", "prediction", "error", "scores")
    storage.write_text(storage.join(output, "predictions.jsonl"), "".join(
        json.dumps({k: r.get(k, "image" if k == "condition" else None) for k in keep}, ensure_ascii=False) + "\n"
        for r in rows))
    return metrics
