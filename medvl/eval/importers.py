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
from medvl.eval.metrics import canonical, normalize
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


# SLAKE 1.0 has no id linking a question to its other-language version, and its Chinese
# questions are not translations of the English ones in order: of the English/Chinese questions
# on the same image with the same content_type, the k-th of each differ about half the time
# (measured: "Is this a coronal plane?" beside 这是横断面吗?, "small bowel" beside 气管), some
# with the polarity flipped (healthy/异常). So only these templates, which are translations of
# each other, are paired (checked by hand; ~35% of the questions), and only where an image holds
# exactly one question of the template in each language.
SLAKE_EN_ZH = (
    ("What modality is used to take this image?", "这张图片的成像方式是什么?"),
    ("Which part of the body does this image belong to?", "图像里包含的区域属于身体哪个部分?"),
    ("What diseases are included in the picture?", "图片中包含哪些疾病?"),
    ("Where is/are the abnormality located?", "异常病变在哪个位置?"),
    ("What is the scanning plane of this image?", "这个图像的扫描平面是什么?"),
    ("What is the largest organ in the picture?", "图片中最大的器官是什么?"),
    ("What is the main organ in the image?", "图片主要器官是什么?"),
    ("What is the mr weighting in this image?", "这张MRI图片用的什么加权方式?"),
    ("Does the picture contain liver?", "图片中包含肝脏吗?"),
    ("Does the picture contain kidney?", "图片中包含肾脏吗?"),
    ("Does the picture contain spleen?", "图片中包含脾脏吗?"),
    ("Does the picture contain lung?", "图片中包含肺吗?"),
    ("Does the picture contain heart?", "图片中包含心脏吗?"),
    ("Is the liver healthy?", "肝脏是健康的吗?"),
    ("Does this image look normal?", "这张图片看起来正常吗?"),
    ("Which organ is abnormal, heart or lung?", "肺或者心脏哪个是异常的?"),
    ("How many kidneys in this image?", "图中有多少个肾脏?"),
    ("How many organs are there in this image?", "图中有多少个器官?"),
    ("How many kinds of abnormalities are there in this image?", "该图像中有多少种异常?"),
    ("Where is the liver?", "肝脏在哪个位置?"),
    ("What is the organ on the top of the body in this image?", "图像中身体顶部的器官是什么?"),
    ("What is the rightmost organ in this image?", "位于图片最右侧的器官是什么?"),
    ("Is this a study of the chest?", "这张图像是关于胸腔吗?"),
    ("How much damage will be caused to the body taking such an image?", "拍这样的图像会对身体造成多大的伤害?"),
)
_TEMPLATE = {normalize(q): t for t, two in enumerate(SLAKE_EN_ZH) for q in two}


def slake_pairs(items: list[dict]) -> dict[str, str]:
    """qid -> pair key for the questions asked in both languages about one image (above)."""
    found: dict[tuple, list[dict]] = {}
    for it in items:
        if (t := _TEMPLATE.get(normalize(str(it["question"])))) is not None:
            found.setdefault((it["img_id"], t), []).append(it)
    return {str(it["qid"]): f"slake-{img}-t{t}" for (img, t), two in found.items()
            if sorted(x.get("q_lang") for x in two) == ["en", "zh"] for it in two}


def slake(src: str, split: str = "test", lang: str = "all") -> list[dict]:
    items = json.loads(storage.read_text(storage.join(src, source_file("slake", src, split))))
    pair = slake_pairs(items)
    out = []
    for it in items:
        if lang != "all" and it.get("q_lang") != lang:
            continue
        answer = str(it["answer"]).strip()
        kind, choices = _closed_or_open(answer, it.get("answer_type"))
        out.append(record("slake", str(it["qid"]), f"imgs/{it['img_name']}", it["question"],
                          answer, kind, choices, it.get("modality"))
                   | {"lang": it.get("q_lang"), "pair": pair.get(str(it["qid"]))})
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
