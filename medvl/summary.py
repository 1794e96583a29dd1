"""A run's summary: ``RUN/summary.json`` (each step's status and duration, data counts,
losses, eval metrics, the endpoint and its check request), ``RUN/summary.md`` (the same for
people, with the plots) and ``RUN/plots/*.png``, built from the steps' markers."""

from __future__ import annotations

import json

from medvl import storage


def write_summary(run: str, outputs: dict[str, str], recipe_path: str, markers: dict[str, dict],
                  status: dict[str, dict]) -> dict:
    """``RUN/summary.json``, ``RUN/summary.md`` and ``RUN/plots/*.png`` from the step markers.
    ``outputs`` names the ``stage1``/``stage2``/``eval`` output directories whose plots are
    copied: plain strings, not the recipe, so this module needs nothing from pipeline.py."""
    res = {name: m["result"] for name, m in markers.items()}
    summary = {
        "run": run, "recipe": recipe_path,
        "steps": {name: {**st, "hash": markers.get(name, {}).get("hash")} for name, st in status.items()},
        "data": {k: res.get(f"preprocess-{k}") for k in ("alignment", "instruction")},
        "stages": {k: {f: res[k].get(f) for f in ("steps", "first_loss", "last_loss", "last_val_loss",
                                                  "best_val_loss", "best_val_step")}
                   for k in ("stage1", "stage2") if k in res},
        "eval": res.get("evaluate"), "endpoint": res.get("deploy", {}).get("endpoint"),
        "page": res.get("deploy", {}).get("page"), "serving": res.get("deploy", {}).get("serving"),
        "sample": res.get("deploy", {}).get("sample"),
    }
    plots = {"stage1_loss.png": storage.join(outputs["stage1"], "loss.png"),
             "stage2_loss.png": storage.join(outputs["stage2"], "loss.png"),
             "eval_metrics.png": storage.join(outputs["eval"], "metrics.png")}
    summary["plots"] = []
    for name, src in plots.items():
        if storage.exists(src):
            storage.write_bytes(storage.join(run, "plots", name), storage.read_bytes(src))
            summary["plots"].append(f"plots/{name}")
    storage.write_text(storage.join(run, "summary.json"), json.dumps(summary, ensure_ascii=False, indent=2))
    storage.write_text(storage.join(run, "summary.md"), summary_markdown(summary))
    print(summary_markdown(summary), flush=True)
    return summary


def _val(stage: dict) -> str:
    """The stage's two validation cells ("-" where it did not validate)."""
    if stage.get("last_val_loss") is None:
        return "- | -"
    return f"{stage['last_val_loss']:.3f} | {stage['best_val_loss']:.3f} ({stage['best_val_step']})"


def summary_markdown(s: dict) -> str:
    lines = [f"# medvl run `{s['run']}`", "", f"Recipe: `{s['recipe']}`", "", "| step | status | seconds |",
             "|---|---|---|"]
    lines += [f"| {n} | {st['status']} | {st.get('seconds', '')} |" for n, st in s["steps"].items()]
    lines += ["", "| data | records in | kept | rejected |", "|---|---|---|---|"]
    lines += [f"| {k} | {d['records_in']} | {d['records_kept']} | {d['records_rejected']} |"
              for k, d in s["data"].items() if d]
    lines += ["", "| stage | steps | first loss | last loss | last val loss | best val loss (step) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['steps']} | {v['first_loss']:.3f} | {v['last_loss']:.3f} | {_val(v)} |"
              for k, v in s["stages"].items()]
    if s["eval"]:
        e, o = s["eval"], s["eval"]["overall"]
        lines += ["", f"Evaluation ({e['n']} held-out questions, report: `eval/report.md`):", ""]
        for kind, g in e["by_answer_type"].items():
            shown = ", ".join(f"{m} {g[m]:.3f}" for m in ("closed_accuracy", "open_recall", "token_f1") if m in g)
            lines.append(f"- {kind} ({g['n']}): {shown}")
        if e["closed_chance"] is not None and "closed_accuracy" in o:
            lines.append(f"- closed accuracy {o['closed_accuracy']:.3f} vs chance {e['closed_chance']:.3f}")
        for task, g in e.get("by_task", {}).items():
            if "closed_chance" in g and len(e["by_task"]) > 1:
                lines.append(f"- {task} questions ({g['n']}): closed accuracy {g['closed_accuracy']:.3f} "
                             f"vs chance {g['closed_chance']:.3f}")
        if e.get("controls"):  # did the scores depend on the image? (report.md has the table)
            lines += [f"- {n}" for n in e["control_notes"]] or [
                "- every group's closed accuracy is above chance with its images and falls to chance "
                "with blank or shuffled ones"]
        if (bi := e.get("bilingual") or {}).get("pairs"):
            g = bi["groups"]["overall"]
            lines.append(f"- the same question in Chinese and English ({g['n']} pairs): same answer "
                         f"{g['agreement']:.3f} [{g['agreement_ci'][0]:.3f}, {g['agreement_ci'][1]:.3f}]")
        if "finding" in e.get("by_task", {}):
            lines.append("- the findings are synthetic: round \"nodules\" painted into the demo images "
                         "(`medvl/data/demo.py`), asked about to show the model looks at the image")
    if s["sample"]:
        q = s["sample"]
        lines += ["", f"Endpoint: {s['endpoint']}", "", f"- image: `{q['image']}`", f"- question: {q['question']}",
                  f"- answer: {q['answer']}", f"- expected: {q['expected']}"]
    lines += ["", *[f"![{p}]({p})" for p in s["plots"]]]
    if s.get("page"):  # last: the chat page the same front serves (docs/guide.md, "Web page")
        lines += ["", f"Web page: {s['page']}" + ("" if s["serving"] else
                  " (stopped with this run: `medvl serve --model <run>/model` or `--keep-serving` serves it)")]
    return "\n".join(lines) + "\n"
