"""Decode medical images (JPEG/PNG/BMP/TIFF and DICOM) to RGB and fit them to the vision tower.

Output is ``uint8`` HWC of ``size x size``: normalisation to the CLIP mean/std happens
once, at load time, so shards stay 4x smaller than float pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

# CLIP's image mean as 0-255 integers: LLaVA's ``expand2square`` background colour.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)

RESAMPLE = Image.Resampling.BICUBIC  # CLIPImageProcessor's filter


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is the rejects.jsonl reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSpec:
    size: int = 336
    aspect: str = "pad"  # "pad" (expand to square, Qilin-Med-VL) or "crop" (resize + centre crop)
    max_pixels: int = 50_000_000  # pixel-bomb guard, checked before pixels are decoded


def is_dicom(data: bytes, name: str = "") -> bool:
    return name.lower().endswith(".dcm") or data[128:132] == b"DICM"


def decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes of any supported format -> RGB PIL image, or ``ImageError``."""
    if is_dicom(data, name):
        from medvl.data.dicom import dicom_to_rgb

        return Image.fromarray(dicom_to_rgb(data, max_pixels))
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError("image_too_large", f"{w}x{h} pixels > max_pixels={max_pixels}")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img = img.convert("RGB")  # forces the full decode: truncated files fail here
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}") from e
    return img


def fit(img: Image.Image, size: int, aspect: str) -> np.ndarray:
    """Fit an RGB image into ``size x size`` exactly as LLaVA does, returning uint8 HWC.

    ``pad`` matches ``expand2square`` + CLIP's bicubic resize. Instead of first pasting
    the image onto a full-size square canvas (a large copy for big radiographs), only a
    band around the image with a margin wider than the filter's support is built and
    resampled through ``box``; the rest of the square is the pad colour. Output pixels
    are identical to the naive path because the filter never sees beyond the margin.
    """
    w, h = img.size
    if aspect == "crop":
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((rw, rh), RESAMPLE)
        left, top = (rw - size) // 2, (rh - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)))
    if w == h:
        return np.asarray(img.resize((size, size), RESAMPLE))
    return _pad_resize(img, size)


def _pad_resize(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    side = max(w, h)
    vertical = w > h  # padding goes above/below (landscape) or left/right (portrait)
    short = h if vertical else w
    offset = (side - short) // 2  # expand2square's padding before the image
    scale = side / size  # input pixels per output pixel
    # Bicubic support (radius 2 input pixels), stretched by a downscale.
    support = 2.0 * max(scale, 1.0)
    # Every filter window of output lines r0..r1 lies inside the band: no edge clamping.
    margin = int(np.ceil(2.5 * support + scale)) + 2
    r0 = max(0, int(np.floor((offset - support) / scale - 0.5)))
    r1 = min(size, int(np.ceil((offset + short + support) / scale + 0.5)))
    start = max(0, offset - margin)
    extent = min(side, offset + short + margin) - start
    lo, hi = r0 * scale - start, r1 * scale - start
    if vertical:
        band = Image.new("RGB", (w, extent), PAD_COLOR)
        band.paste(img, (0, offset - start))
        part = band.resize((size, r1 - r0), RESAMPLE, box=(0.0, lo, float(w), hi))
    else:
        band = Image.new("RGB", (extent, h), PAD_COLOR)
        band.paste(img, (offset - start, 0))
        part = band.resize((r1 - r0, size), RESAMPLE, box=(lo, 0.0, hi, float(h)))
    out = np.empty((size, size, 3), np.uint8)
    out[:] = PAD_COLOR
    if vertical:
        out[r0:r1] = np.asarray(part)
    else:
        out[:, r0:r1] = np.asarray(part)
    return out


def load_image(data: bytes, name: str, spec: ImageSpec) -> np.ndarray:
    """Bytes -> fitted uint8 HWC array; raises ``ImageError`` with a reject reason."""
    return fit(decode(data, name, spec.max_pixels), spec.size, spec.aspect)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``(..., H, W, 3)`` -> float32 ``(..., 3, H, W)`` with CLIP mean/std."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.moveaxis(x, -1, -3)
