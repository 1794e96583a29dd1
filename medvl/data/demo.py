"""``medvl demo-data``: a small ChiMed-VL-format corpus built from real clinical DICOM files.

The images are pydicom's bundled test files plus the ``pydicom-data`` package (chest and
extremity radiographs, CT, MR, ultrasound), all offline. Captions and Chinese
question/answer pairs come from each file's own tags (Modality, BodyPartExamined,
StudyDescription). Light augmentation (crop, flip, window) multiplies the samples, and
the train / held-out split is made by source image, so no image leaks into evaluation.

Which modality an unseen source is cannot be learnt from ~25 sources by a random-init
32-pixel tower, so the demo also asks about a **synthetic finding**: every other augmented
image gets a round, contrast-enhanced "nodule" (random size, hue and position) painted in,
the caption says so, and the model is asked whether there is one and whether it is in the
upper or the lower half of the image. That rule transfers
to sources never seen in training, so held-out accuracy on it shows the model looks at the
image. The findings are synthetic: they say nothing about real pathology.
The demo also needs a tokenizer, which cannot be downloaded here: a byte-level BPE is
trained on the corpus text.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from medvl.data.dicom import dicom_to_rgb
from medvl.data.templates import TEMPLATES

# Source images, grouped so that re-encodings of one image share a group (and a split).
GROUPS: dict[str, list[str]] = {
    "ct_head_neck": ["693_UNCI.dcm", "693_UNCR.dcm", "693_J2KI.dcm", "693_J2KR.dcm"],
    "ct_small": ["CT_small.dcm"],
    "ct_pancreas": ["explicit_VR-UN.dcm"],
    "ct_head": ["J2K_pixelrep_mismatch.dcm"],
    "ct_supplemental": ["eCT_Supplemental.dcm"],
    "ct_brain_series": ["dicomdirtests/77654033/CT2/*"],  # a series: several different slices
    "ct_cardiac_series": ["dicomdirtests/98892001/CT5N/*"],
    "ct_scout": ["dicomdirtests/98892001/CT2N/*"],
    "mr_shoulder": ["MR2_UNCI.dcm", "MR2_UNCR.dcm", "MR2_J2KI.dcm", "MR2_J2KR.dcm"],
    "mr_small": ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"],
    "mr_head": ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm"],
    "mr_abdomen": ["MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm"],
    "mr_angio_series": ["dicomdirtests/98892003/MR700/*"],
    "mr_pilot_series": ["dicomdirtests/98892003/MR2/*"],
    "mr_localizer_series": ["dicomdirtests/98892003/MR1/*"],
    "xr_chest": ["RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm"],
    "xr_extremity": ["RG3_UNCI.dcm", "RG3_UNCR.dcm", "RG3_J2KI.dcm", "RG3_J2KR.dcm"],
    "xr_cspine_series": ["dicomdirtests/77654033/CR*/*"],
    "us_abdomen": ["US1_UNCI.dcm", "US1_UNCR.dcm", "US1_J2KI.dcm", "US1_J2KR.dcm"],
    "us_ob": ["OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"],
    "us_echo": ["color-pl.dcm", "color-px.dcm"],
    "us_color": ["examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm"],
    "us_small": ["ExplVR_BigEnd.dcm"],
    "us_3d": ["color3d_jpeg_baseline.dcm"],
    "us_aloka": ["gdcm-US-ALOKA-16.dcm"],
}
HELD_OUT = {"ct_pancreas", "mr_head", "us_echo", "xr_extremity"}
HELD_OUT_VARIANTS = 8  # augmented (and half of them nodule-painted) images per held-out source

MODALITY_ZH = {"CT": "CT", "MR": "磁共振", "CR": "X线", "DX": "X线", "US": "超声"}
CHOICES = ["CT", "磁共振", "X线", "超声"]
SIDES = ["上方", "下方"]  # where the synthetic nodule is, in the image as displayed
BODY_ZH = {"CHEST": "胸部", "THORAX": "胸部", "EXTREMITY": "四肢", "ABDOMEN": "腹部",
           "HEAD": "头部", "SHOULDER": "肩部", "PANCREAS": "胰腺", "LIVER": "肝脏"}


def find_dicom_files() -> dict[str, str]:
    """Bundled DICOM files by name, by enumerating the installed packages: ``*.dcm`` by file
    name, the extension-less files of pydicom's DICOMDIR tree by their path in it."""
    import pydicom.data

    roots = [os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")]
    try:
        import data_store  # the pydicom-data package

        roots.append(os.path.join(os.path.dirname(data_store.__file__), "data"))
    except ImportError:
        pass
    files = {os.path.basename(p): p for r in roots for p in glob.glob(f"{r}/**/*.dcm", recursive=True)}
    tree = glob.glob(f"{roots[0]}/dicomdirtests/*/*/*")
    files.update({os.path.relpath(p, roots[0]): p for p in tree if os.path.isfile(p)})
    return files


def _members(patterns: list[str], files: dict[str, str]) -> list[str]:
    """The names of a group present in this installation (patterns may be globs)."""
    found = [n for pat in patterns for n in sorted(fnmatch.filter(files, pat))]
    return list(dict.fromkeys(found))  # in pattern order, each once


def describe(path: str) -> tuple[str, str | None, str]:
    """(modality in Chinese, body part in Chinese or None, study description) from tags."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    modality = MODALITY_ZH[str(ds.Modality)]
    text = f"{ds.get('BodyPartExamined', '')} {ds.get('StudyDescription', '')}".upper()
    body = next((zh for en, zh in BODY_ZH.items() if en in text), None)
    return modality, body, str(ds.get("StudyDescription", "") or "")


def _augment(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    s = rng.uniform(0.6, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = img.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR)
    gamma = rng.uniform(0.7, 1.4)  # a different display window
    arr = (255.0 * (np.asarray(img, np.float32) / 255.0) ** gamma).astype(np.uint8)
    img = Image.fromarray(arr)
    img.thumbnail((256, 256))
    return img


def add_nodule(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """Paint a synthetic "nodule" into ``img``: a round, contrast-enhanced (red) disc of random
    radius, hue and position, above or below the image's midline. Returns the image and the
    half in Chinese (上方 / 下方: upper / lower, as radiology reports say of lung fields).

    Why red and this big: grey discs look to a random-init 32-pixel tower like bright bone
    patches, and the tiny model did not learn them (held-out accuracy at chance, see
    docs/demo.md); a colour no greyscale image has, over at least one 8-pixel patch, is a
    signal it can learn from ~250 images in the demo's few minutes. Upper/lower rather than
    left/right: the LLM reads the image's 4x4 patches as a sequence, where the upper half is
    one run of tokens, while left/right interleave (the demo model only learnt the prior)."""
    arr = np.asarray(img.convert("RGB"), np.float32)
    h, w = arr.shape[:2]
    side = rng.choice(SIDES)
    r = rng.uniform(0.25, 0.35) * max(h, w)
    cx = rng.uniform(0.20, 0.80) * w
    cy = rng.uniform(0.12, 0.38) * h if side == "上方" else rng.uniform(0.62, 0.88) * h
    d = np.hypot(*np.meshgrid(np.arange(w) - cx, np.arange(h) - cy))
    disc = np.clip(r - d, 0.0, 1.0)[..., None]  # 1 inside, anti-aliased edge
    colour = np.array([rng.uniform(180, 255), rng.uniform(0, 60), rng.uniform(0, 60)], np.float32)
    arr = arr * (1 - disc) + colour * disc
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), side


def _finding_questions(side: str | None) -> list[dict]:
    """Closed questions about the synthetic nodule: present or not; if present, which half."""
    qa = [("图像中是否有结节？", "是" if side else "否", ["是", "否"])]
    if side:
        qa.append(("结节位于图像的上方还是下方？选项：上方、下方", side, SIDES))
    return [{"question": q, "answer": a, "answer_type": "closed", "choices": c, "task": "finding"}
            for q, a, c in qa]


def _conversations(modality: str, body: str | None, rng: random.Random, truthful: bool) -> list[dict]:
    """Modality questions for one image: open, multiple choice, and one yes/no question
    (about its own modality when ``truthful``, else another: alternating, so guessing one
    answer scores half)."""
    what = f"{body}{modality}" if body else modality
    asked = modality if truthful else rng.choice([c for c in CHOICES if c != modality])
    qa = [
        ("这是什么检查？", f"这是一张{what}图像。", "open", None),
        ("这张图像的检查方式是什么？选项：" + "、".join(CHOICES), modality, "closed", CHOICES),
        (f"这是{asked}图像吗？", "是" if truthful else "否", "closed", ["是", "否"]),
    ]
    return [{"question": q, "answer": a, "answer_type": t, "choices": c, "task": "modality"} for q, a, t, c in qa]


def _record(rec_id: str, image: str, question: str, answer: str, **extra) -> dict:
    convs = [{"from": "human", "value": f"<image>\n{question}" if question else "<image>"},
             {"from": "gpt", "value": answer}]
    return {"id": rec_id, "image": image, "conversations": convs, **extra}


def build_demo_data(output: str, variants: int = 10, seed: int = 0) -> dict:
    """Write images/, alignment_{train,heldout}.jsonl, instruction_{train,heldout}.jsonl, tokenizer/."""
    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = find_dicom_files()
    rng = random.Random(seed)
    sets: dict[str, list[dict]] = {f"{k}_{s}": [] for k in ("alignment", "instruction")
                                   for s in ("train", "heldout")}
    for group, names in GROUPS.items():
        split = "heldout" if group in HELD_OUT else "train"
        present = _members(names, files)
        if not present:
            continue
        modality, body, study = describe(files[present[0]])
        series = any("*" in n for n in names)  # different slices, not re-encodings of one image
        bases = [Image.fromarray(dicom_to_rgb(Path(files[n]).read_bytes(), 10**8))
                 for n in (present if series else present[:1])]
        images: list[tuple[str, list[dict]]] = []  # (file, its finding questions)
        for n in present:  # the DICOM files themselves, so the pipeline decodes DICOM
            name = n if n.endswith(".dcm") else n.replace("/", "_") + ".dcm"
            shutil.copyfile(files[n], out / "images" / name)
            images.append((name, []))
        for k in range(variants if split == "train" else HELD_OUT_VARIANTS):
            name = f"{group}_{k:02d}.png"
            img, side = _augment(rng.choice(bases), rng), None
            if k % 2:  # every other image: as many with a nodule as without
                img, side = add_nodule(img, rng)
            img.save(out / "images" / name)
            images.append((name, _finding_questions(side)))
        caption = f"{body or ''}{modality}图像" + (f"，{study}。" if study else "。")
        for i, (img, findings) in enumerate(images):
            extra = {"modality": modality, "source": group}
            seen = next((c["answer"] for c in findings if c["choices"] == SIDES), None)
            told = caption + (f"图像{seen}可见结节。" if seen else "未见结节。" if findings else "")
            sets[f"alignment_{split}"].append(_record(f"{group}-{i}-cap", img, "", told, **extra))
            truthful = len(sets[f"alignment_{split}"]) % 2 == 0  # alternating over the split's images
            for j, c in enumerate(_conversations(modality, body, rng, truthful) + findings):
                sets[f"instruction_{split}"].append(_record(
                    f"{group}-{i}-q{j}", img, c["question"], c["answer"],
                    answer_type=c["answer_type"], choices=c["choices"], task=c["task"], **extra))
    for name, recs in sets.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    train_tokenizer([c["value"] for recs in sets.values() for r in recs for c in r["conversations"]],
                    str(out / "tokenizer"))
    counts = {name: len(recs) for name, recs in sets.items()}
    (out / "README.json").write_text(json.dumps({"counts": counts, "held_out": sorted(HELD_OUT)},
                                                ensure_ascii=False, indent=2))
    return counts


def train_tokenizer(texts: list[str], output: str, vocab_size: int = 2000) -> None:
    """Train a small byte-level BPE (Qwen/GPT-style) on ``texts`` and save it HF-style."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
    corpus = texts + [t.system + t.user + t.assistant + t.answer_prefix for t in TEMPLATES.values()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                            show_progress=False)  # a few blank lines on a non-terminal, for a second of work
    tok = PreTrainedTokenizerFast(  # adds <s> itself, as Llama-2's does: LLaVA keeps that one BOS
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=specials[4:], add_bos_token=True,
    )
    tok.save_pretrained(output)

