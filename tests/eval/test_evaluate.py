"""``medvl eval`` end to end on the demo's held-out split, with Ray Data batch inference."""

import json

import pytest

from medvl.eval.compare import compare_runs
from medvl.eval.evaluate import EvalConfig, evaluate
from medvl.model.build import build_tiny
from medvl.serving.engine import write_meta
from medvl.tokenizer import load as load_tokenizer
from medvl.train.export import save_hf

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


@pytest.fixture(scope="module")
def untrained(demo_dir, tmp_path_factory):
    """The same tiny model and tokenizer as the trained one, before any training."""
    uri = str(tmp_path_factory.mktemp("untrained"))
    tok = load_tokenizer(str(demo_dir / "tokenizer"))
    save_hf(build_tiny(tok, seed=0), tok, uri)
    write_meta(uri, template="v1", aspect="pad", image_size=32)
    return uri


def run_eval(model: str, data: str, demo_dir, out, **kw) -> dict:
    return evaluate(EvalConfig(model=model, data=data, image_root=str(demo_dir / "images"), output=str(out),
                               batch_size=8, max_tokens=16, replicas=2, cpus_per_replica=0.5, **kw))


def test_eval_is_deterministic_and_reports(stage2, demo_dir, tmp_path, s3_endpoint):
    """Two runs give the same answers, the second with model, records, images and report on S3."""
    from medvl import storage

    heldout = str(demo_dir / "instruction_heldout.jsonl")
    a = run_eval(stage2["hf"], heldout, demo_dir, tmp_path / "a", controls=False)  # controls: the next test
    s3 = f"{s3_endpoint}/eval-{tmp_path.name}"
    storage.copy_dir(stage2["hf"], f"{s3}/model")
    storage.copy_dir(str(demo_dir / "images"), f"{s3}/images")
    storage.write_text(f"{s3}/heldout.jsonl", (demo_dir / "instruction_heldout.jsonl").read_text())
    b = evaluate(EvalConfig(model=f"{s3}/model", data=f"{s3}/heldout.jsonl", image_root=f"{s3}/images",
                            output=f"{s3}/report", batch_size=8, max_tokens=16, replicas=2,
                            cpus_per_replica=0.5, protocol="llava-med", controls=False))
    assert a["n"] == len((demo_dir / "instruction_heldout.jsonl").read_text().splitlines()) and a["errors"] == 0
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == storage.read_text(f"{s3}/report/predictions.jsonl")
    assert storage.exists(f"{s3}/report/report.md") and storage.exists(f"{s3}/report/metrics.png")
    assert set(b["llava_med"]) == {"closed_accuracy", "closed_counted", "closed_total", "open_recall"}
    assert b["llava_med"]["closed_total"] == sum(r["answer_type"] == "closed" for r in map(
        json.loads, storage.read_text(f"{s3}/report/predictions.jsonl").splitlines()))
    assert "LLaVA-Med's protocol" in storage.read_text(f"{s3}/report/report.md") and "llava_med" not in a
    assert a["overall"] == b["overall"] and a["by_modality"] == b["by_modality"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| overall |" in report and "Worst-scored examples" in report
    assert (tmp_path / "a" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert set(a["by_answer_type"]) == {"closed", "open"}


def test_controls_ask_every_question_three_ways(stage2, demo_dir, tmp_path):
    """The synthetic findings can only be answered from the picture: with a blank image or
    another record's, finding accuracy must not stay above chance, and the report must show
    every condition, the intervals, the set-up, the split's hash and the leakage line."""
    train = tmp_path / "train.jsonl"  # a slice of the training records: decoding its images is the cost
    train.write_text("".join((demo_dir / "instruction_train.jsonl").read_text().splitlines(keepends=True)[:20]))
    out = tmp_path / "out"
    m = run_eval(stage2["hf"], str(demo_dir / "instruction_heldout.jsonl"), demo_dir, out,
                 regime="fine-tuned", leakage_data=str(train))
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [sum(p["condition"] == c for p in preds) for c in ("image", "blank", "shuffled")] == [m["n"]] * 3
    finding = {"image": m["by_task"]["finding"], **{c: m["controls"][c]["groups"]["task: finding"] for c in m["controls"]}}
    print("finding:", {c: (g["closed_accuracy"], g["closed_accuracy_ci"]) for c, g in finding.items()},
          "notes:", m["control_notes"], "leakage:", len(m["leakage"]["overlaps"]))
    for cond in ("blank", "shuffled"):
        assert finding[cond]["closed_accuracy_ci"][0] <= finding[cond]["closed_chance"], (cond, finding)
        assert m["controls"][cond]["tests"]["task: finding"]["closed_accuracy"]["n"] == finding["image"]["n"]
    flagged = finding["image"]["closed_accuracy_ci"][0] <= finding["image"]["closed_chance"]
    assert flagged == any(n.startswith("task: finding: closed accuracy with the real images") for n in m["control_notes"])
    report = (out / "report.md").read_text()
    assert "## Image-dependence controls" in report and "regime: fine-tuned" in report
    assert m["provenance"]["sha256"] in report and m["provenance"]["questions"] == m["n"]
    assert m["leakage"]["checked"] and "- leakage: " in report


def test_trained_model_beats_untrained_and_bad_inputs_are_counted(stage2, untrained, demo_dir, tmp_path):
    lines = (demo_dir / "instruction_heldout.jsonl").read_text().splitlines()
    broken = json.loads(lines[0]) | {"id": "broken", "image": "no-such-image.png"}
    data = tmp_path / "heldout+broken.jsonl"
    data.write_text("\n".join([*lines, json.dumps(broken, ensure_ascii=False)]) + "\n")
    trained = run_eval(stage2["hf"], str(data), demo_dir, tmp_path / "trained", controls=False)
    base = run_eval(untrained, str(data), demo_dir, tmp_path / "untrained", controls=False)
    assert trained["errors"] == base["errors"] == 1  # the missing image: scored wrong, listed, no crash
    preds = [json.loads(x) for x in (tmp_path / "trained" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds if p["error"]] == ["broken"]
    t, u = trained["overall"], base["overall"]
    assert t["closed_accuracy"] >= u["closed_accuracy"] + 0.2, (t, u)
    assert t["exact_match"] >= u["exact_match"] + 0.15, (t, u)  # untrained output is noise
    paired = compare_runs(str(tmp_path / "untrained"), str(tmp_path / "trained"))["overall"]
    assert paired["closed_accuracy"]["diff"] == pytest.approx(t["closed_accuracy"] - u["closed_accuracy"])
    assert paired["closed_accuracy"]["p"] < 0.001 and paired["closed_accuracy"]["ci"][0] > 0


def test_bilingual_agreement_from_a_slake_eval(untrained, tmp_path, capsys):
    """A SLAKE-format split (both languages) through import-vqa and the real eval: the four
    translated pairs are found, and the agreement in metrics.json, report.md and the CLI's
    summary is what the written answers give (hand-set answers: tests/eval/test_bilingual.py)."""
    from medvl.cli import main
    from medvl.eval.bilingual import agreement
    from medvl.eval.importers import import_vqa
    from tests.eval.test_bilingual import write_slake

    src = tmp_path / "slake"
    src.mkdir()
    write_slake(src)
    import_vqa("slake", str(src), str(tmp_path / "slake.jsonl"), "test")
    main(["eval", "--model", untrained, "--data", str(tmp_path / "slake.jsonl"), "--image-root", str(src),
          "--output", str(tmp_path / "out"), "--max-tokens", "8", "--cpus-per-replica", "0.5", "--no-controls"])
    printed = json.loads(capsys.readouterr().out)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert m["bilingual"]["pairs"] == 4 and m["bilingual"] == agreement(preds) == printed["bilingual"]
    g = m["bilingual"]["groups"]["overall"]
    assert f"| overall | 4 | {g['agreement']:.3f}" in (tmp_path / "out" / "report.md").read_text()
