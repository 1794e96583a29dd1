"""Decode medical images (JPEG/PNG/BMP/TIFF and DICOM) to RGB and fit them to the vision tower.

Output is ``uint8`` HWC of ``size x size``: normalisation to the CLIP mean/std happens
once, at load time, so shards stay 4x smaller than float pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from medvl.data.dicom import dicom_to_array
from medvl.data.limits import ImageError, ImageSpec, band_geometry, check_scans, check_size

# CLIP's image mean as 0-255 integers: LLaVA's ``expand2square`` background colour.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)

RESAMPLE = Image.Resampling.BICUBIC  # CLIPImageProcessor's filter
# The formats the guide documents (DICOM goes through dicom.py). Pillow would otherwise try
# every format it knows: EPS runs Ghostscript where installed, and PSD, FITS, JPEG 2000 or a
# 200k-frame GIF are parsers and costs no corpus of ours needs.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


def is_dicom(data: bytes, name: str = "") -> bool:
    return name.lower().endswith(".dcm") or data[128:132] == b"DICM"


def decode(data: bytes, name: str, spec: ImageSpec) -> Image.Image:
    """Bytes of any supported format -> RGB or greyscale PIL image, or ``ImageError``."""
    if is_dicom(data, name):
        return Image.fromarray(dicom_to_array(data, spec))
    check_scans(data)  # a JPEG's scans: each is a pass over the whole image
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # at its first frame, which is all we
        # decode: ``n_frames`` would walk every frame of a multi-page TIFF
        check_size(*img.size, spec)
        # Greyscale stays one channel (4x less resampling work); the full decode runs
        # here, so truncated files fail here. An image already in its mode is not copied
        # (a 50-megapixel RGB upload would otherwise hold 2 x 150 MB).
        mode = "L" if img.mode in ("L", "I", "I;16", "1") else "RGB"
        img.load()
        img = img if img.mode == mode else img.convert(mode)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # over Pillow's own limit before its size is read
        raise ImageError("image_too_large", str(e)) from e
    except UnidentifiedImageError as e:  # its message is the repr of our in-memory buffer
        raise ImageError("corrupt_image", "not a PNG, JPEG, BMP, TIFF or DICOM image") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}") from e
    return img


def fit(img: Image.Image, size: int, aspect: str) -> np.ndarray:
    """Fit an RGB or greyscale (``L``) image into ``size x size`` as LLaVA does; uint8 HWC RGB.

    ``pad`` gives the pixels of ``expand2square`` + CLIP's bicubic resize without building
    the full square canvas: only a band around the image, wider than the filter's reach,
    is pasted onto the pad colour and resampled through ``box``; the rest of the square is
    the pad colour. Square greyscale images (most DICOM) resample one channel, not four.
    """
    w, h = img.size
    if aspect == "crop":  # CLIPImageProcessor: shortest side to ``size``, the long side
        # truncated (int, not round), centre crop; resampling only the kept box (a 20000x1
        # image would resize to 6.7M x 336 pixels first)
        long = int(size * max(w, h) / min(w, h))
        rw, rh = (size, long) if w <= h else (long, size)
        left, top = (rw - size) // 2, (rh - size) // 2
        if rw * rh <= 4 * size * size:  # ordinary shapes: CLIP's own resize, then the crop
            return _rgb(img.resize((rw, rh), RESAMPLE).crop((left, top, left + size, top + size)))
        sx, sy = w / rw, h / rh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return _rgb(img.resize((size, size), RESAMPLE, box=box))
    if w == h:
        return _rgb(img.resize((size, size), RESAMPLE))
    if max(w, h) < 2 * size:  # little to save: resample the full canvas exactly as LLaVA does
        side = max(w, h)
        return _rgb(_band(img, w > h, 0, side, (side - min(w, h)) // 2).resize((size, size), RESAMPLE))
    return _pad_resize(img, size)


def _rgb(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr


def _pad_resize(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    vertical = w > h  # padding above/below (landscape) or left/right (portrait)
    # Output lines outside r0..r1 stay pad colour.
    r0, r1, c0, c1, offset, scale = band_geometry(w, h, size)
    band = _band(img, vertical, c0, c1, offset)
    lo, hi = r0 * scale - c0, r1 * scale - c0
    out = np.empty((size, size, 3), np.uint8)
    out[:] = PAD_COLOR
    if vertical:
        out[r0:r1] = np.asarray(band.resize((size, r1 - r0), RESAMPLE, box=(0.0, lo, float(w), hi)))
    else:  # two calls keep Pillow's pass order (horizontal, then vertical) of the full resize
        columns = band.resize((r1 - r0, h), RESAMPLE, box=(lo, 0.0, hi, float(h)))
        out[:, r0:r1] = np.asarray(columns.resize((r1 - r0, size), RESAMPLE))
    return out


def _band(img: Image.Image, vertical: bool, c0: int, c1: int, offset: int) -> Image.Image:
    """Canvas coordinates [c0, c1) along the padded axis: pad colour with the image pasted in."""
    w, h = img.size
    band = Image.new("RGB", (w, c1 - c0) if vertical else (c1 - c0, h), PAD_COLOR)
    band.paste(img, (0, offset - c0) if vertical else (offset - c0, 0))
    return band


def load_image(data: bytes, name: str, spec: ImageSpec) -> np.ndarray:
    """Bytes -> fitted uint8 HWC array; raises ``ImageError`` with a reject reason."""
    return fit(decode(data, name, spec), spec.size, spec.aspect)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``(..., H, W, 3)`` -> float32 ``(..., 3, H, W)`` with CLIP mean/std."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.moveaxis(x, -1, -3)
