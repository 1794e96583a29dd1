"""What an image may cost, checked from its header before any pixel is decoded.

Shared by ``images.py`` (PNG/JPEG/BMP/TIFF and the ``fit`` to the vision tower) and
``dicom.py``: the error both raise, the spec both obey, and the size check against the
canvas ``fit`` would build. Kept apart so neither decoder imports the other for them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


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
    allow_burned_in: bool = False  # DICOM with BurnedInAnnotation YES: patient text in the pixels


def check_size(w: int, h: int, spec: ImageSpec) -> None:
    """``image_too_large`` from the header's dimensions, before any pixel is decoded: the
    image itself, and the canvas ``fit`` would build for it."""
    if w * h > spec.max_pixels:
        raise ImageError("image_too_large", f"{w}x{h} pixels > max_pixels={spec.max_pixels}")
    canvas = canvas_pixels(w, h, spec.size, spec.aspect)
    if canvas > spec.max_pixels:
        raise ImageError("image_too_large", f"{w}x{h} needs a {canvas}-pixel canvas to {spec.aspect} "
                                            f"> max_pixels={spec.max_pixels}")


# A progressive JPEG's decoder walks every block of the image once per scan: a flat 7000x7000
# image with its last 75-byte scan repeated 400 times took 21 s, so 10 MB could hold hours.
# libjpeg-turbo's advice against this is a scan limit (djpeg -maxscans, TurboJPEG's
# TJPARAM_SCANLIMIT); encoders write 10 scans for a colour progressive JPEG (6 greyscale),
# a few more for tuned scripts. 64 keeps every ordinary file and bounds that image at 2 s
# (0.4 s with its own 10 scans; measured here).
MAX_JPEG_SCANS = 64
SOS = 0xDA  # start of scan; in entropy-coded data 0xFF is followed by 0x00 or RSTn only


def jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """``(offset, marker)`` of a JPEG stream's segments from SOI, each skipped by its length
    as a decoder does, up to the first start of scan (the last one yielded); the walk ends
    early at bytes that are no marker."""
    at = 2 if data[:2] == b"\xff\xd8" else len(data)
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        yield at, marker
        if marker == SOS:
            return
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]


def check_scans(data: bytes) -> None:
    """``too_many_scans`` for a JPEG stream with more than ``MAX_JPEG_SCANS`` scans, counted
    at memchr speed before anything is decoded, from the last segment the header walk
    reached: metadata before it (an ICC profile, EXIF) is skipped by length, as the decoder
    skips it, and cannot add false scans. The count can be too high (an APP segment
    between scans), never too low. Not a JPEG stream (no SOI marker): nothing to count."""
    if data[:2] != b"\xff\xd8":
        return
    start = max((at for at, _ in jpeg_markers(data)), default=0)
    scans = data.count(bytes((0xFF, SOS)), start)
    if scans > MAX_JPEG_SCANS:
        raise ImageError("too_many_scans", f"JPEG with {scans} scans > {MAX_JPEG_SCANS}")


def band_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int, int, float]:
    """Output lines ``r0..r1`` whose filter window touches the image, the canvas band
    ``c0..c1`` they read, the image's offset in the square, input pixels per output line."""
    side, short = max(w, h), min(w, h)
    offset = (side - short) // 2  # expand2square's padding before the image
    scale = side / size  # input pixels per output line (>= 2 here)
    support = 2.0 * scale  # bicubic radius 2, stretched by the downscale
    r0 = max(0, int(np.floor((offset - support) / scale - 0.5)))
    r1 = min(size, int(np.ceil((offset + short + support) / scale + 0.5)))
    margin = int(np.ceil(2.5 * support + scale)) + 2  # every window of r0..r1 fits the band
    return r0, r1, max(0, offset - margin), min(side, offset + short + margin), offset, scale


def canvas_pixels(w: int, h: int, size: int, aspect: str) -> int:
    """Pixels ``fit`` allocates for a ``w x h`` image: checked before decoding, since a
    tiny file can describe an image whose padded canvas fills the host (20000 x 1)."""
    if aspect == "crop" or w == h:
        return w * h
    if max(w, h) < 2 * size:
        return max(w, h) ** 2
    _, _, c0, c1, _, _ = band_geometry(w, h, size)
    return max(w, h) * (c1 - c0)
