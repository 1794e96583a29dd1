"""Cross-language agreement on a SLAKE-format fixture: which questions pair, and the agreement
of hand-set answers against values counted by hand."""

import json

import pytest
from PIL import Image

from medvl.eval.bilingual import agreement
from medvl.eval.evaluate import load_eval_records
from medvl.eval.importers import import_vqa
from medvl.eval.metrics import score
from medvl.eval.report import write_report
from medvl.eval.stats import wilson


def q(qid: int, img: int, lang: str, question: str, answer: str, kind: str, modality: str) -> dict:
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Abdomen", "modality": modality, "answer_type": kind, "base_type": "vqa",
            "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


def write_slake(root) -> None:
    """Slake1.0/test.json's layout: image 1 has three translated questions in both languages and
    one plane question in each that is not a translation (SLAKE has such neighbours); image 2
    has one translated pair and an English-only question."""
    items = [
        q(1, 1, "en", "What modality is used to take this image?", "CT", "OPEN", "CT"),
        q(2, 1, "en", "Does the picture contain liver?", "Yes", "CLOSED", "CT"),
        q(3, 1, "en", "Does the picture contain heart?", "No", "CLOSED", "CT"),
        q(4, 1, "en", "Is this a coronal plane?", "Yes", "CLOSED", "CT"),
        q(5, 2, "en", "Does the picture contain liver?", "Yes", "CLOSED", "MRI"),
        q(6, 2, "en", "What modality is used to take this image?", "MRI", "OPEN", "MRI"),
        q(11, 1, "zh", "这张图片的成像方式是什么?", "CT", "OPEN", "CT"),
        q(12, 1, "zh", "图片中包含肝脏吗?", "包含", "CLOSED", "CT"),
        q(13, 1, "zh", "图片中包含心脏吗？", "不包含", "CLOSED", "CT"),  # full-width ？: still the template
        q(14, 1, "zh", "这是横断面吗?", "不是", "CLOSED", "CT"),
        q(15, 2, "zh", "图片中包含肝脏吗?", "包含", "CLOSED", "MRI"),
    ]
    (root / "test.json").write_text(json.dumps(items, ensure_ascii=False))
    for img, shade in ((1, 60), (2, 200)):
        (root / "imgs" / f"xmlab{img}").mkdir(parents=True)
        Image.new("RGB", (40, 40), (shade, shade, shade)).save(root / "imgs" / f"xmlab{img}" / "source.jpg")


# qid -> a hand-set answer: modality en wrong / zh right (disagree); liver on image 1 both right
# (agree); heart both wrong with the same answer, yes = 有 (agree); liver on image 2 en "no",
# zh unreadable (disagree). 2 of 4 agree; closed 2 of 3, open 0 of 1; one pair both right.
ANSWERS = {"1": "MRI", "11": "这是CT图像", "2": "Yes", "12": "是的", "3": "yes", "13": "有",
           "5": "no", "15": "看不清", "4": "yes", "14": "否", "6": "MRI"}


def test_slake_import_pairs_only_translated_questions(tmp_path):
    write_slake(tmp_path)
    import_vqa("slake", str(tmp_path), str(tmp_path / "all.jsonl"), "test")
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "all.jsonl").read_text().splitlines())}
    pairs = {r["pair"] for r in recs.values() if r["pair"]}
    assert len(pairs) == 4 and all(sum(r["pair"] == p for r in recs.values()) == 2 for p in pairs)
    assert recs["slake-1"]["pair"] == recs["slake-11"]["pair"] and recs["slake-13"]["pair"] == recs["slake-3"]["pair"]
    assert recs["slake-5"]["pair"] == recs["slake-15"]["pair"] != recs["slake-2"]["pair"]  # per image
    assert recs["slake-4"]["pair"] is recs["slake-14"]["pair"] is recs["slake-6"]["pair"] is None
    assert (recs["slake-12"]["lang"], recs["slake-12"]["choices"]) == ("zh", ["是", "否"])  # 包含 is its yes


def scored(tmp_path, lang: str = "all") -> list[dict]:
    write_slake(tmp_path)
    import_vqa("slake", str(tmp_path), str(tmp_path / "recs.jsonl"), "test", lang=lang)
    rows = load_eval_records(str(tmp_path / "recs.jsonl"))
    for r in rows:
        r |= {"prediction": ANSWERS[r["id"].removeprefix("slake-")], "error": "", "condition": "image"}
        r["scores"] = score(r["prediction"], r)
    return rows


def test_agreement_against_hand_counted_pairs(tmp_path):
    rows = scored(tmp_path)
    bi = agreement(rows)
    assert bi["pairs"] == 4
    overall = bi["groups"]["overall"]
    assert (overall["n"], overall["agree"], overall["both_right"]) == (4, 2, 1)
    assert overall["agreement_ci"] == pytest.approx([0.150, 0.850], abs=1e-3)  # Wilson 2/4 by hand
    assert overall["agreement_ci"] == pytest.approx(list(wilson(2, 4)))
    assert (bi["groups"]["answer_type: closed"]["agree"], bi["groups"]["answer_type: closed"]["n"]) == (2, 3)
    assert (bi["groups"]["answer_type: open"]["agree"], bi["groups"]["modality: MRI"]["agree"]) == (0, 0)
    m = write_report(rows, str(tmp_path / "out"), {"model": "m", "data": "d", "bilingual": bi})
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Cross-language agreement" in report and "| overall | 4 | 0.500 [0.15, 0.85] | 1 |" in report
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bilingual"] == m["bilingual"] == bi


def test_no_pairs_is_one_line(tmp_path):
    rows = scored(tmp_path, lang="en")
    assert agreement(rows) == {"pairs": 0}
    write_report(rows, str(tmp_path / "out"), {"model": "m", "data": "d", "bilingual": agreement(rows)})
    lines = [x for x in (tmp_path / "out" / "report.md").read_text().splitlines() if "Cross-language" in x]
    assert len(lines) == 1 and "no question here is asked in both Chinese and English" in lines[0]


def test_run_summary_states_the_agreement(tmp_path):
    from medvl.summary import write_summary

    rows = scored(tmp_path)
    metrics = write_report(rows, str(tmp_path / "eval"), {"model": "m", "data": "d", "bilingual": agreement(rows)})
    outputs = {"stage1": str(tmp_path / "s1"), "stage2": str(tmp_path / "s2"), "eval": str(tmp_path / "eval")}
    write_summary(str(tmp_path / "run"), outputs, "recipe.yaml", {"evaluate": {"result": metrics}},
                  {"evaluate": {"status": "done"}})
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "- the same question in Chinese and English (4 pairs): same answer 0.500 [0.150, 0.850]" in md
