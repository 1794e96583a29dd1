"""DICOM -> 8-bit RGB, the way a radiologist's viewer would show it.

Modality LUT (rescale slope/intercept), then the VOI window stored in the file or, when
there is none (or it is invalid), a robust 0.5-99.5 percentile window; MONOCHROME1 is inverted so bone is
always bright; multi-frame files contribute their first frame; colour files (RGB, YBR,
palette) are converted to RGB. Works for any bit depth because everything goes through
float32. Compressed transfer syntaxes decode through Pillow (JPEG baseline, JPEG 2000)
and pylibjpeg (JPEG Lossless and JPEG-LS, the usual PACS export formats).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.filebase import DicomBytesIO

# pydicom's own pixel module reads the file meta and the header this way (pixels/utils.py)
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    pixel_array,
)
from pydicom.uid import (
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from medvl.data.limits import ImageError, ImageSpec, check_scans, check_size, jpeg_markers

PERCENTILES = (0.5, 99.5)
HEADER_BYTES = 1 << 20  # a deflated file's elements before its pixel data, inflated: far above real headers
TRAILER_BYTES = 1 << 16  # and after them (padding, signatures)
PIXEL_DATA = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
# JPEG's start-of-frame markers (T.81: C0-CF but DHT C4, JPG C8, DAC CC) and JPEG-LS's SOF55
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 x mapped linearly onto 0..255 (lo -> 0, hi -> 255) and clipped, in place:
    a 4096x4096 frame is 64 MB of float32, and each temporary of an expression would cost
    as much again."""
    x -= lo
    x *= 255.0 / max(hi - lo, 1e-6)
    return np.clip(x, 0.0, 255.0, out=x)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """0..255 float32 (overwritten) -> rounded uint8."""
    x += 0.5
    return x.astype(np.uint8)


def _first(value) -> float:
    """The first of a possibly multi-valued window attribute."""
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def _stored_window(ds: pydicom.Dataset, x: np.ndarray) -> np.ndarray | None:
    """The file's own VOI transform, mapped onto 0..255 as DICOM PS3.3 C.11.2.1.2 defines it
    (LINEAR, LINEAR_EXACT, SIGMOID windows; a VOI LUT scaled by its output bit depth), or
    None when the file has none or a broken one (a zero window width is common in the
    wild: such a file still has a usable picture). Windows overwrite ``x``."""
    if "VOILUTSequence" in ds:
        try:
            lut = ds.VOILUTSequence[0]
            out = apply_voi_lut(x, ds, index=0).astype(np.float32)
        except (ValueError, AttributeError, IndexError):
            return None
        bits = int(lut.LUTDescriptor[2])
        return out * (255.0 / (2**bits - 1))
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (ValueError, TypeError):  # not a number ("abc", empty): no window, as for a zero width
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID" and w > 0:
        x -= c
        x *= -4.0 / w
        np.exp(x, out=x)
        x += 1.0
        return np.divide(255.0, x, out=x)
    if function == "LINEAR_EXACT" and w > 0:
        return _scale(x, c - w / 2, c + w / 2)
    if w >= 1:  # LINEAR: the window's edges are c - 0.5 -/+ (w - 1) / 2
        return _scale(x, c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)
    return None


def _modality(ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    """Stored values -> float32 modality units. The linear rescale is done here in float32
    (pydicom's goes through float64: twice the memory for the same picture)."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    x = arr.astype(np.float32)
    x *= float(ds.get("RescaleSlope", 1.0) or 1.0)
    x += float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return x


def _monochrome(ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    x = _modality(ds, arr)
    windowed = _stored_window(ds, x)
    if windowed is None:
        windowed = _scale(x, *(float(v) for v in np.percentile(x, PERCENTILES)))
    gray = _to_uint8(windowed)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _colour(ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "RGB"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif photometric.startswith("YBR") and photometric not in ("YBR_ICT", "YBR_RCT"):
        arr = convert_color_space(arr, photometric, "RGB")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    x = arr.astype(np.float32)
    return _to_uint8(_scale(x, float(x.min()), float(x.max())))


def dicom_to_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """DICOM bytes -> uint8 HxWx3, raising ``ImageError`` for unusable files."""
    arr = dicom_to_array(data, ImageSpec(max_pixels=max_pixels))
    return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr


def dicom_to_array(data: bytes, spec: ImageSpec) -> np.ndarray:
    """DICOM bytes -> uint8 HxW (monochrome) or HxWx3 (colour); ``ImageError`` if unusable.
    Sizes are checked from the header, and only the first frame is decoded (a small
    compressed multi-frame file can hold gigabytes of frames)."""
    try:
        ds = _read(data, spec)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
        raise ImageError("corrupt_image", f"not a readable DICOM image: {type(e).__name__}: {e}") from e
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES" and not spec.allow_burned_in:
        raise ImageError("burned_in_annotation", "BurnedInAnnotation is YES: its pixels carry patient text")
    check_size(cols, rows, spec)
    try:
        _check_frame(ds, rows, cols)
        arr = pixel_array(ds, index=0 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None)
        samples = int(ds.get("SamplesPerPixel", 1))
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if samples == 1 and photometric != "PALETTE COLOR":
            return _monochrome(ds, arr)
        return _colour(ds, arr)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - missing codecs, truncated pixel data, ...
        raise ImageError("corrupt_image", f"cannot decode DICOM pixels: {type(e).__name__}: {e}") from e


def _check_frame(ds: pydicom.Dataset, rows: int, cols: int) -> None:
    """The first frame's compressed stream against the header's Rows x Columns, before it is
    decoded. Decoders size their output from the stream's own header: a 20 KB JPEG Lossless
    frame saying 20000x20000 behind a 16x16 header took 39 s and 2.3 GB before the mismatch
    showed. pydicom's RLE decoder expands every run a segment holds (7 MB of runs: 448 MB
    and 2.4 s for a 16x16 image), so a segment may be no longer than its rows need."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_encapsulated:
        return
    frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
    if syntax == RLELossless:
        segments = int(ds.get("SamplesPerPixel", 1)) * ((int(ds.get("BitsAllocated", 8)) + 7) // 8)
        per_segment = rows * (cols + (cols + 127) // 128) + 1  # each row a literal run at worst
        if len(frame) > 64 + segments * per_segment:
            raise ImageError("image_too_large", f"{len(frame)} bytes of RLE for {segments} segment(s) of "
                                                f"{cols}x{rows}, which need at most {segments * per_segment}")
        return
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        check_scans(frame)
        size = _jpeg_size(frame)
    elif syntax in JPEG2000TransferSyntaxes:
        size = _j2k_size(frame)
    else:
        return
    if size != (rows, cols):
        raise ImageError("corrupt_image", f"the compressed frame is {size[1]}x{size[0]}, the header says "
                                          f"{cols}x{rows}" if size else "no frame size in the compressed frame")


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG or JPEG-LS stream's start-of-frame segment."""
    for at, marker in jpeg_markers(frame):
        if marker in SOF_MARKERS and at + 9 <= len(frame):
            return struct.unpack(">HH", frame[at + 5:at + 9])
    return None


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 codestream's SIZ segment, which follows its SOC."""
    if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 24:
        return None
    x, y, x0, y0 = struct.unpack(">4I", frame[8:24])
    return y - y0, x - x0


def _read(data: bytes, spec: ImageSpec) -> pydicom.Dataset:
    """The whole dataset; a deflated one inflated only as far as its header allows."""
    fp = DicomBytesIO(data)
    # force: a file without the 128-byte preamble + "DICM" (many PACS exports) is still
    # DICOM when its name or MIME type says so; a non-DICOM one fails on Rows later.
    read_preamble(fp, force=True)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    return _inflate(data[fp.tell():], meta, spec)


def _inflate(body: bytes, meta: pydicom.Dataset, spec: ImageSpec) -> pydicom.Dataset:
    """A deflated dataset (PS3.5 A.5) inflated with a bound: first its header (at most
    ``HEADER_BYTES``), whose size, frames and bit depth say how many pixel bytes may
    follow; then only those. pydicom inflates the whole stream in one call: a 400 KB file
    can hold gigabytes of zeros behind a 16x16 header."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(body, HEADER_BYTES)
    fp = _explicit_le(head)
    header = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixel_data)
    at = fp.tell()
    if head[at:at + 4] != PIXEL_DATA or len(head) < at + 12:
        if inflater.unconsumed_tail:
            raise ImageError("image_too_large", f"deflated DICOM header larger than {HEADER_BYTES} bytes")
        raise ImageError("corrupt_image", "deflated DICOM without pixel data")
    declared = struct.unpack("<I", head[at + 8:at + 12])[0]
    rows, cols = int(header.Rows), int(header.Columns)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    check_size(cols, rows, spec)
    if frames * rows * cols > spec.max_pixels:  # a deflated file is inflated whole, every frame
        raise ImageError("image_too_large", f"{frames} frames of {cols}x{rows} pixels (deflated, so all "
                                            f"are inflated) > max_pixels={spec.max_pixels}")
    bits = frames * rows * cols * int(header.get("SamplesPerPixel", 1)) * int(header.get("BitsAllocated", 0))
    if declared > (bits + 7) // 8 + 1:  # +1: odd lengths are padded to even
        raise ImageError("corrupt_image", f"{declared} bytes of pixel data declared for {frames} frame(s) "
                                          f"of {cols}x{rows} that need {(bits + 7) // 8}")
    room = at + 12 + declared + TRAILER_BYTES - len(head)
    rest = inflater.decompress(inflater.unconsumed_tail, room + 1) if room > 0 else b""
    if len(rest) > room or inflater.unconsumed_tail:
        raise ImageError("image_too_large", "deflated DICOM inflates past the size its header declares")
    ds = read_dataset(_explicit_le(head + rest), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = meta
    return ds


def _explicit_le(data: bytes) -> DicomBytesIO:
    """``data`` as pydicom reads a deflated dataset once inflated: explicit VR little endian."""
    fp = DicomBytesIO(data)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp
