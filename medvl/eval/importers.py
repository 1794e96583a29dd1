"""Public medical VQA sets, from their released file layouts, into our eval records.

Nothing is downloaded: point ``medvl import-vqa`` at the unpacked release. Each record is
a LLaVA record (``image`` relative to the release directory, one human/gpt turn) plus
``answer_type`` (closed/open), ``choices`` for closed questions, ``modality`` where the
set has one, and ``source``. Layouts:

- VQA-RAD (OSF): ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``; test split =
  ``phrase_type`` ``test_freeform``/``test_para``.
- SLAKE 1.0: ``{train,validate,test}.json`` + ``imgs/xmlabN/source.jpg``; ``q_lang`` en/zh.
- PathVQA: ``qas/{split}/{split}_qa.pkl`` (a pickled list of dicts) + ``images/{split}/*.jpg``.
- PMC-VQA: ``{split}.csv`` or ``{split}_clean.csv`` (Figure_path, Question, Answer,
  Choice A-D, Answer_label) + ``figures/``.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
from collections.abc import Callable

from medvl import storage
from medvl.eval.metrics import canonical
from medvl.eval.provenance import sidecar, split_hash

YES_NO = ["yes", "no"]


def record(source: str, rid: str, image: str, question: str, answer: str, answer_type: str,
           choices: list[str] | None = None, modality: str | None = None) -> dict:
    return {"id": f"{source}-{rid}", "image": image, "source": source,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                              {"from": "gpt", "value": answer}],
            "answer_type": answer_type, "choices": choices, "modality": modality}


def _closed_or_open(answer: str, declared: str | None = None) -> tuple[str, list[str] | None]:
    """SLAKE/VQA-RAD declare the type; PathVQA's closed questions are its yes/no ones."""
    kind = (declared or ("closed" if canonical(answer) in ("yes", "no") else "open")).lower()
    if kind != "closed":
        return "open", None
    if canonical(answer) in ("yes", "no"):
        zh = re.search(r"[\u4e00-\u9fff]", answer)
        return "closed", ["是", "否"] if zh else YES_NO
    return "closed", None  # closed but not yes/no (e.g. "left" / "right"): scored by match


def source_file(fmt: str, src: str, split: str) -> str:
    """The release file (relative to ``src``) a format's questions are read from: recorded in
    the split's provenance so a reader can tell which release was imported."""
    if fmt == "vqa-rad":
        return "VQA_RAD Dataset Public.json"  # one file for every split
    if fmt == "slake":
        return f"{split}.json"
    if fmt == "pathvqa":
        return f"qas/{split}/{split}_qa.pkl"
    return next((n for n in (f"{split}_clean.csv", f"{split}.csv")  # pmc-vqa: the cleaned file first
                 if storage.exists(storage.join(src, n))), f"{split}.csv")


def vqa_rad(src: str, split: str = "test") -> list[dict]:
    items = json.loads(storage.read_text(storage.join(src, source_file("vqa-rad", src, split))))
    out = []
    for it in items:
        is_test = str(it.get("phrase_type", "")).startswith("test")
        if split != "all" and is_test != (split == "test"):
            continue
        answer = str(it["answer"]).strip()
        kind, choices = _closed_or_open(answer, it.get("answer_type"))
        out.append(record("vqa-rad", str(it["qid"]), f"VQA_RAD Image Folder/{it['image_name']}",
                          it["question"], answer, kind, choices, it.get("image_organ")))
    return out


def slake(src: str, split: str = "test", lang: str = "all") -> list[dict]:
    items = json.loads(storage.read_text(storage.join(src, source_file("slake", src, split))))
    out = []
    for it in items:
        if lang != "all" and it.get("q_lang") != lang:
            continue
        answer = str(it["answer"]).strip()
        kind, choices = _closed_or_open(answer, it.get("answer_type"))
        out.append(record("slake", str(it["qid"]), f"imgs/{it['img_name']}", it["question"],
                          answer, kind, choices, it.get("modality")))
    return out


class _PlainData(pickle.Unpickler):
    """PathVQA ships pickles of plain lists/dicts: refuse any class, so no code can run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only plain data is expected")


def pathvqa(src: str, split: str = "test") -> list[dict]:
    raw = storage.read_bytes(storage.join(src, source_file("pathvqa", src, split)))
    out = []
    for i, it in enumerate(_PlainData(io.BytesIO(raw)).load()):
        answer = str(it["answer"]).strip()
        kind, choices = _closed_or_open(answer)
        out.append(record("pathvqa", f"{split}-{i}", f"images/{split}/{it['image']}.jpg",
                          it["question"], answer, kind, choices, "pathology"))
    return out


def pmc_vqa(src: str, split: str = "test") -> list[dict]:
    rows = csv.DictReader(io.StringIO(storage.read_text(storage.join(src, source_file("pmc-vqa", src, split)))))
    out = []
    for i, row in enumerate(rows):
        choices = [re.sub(r"^\s*[A-D]\s*[:：.]\s*", "", row[f"Choice {k}"]).strip() for k in "ABCD"]
        label = row.get("Answer_label", "").strip()
        answer = choices["ABCD".index(label)] if label in tuple("ABCD") else row["Answer"].strip()
        options = "\n".join(f"{k}: {c}" for k, c in zip("ABCD", choices, strict=True))
        out.append(record("pmc-vqa", f"{split}-{i}", f"figures/{row['Figure_path']}",
                          f"{row['Question'].strip()}\nOptions:\n{options}", answer, "closed", choices))
    return out


IMPORTERS: dict[str, Callable[..., list[dict]]] = {
    "vqa-rad": vqa_rad, "slake": slake, "pathvqa": pathvqa, "pmc-vqa": pmc_vqa}


def import_vqa(fmt: str, src: str, output: str, split: str = "test", lang: str = "all") -> int:
    """Write ``output`` (.jsonl) and its provenance (``x.provenance.json``: the split's content
    hash, counts and release file); return the record count. Images stay where they are."""
    from medvl.eval.evaluate import load_eval_records  # the eval's own reading of the records

    if fmt not in IMPORTERS:
        raise ValueError(f"unknown format {fmt!r}; one of {sorted(IMPORTERS)}")
    recs = IMPORTERS[fmt](src, split, lang) if fmt == "slake" else IMPORTERS[fmt](src, split)
    storage.write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    prov = {"format": fmt, "split": split, "lang": lang, "source": src, "sources": [source_file(fmt, src, split)],
            **split_hash(load_eval_records(output), src)}
    storage.write_text(sidecar(output), json.dumps(prov, ensure_ascii=False, indent=2))
    return len(recs)
