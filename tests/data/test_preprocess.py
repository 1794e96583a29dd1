"""The Ray Data pipeline on a real local Ray: ingest, accounting, S3, determinism."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from medvl import storage
from medvl.data.preprocess import PreprocessConfig, preprocess, process_one
from medvl.data.records import REASONS
from medvl.data.tokenize import IGNORE
from tests.data.test_hostile import deflated_dicom

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _cfg(demo_dir, data, output, **kw) -> PreprocessConfig:
    base = dict(data=str(data), image_root=str(demo_dir / "images"), output=str(output),
                tokenizer=str(demo_dir / "tokenizer"), image_size=32, num_image_tokens=16,
                max_length=128, template="v1")
    return PreprocessConfig(**{**base, **kw})


def _read_shards(output) -> list[dict]:
    files = storage.list_files(storage.join(str(output), "shards"), suffix=".parquet")
    rows = []
    for f in files:
        fs, path = storage.resolve(f)
        rows += pq.read_table(path, filesystem=fs).to_pylist()
    return rows


def _good(i, image="ct_small_00.png", q="这是什么检查？", a="这是一张CT图像。"):
    return {"id": f"good-{i}", "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}


def _bad_corpus(tmp_path) -> tuple[list[str], dict[str, str]]:
    """JSONL lines with one record per reject reason, plus good records; id -> expected reason."""
    (tmp_path / "imgroot").mkdir(exist_ok=True)
    (tmp_path / "imgroot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lines = [json.dumps(_good(i), ensure_ascii=False) for i in range(5)]
    cases = {
        "missing": (_good(0, image="does_not_exist.png"), "missing_image"),
        "corrupt": (_good(0, image="../imgroot/broken.png"), "path_outside_root"),
        "escape": (_good(0, image="../../etc/passwd"), "path_outside_root"),
        "noimgtok": ({**_good(0), "conversations": [{"from": "human", "value": "无图"},
                                                    {"from": "gpt", "value": "答"}]}, "no_image_token"),
        "noanswer": ({**_good(0), "conversations": [{"from": "human", "value": "<image>\n问"},
                                                    {"from": "gpt", "value": "  "}]}, "no_answer"),
        "toolong": (_good(0, a="很长的回答。" * 200), "too_long"),
    }
    expected = {}
    for rid, (rec, reason) in cases.items():
        rec = {**rec, "id": rid}
        lines.append(json.dumps(rec, ensure_ascii=False))
        expected[rid] = reason
    lines.append('{"id": "broken-json", "image": ')
    expected["line-12"] = "bad_json"
    return lines, expected


def test_every_reject_reason_is_accounted(demo_dir, tmp_path):
    lines, expected = _bad_corpus(tmp_path)
    images = tmp_path / "images"
    shutil.copytree(demo_dir / "images", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (images / "huge.png").write_bytes((demo_dir / "images" / "RG1_UNCR.dcm").read_bytes())
    (images / "burned.dcm").write_bytes(deflated_dicom(512, BurnedInAnnotation="YES"))
    extra = {"corrupt2": (_good(0, image="broken.png"), "corrupt_image"),
             "huge": (_good(0, image="huge.png"), "image_too_large"),
             "burned": (_good(0, image="burned.dcm"), "burned_in_annotation")}
    for rid, (rec, reason) in extra.items():
        lines.insert(-1, json.dumps({**rec, "id": rid}, ensure_ascii=False))
        expected[rid] = reason
    expected["line-15"] = expected.pop("line-12")
    no_id = _good(0)
    del no_id["id"]
    lines.append(json.dumps(no_id, ensure_ascii=False))  # crashed the whole run before
    expected[f"line-{len(lines)}"] = "bad_record"
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = _cfg(demo_dir, data, tmp_path / "out", image_root=str(images), max_pixels=1_000_000)
    m = preprocess(cfg)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rejects} == expected
    assert all(lines[r["line"] - 1].startswith(f'{{"id": "{r["id"]}"') for r in rejects if "line-" not in r["id"])
    assert set(expected.values()) == set(REASONS)
    assert all(r["detail"] for r in rejects)
    assert m["records_in"] == len(lines) == m["records_kept"] + m["records_rejected"]
    assert m["records_kept"] == 5 and m["rejects_by_reason"]["path_outside_root"] == 2
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["records_in"] == m["records_in"] and on_disk["config"]["max_pixels"] == 1_000_000


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


MALFORMED = {
    "no id": ({"image": "ct_small_00.png", "conversations": _turns("<image>\n问", "答")}, "bad_record"),
    "id is a dict": ({"id": {"a": 1}, "image": "ct_small_00.png",
                      "conversations": _turns("<image>\n问", "答")}, "bad_record"),
    "id is empty": ({"id": "", "image": "ct_small_00.png",
                     "conversations": _turns("<image>\n问", "答")}, "bad_record"),
    "odd turns": ({"id": "x", "image": "ct_small_00.png",
                   "conversations": _turns("<image>\n问", "答", "还有呢？")}, "bad_record"),
    "conversations a dict": ({"id": "x", "image": "ct_small_00.png",
                              "conversations": {"from": "human", "value": "<image>"}}, "bad_record"),
    "gpt first": ({"id": "x", "image": "ct_small_00.png",
                   "conversations": [{"from": "gpt", "value": "答"}, {"from": "human", "value": "<image>"}]},
                  "bad_record"),
    "image a list": ({"id": "x", "image": ["a.png"], "conversations": _turns("<image>\n问", "答")},
                     "bad_record"),
    "no image field": ({"id": "x", "conversations": _turns("<image>\n问", "答")}, "missing_image"),
    "two image tags": ({"id": "x", "image": "ct_small_00.png",
                        "conversations": _turns("<image><image>\n问", "答")}, "no_image_token"),
    "image tag in a later turn": ({"id": "x", "image": "ct_small_00.png",
                                   "conversations": _turns("<image>\n问", "答", "<image>再看", "好")},
                                  "no_image_token"),
    "an array": ([1, 2], "bad_json"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_each_malformed_record_is_a_reject_never_an_exception(demo_dir, tmp_path, case):

    rec, reason = MALFORMED[case]
    row = process_one(7, json.dumps(rec, ensure_ascii=False), _cfg(demo_dir, "-", tmp_path))
    assert row["reason"] == reason and row["detail"]
    assert row["id"] == (rec["id"] if isinstance(rec, dict) and rec.get("id") and isinstance(rec["id"], str)
                         else "line-7")


def test_truncate_keeps_answer_tokens(demo_dir, tmp_path):
    long_q = "请详细描述。" * 40
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(_good(i, q=q), ensure_ascii=False)
                              for i, q in enumerate(["短问题", long_q])) + "\n")
    m = preprocess(_cfg(demo_dir, data, tmp_path / "o", overflow="truncate", max_length=100))
    # The long question pushes every answer token past max_length: still rejected, not emptied.
    assert m["records_kept"] == 1 and m["rejects_by_reason"] == {"too_long": 1}
    (row,) = _read_shards(tmp_path / "o")
    assert row["length"] <= 100 + 15 and any(t != IGNORE for t in row["labels"])  # the image counts 1


def test_length_limit_counts_the_image_as_one_token_as_llava(demo_dir, tmp_path):
    """LLaVA's model_max_length counts the <image> placeholder, not its features: a sample of
    exactly max_length by that count is kept whole; one token more is truncated (and said so)
    or rejected."""
    line = json.dumps(_good(0), ensure_ascii=False)
    full = process_one(1, line, _cfg(demo_dir, "-", tmp_path, max_length=4096))
    text_plus_image = full["length"] - 15  # 16 image positions count as 1
    kept = process_one(1, line, _cfg(demo_dir, "-", tmp_path, max_length=text_plus_image))
    assert (kept["reason"], kept["detail"], kept["length"]) == ("", "", full["length"])
    cut = process_one(1, line, _cfg(demo_dir, "-", tmp_path, max_length=text_plus_image - 1, overflow="truncate"))
    assert cut["reason"] == "" and cut["detail"].startswith("truncated") and cut["length"] == full["length"] - 1
    assert cut["input_ids"] == full["input_ids"][:-1]
    over = process_one(1, line, _cfg(demo_dir, "-", tmp_path, max_length=text_plus_image - 1))
    assert over["reason"] == "too_long" and f"{text_plus_image} tokens" in over["detail"]


def test_json_array_and_jsonl_give_the_same_shards(demo_dir, tmp_path):
    recs = [json.loads(x) for x in (demo_dir / "instruction_train.jsonl").read_text().splitlines()][:40]
    (tmp_path / "a.json").write_text(json.dumps(recs, ensure_ascii=False))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    m1 = preprocess(_cfg(demo_dir, tmp_path / "a.json", tmp_path / "o1"))
    m2 = preprocess(_cfg(demo_dir, tmp_path / "a.jsonl", tmp_path / "o2"))
    assert m1["records_kept"] == m2["records_kept"] == 40
    rows1, rows2 = _read_shards(tmp_path / "o1"), _read_shards(tmp_path / "o2")
    assert rows1 == rows2 and [r["id"] for r in rows1] == [r["id"] for r in recs]
    assert all(len(r["pixels"]) == 32 * 32 * 3 for r in rows1)


def test_s3_in_and_out_and_determinism(demo_dir, tmp_path, s3_endpoint):
    """Records, images and tokenizer read from S3; shards written to S3; re-run is identical."""
    src = f"{s3_endpoint}/corpus"
    for f in (demo_dir / "tokenizer").iterdir():
        storage.write_bytes(f"{src}/tokenizer/{f.name}", f.read_bytes())
    recs = (demo_dir / "instruction_train.jsonl").read_text().splitlines()[:60]
    for name in {json.loads(r)["image"] for r in recs}:
        storage.write_bytes(f"{src}/images/{name}", (demo_dir / "images" / name).read_bytes())
    storage.write_text(f"{src}/train.jsonl", "\n".join(recs) + "\n")
    cfg = PreprocessConfig(data=f"{src}/train.jsonl", image_root=f"{src}/images",
                           output=f"{s3_endpoint}/out", tokenizer=f"{src}/tokenizer",
                           image_size=32, num_image_tokens=16, max_length=128)
    m = preprocess(cfg)
    first = _read_shards(cfg.output)
    assert m["records_kept"] == 60 and len(first) == 60
    assert storage.exists(f"{s3_endpoint}/out/manifest.json")
    m2 = preprocess(cfg)
    assert _read_shards(cfg.output) == first
    assert m2["shards"] == m["shards"]
    # The local path gives the very same rows (same pixels, same tokens).
    local = tmp_path / "train.jsonl"
    local.write_text("\n".join(recs) + "\n")
    preprocess(_cfg(demo_dir, local, tmp_path / "loc"))
    assert _read_shards(tmp_path / "loc") == first


def test_manifest_token_statistics(demo_dir, tmp_path):
    m = preprocess(_cfg(demo_dir, demo_dir / "alignment_train.jsonl", tmp_path / "al", template="plain"))
    assert m["records_rejected"] == 0
    cap = m["tokens"]["caption"]
    assert cap["count"] == m["records_kept"] and cap["q1"] <= cap["median"] <= cap["q3"]


DRIVER = """
import json, os, sys, threading, time
import psutil, ray
from medvl.data.preprocess import PreprocessConfig, preprocess

cfg, limit = PreprocessConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
ray.init(address=sys.argv[3], log_to_driver=False)
me = psutil.Process()
base = peak = me.memory_info().rss


def watch():  # the memory limit: the driver dies past base + limit
    global peak
    while True:
        peak = max(peak, me.memory_info().rss)
        if peak - base > limit:
            print(json.dumps({"killed_at": peak - base}), flush=True)
            os._exit(3)
        time.sleep(0.005)


threading.Thread(target=watch, daemon=True).start()
m = preprocess(cfg)
print(json.dumps({"growth": peak - base, "in": m["records_in"], "kept": m["records_kept"],
                  "rejected": m["rejects_by_reason"]}), flush=True)
"""


def test_a_json_array_bigger_than_the_driver_may_hold_streams_through(demo_dir, tmp_path):
    """A 120 MB JSON array through a driver allowed to grow by 100 MB: holding the parsed
    array (the old driver) costs several times the file; the streaming pass one record."""
    import subprocess
    import sys

    import ray

    good = [json.loads(x) for x in (demo_dir / "instruction_train.jsonl").read_text().splitlines()][:20]
    essay = "影像学检查提示双肺纹理增多。" * 700  # ~29 KB of UTF-8 per record
    bad = [{"id": f"long-{i}", "image": "x.png",  # no <image> in the question: a cheap reject
            "conversations": [{"from": "human", "value": "描述"}, {"from": "gpt", "value": essay}]}
           for i in range(4100)]
    with open(tmp_path / "big.json", "w") as f:
        json.dump(good + bad, f, ensure_ascii=False)
    assert (tmp_path / "big.json").stat().st_size > 120e6
    cfg = _cfg(demo_dir, tmp_path / "big.json", tmp_path / "o")
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg.__dict__), str(100 << 20),
                          ray.get_runtime_context().gcs_address], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["in"] == 4120 and report["kept"] == 20 and report["rejected"] == {"no_image_token": 4100}
    assert report["growth"] < 100 << 20
