"""Each importer on a small fixture in the dataset's released layout (file names, fields)."""

import csv
import json
import pickle

import pytest
from PIL import Image

from medvl.eval.evaluate import load_eval_records
from medvl.eval.importers import import_vqa, pathvqa
from medvl.eval.provenance import split_hash


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (90, 90, 90)).save(path)


def vqa_rad(root):
    items = [  # fields as in "VQA_RAD Dataset Public.json" (OSF release)
        {"qid": 1, "image_name": "synpic54610.jpg", "image_organ": "HEAD", "answer": "Yes",
         "answer_type": "CLOSED", "question_type": "PRES", "question": "Are regions of the brain infarcted?",
         "phrase_type": "freeform", "qid_linked_id": "03f451ca-de62-4617-9679-e836026a7642"},
        {"qid": 2, "image_name": "synpic29265.jpg", "image_organ": "CHEST", "answer": "right lung",
         "answer_type": "OPEN", "question_type": "POS", "question": "Where is the lesion?",
         "phrase_type": "test_freeform", "qid_linked_id": "0b1c4b6d"},
        {"qid": 3, "image_name": "synpic29265.jpg", "image_organ": "CHEST", "answer": 2,
         "answer_type": "OPEN", "question_type": "COUNT", "question": "How many lesions?",
         "phrase_type": "test_para", "qid_linked_id": "0b1c4b6e"},
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(items))
    for it in items:
        _img(root / "VQA_RAD Image Folder" / it["image_name"])
    return {"test": 2, "train": 1, "all": 3}


def slake(root):
    items = [  # fields as in Slake1.0/test.json
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Which organ is abnormal?",
         "answer": "Lung", "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN",
         "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 11934},
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "这张图片中是否有肝脏？",
         "answer": "否", "q_lang": "zh", "location": "Abdomen", "modality": "CT", "answer_type": "CLOSED",
         "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 11935},
    ]
    (root / "test.json").write_text(json.dumps(items, ensure_ascii=False))
    _img(root / "imgs" / "xmlab102" / "source.jpg")
    return {"test": 2}


def path_vqa(root):
    items = [{"image": "test_0000", "question": "Is this a lymphoma?", "answer": "yes"},
             {"image": "test_0001", "question": "What does this image show?", "answer": "necrosis"}]
    (root / "qas" / "test").mkdir(parents=True)
    (root / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(items))
    for it in items:
        _img(root / "images" / "test" / f"{it['image']}.jpg")
    return {"test": 2}


def pmc_vqa(root):
    fields = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer_label", "split"]
    with open(root / "test_clean.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow({"Figure_path": "PMC8253867_Fig2_41.jpg", "Question": "What imaging modality was used?",
                    "Answer": "CT", "Choice A": "A:MRI ", "Choice B": "B:CT ", "Choice C": "C:PET ",
                    "Choice D": "D:Ultrasound ", "Answer_label": "B", "split": "test"})
    _img(root / "figures" / "PMC8253867_Fig2_41.jpg")
    return {"test": 1}


@pytest.mark.parametrize(("fmt", "make"), [("vqa-rad", vqa_rad), ("slake", slake),
                                            ("pathvqa", path_vqa), ("pmc-vqa", pmc_vqa)])
def test_importer_fixture(fmt, make, tmp_path):
    src = tmp_path / "release"
    src.mkdir()
    counts = make(src)
    for split, n in counts.items():
        out = tmp_path / f"{split}.jsonl"
        assert import_vqa(fmt, str(src), str(out), split) == n
        examples = load_eval_records(str(out))  # what `medvl eval` reads
        assert len(examples) == n
        for ex in examples:
            assert (src / ex["image"]).is_file(), ex["image"]
            assert ex["answer_type"] in ("closed", "open") and ex["question"] and ex["answer"]
        prov = json.loads((tmp_path / f"{split}.provenance.json").read_text())
        assert prov == {**prov, "format": fmt, "split": split, "questions": n, "missing_images": 0,
                        "sha256": split_hash(examples, str(src))["sha256"]}
        assert prov["images"] == len({ex["image"] for ex in examples}) and (src / prov["sources"][0]).is_file()


def test_importer_reads_a_release_on_s3_and_writes_there(tmp_path, s3_endpoint):
    from medvl import storage

    src = tmp_path / "release"
    src.mkdir()
    slake(src)
    storage.copy_dir(str(src), f"{s3_endpoint}/slake-release")
    local, remote = tmp_path / "local.jsonl", f"{s3_endpoint}/slake-test.jsonl"
    n = import_vqa("slake", str(src), str(local), "test")
    assert import_vqa("slake", f"{s3_endpoint}/slake-release", remote, "test") == n > 0
    assert storage.read_text(remote) == local.read_text()
    assert json.loads(storage.read_text(f"{s3_endpoint}/slake-test.provenance.json"))["sha256"] == json.loads(
        (tmp_path / "local.provenance.json").read_text())["sha256"]  # same release, same hash, wherever it lives


def test_importer_fields(tmp_path):
    vqa_rad(tmp_path)
    import_vqa("vqa-rad", str(tmp_path), str(tmp_path / "r.jsonl"), "all")
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert recs["vqa-rad-1"]["answer_type"] == "closed" and recs["vqa-rad-1"]["choices"] == ["yes", "no"]
    assert recs["vqa-rad-3"]["conversations"][1]["value"] == "2"  # numeric answers become text
    (tmp_path / "s").mkdir()
    slake(tmp_path / "s")
    import_vqa("slake", str(tmp_path / "s"), str(tmp_path / "zh.jsonl"), "test", lang="zh")
    (zh,) = map(json.loads, (tmp_path / "zh.jsonl").read_text().splitlines())
    assert zh["choices"] == ["是", "否"] and zh["modality"] == "CT"
    (tmp_path / "p").mkdir()
    pmc_vqa(tmp_path / "p")
    import_vqa("pmc-vqa", str(tmp_path / "p"), str(tmp_path / "p.jsonl"))
    (p,) = map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())
    assert p["choices"] == ["MRI", "CT", "PET", "Ultrasound"] and p["conversations"][1]["value"] == "CT"
    assert "B: CT" in p["conversations"][0]["value"]


def test_pathvqa_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "qas" / "test").mkdir(parents=True)
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        pathvqa(str(tmp_path))
