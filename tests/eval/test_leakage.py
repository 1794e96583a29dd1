"""The leakage check finds a training image hidden in an eval set: resized and JPEG
re-encoded (near duplicate), or saved again losslessly (identical pixels)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from medvl.data import images
from medvl.data.limits import ImageSpec
from medvl.eval.evaluate import EvalConfig, check_leakage
from medvl.eval.leakage import PHASH_BITS, phash


def largest_training_image(demo_dir) -> tuple[str, Image.Image]:
    """pHash needs some pixels to work with: the demo's biggest training image."""
    rels = {json.loads(x)["image"] for x in (demo_dir / "instruction_train.jsonl").read_text().splitlines()}
    decoded = {r: images.decode((demo_dir / "images" / r).read_bytes(), r, ImageSpec()) for r in rels}
    rel = max(decoded, key=lambda r: decoded[r].size[0] * decoded[r].size[1])
    return rel, decoded[rel]


def resized_jpeg(img: Image.Image, scale: float = 0.6, quality: int = 75) -> bytes:
    small = img.convert("RGB").resize((int(img.size[0] * scale), int(img.size[1] * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def noise(seed: int, size: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8), "L")


def test_phash_survives_resize_and_reencode_and_tells_images_apart(demo_dir):
    _, img = largest_training_image(demo_dir)
    assert min(img.size) >= 32, img.size
    copy = Image.open(io.BytesIO(resized_jpeg(img)))
    assert bin(phash(img) ^ phash(copy)).count("1") <= PHASH_BITS
    assert bin(phash(noise(1)) ^ phash(noise(2))).count("1") > PHASH_BITS


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_planted_training_image_is_found_and_dropped(demo_dir, tmp_path):
    rel, img = largest_training_image(demo_dir)
    lines = (demo_dir / "instruction_train.jsonl").read_text().splitlines()
    train = tmp_path / "train.jsonl"  # the planted image's record and a few others: decoding is the cost
    train.write_text("\n".join([x for x in lines if json.loads(x)["image"] == rel][:1] + lines[:8]) + "\n")
    (tmp_path / "planted.jpg").write_bytes(resized_jpeg(img))
    img.save(tmp_path / "resaved.png")  # other bytes, same pixels
    noise(3).save(tmp_path / "unrelated.png")
    cfg = EvalConfig(image_root=str(tmp_path), leakage_data=str(train), leakage_image_root=str(demo_dir / "images"),
                     leakage_drop=True)
    examples = [{"id": f"q-{n}", "image": n, "index": i}
                for i, n in enumerate(["planted.jpg", "resaved.png", "unrelated.png"])]
    leakage, kept = check_leakage(cfg, examples)
    by_eval = {}
    for o in leakage["overlaps"]:
        by_eval.setdefault(o["eval_image"], []).append(o)
    assert "unrelated.png" not in by_eval
    assert any(o["train_image"] == rel and o["kind"] == "near" for o in by_eval["planted.jpg"]), by_eval
    assert any(o["train_image"] == rel and o["kind"] == "exact" and o["bits"] == 0 for o in by_eval["resaved.png"])
    assert leakage["questions"] == ["q-planted.jpg", "q-resaved.png"] and kept == [{**examples[2], "index": 0}]


def test_missing_training_corpus_is_refused_before_ray(tmp_path):
    """A leakage_data path that does not exist is named before Ray starts or any image is read."""
    from medvl.eval.evaluate import evaluate

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "eval.jsonl").write_text("")
    cfg = EvalConfig(model=str(tmp_path / "model"), data=str(tmp_path / "eval.jsonl"), image_root=str(tmp_path),
                     output=str(tmp_path / "out"), leakage_data=str(tmp_path / "no-such-train.jsonl"))
    with pytest.raises(ValueError, match="leakage_data: .*no-such-train.jsonl does not exist"):
        evaluate(cfg)
