"""Hostile inputs to the image decoders and the preprocessing records (issue 31, part 4):
each is refused with a reason, in bounded memory, and never ends a run."""

import io
import json
import struct
import time
import tracemalloc
import zlib

import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from medvl.data.images import ImageError, ImageSpec, load_image
from medvl.data.preprocess import PreprocessConfig, process_one

MB = 1 << 20
SPEC = ImageSpec(size=32)


def _explicit_le() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def deflated_dicom(pixel_bytes: int, rows: int = 16, cols: int = 16, frames: int = 1,
                   trailer: int = 0, **attrs) -> bytes:
    """A deflated-transfer-syntax file (1.2.840.10008.1.2.1.99) whose PixelData element holds
    ``pixel_bytes`` zeros (and ``trailer`` bytes of trailing padding after it), streamed
    through zlib so the test never holds the inflated bytes: a 128 MB body deflates to ~130 KB."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in attrs.items():
        setattr(ds, k, v)
    out, header = _explicit_le(), _explicit_le()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    write_dataset(header, ds)
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(header.getvalue() + b"\xe0\x7f\x10\x00OW\0\0" + pixel_bytes.to_bytes(4, "little"))]
    parts += _zeros(z, pixel_bytes)
    if trailer:  # (FFFC,FFFC) Data Set Trailing Padding
        parts.append(z.compress(b"\xfc\xff\xfc\xffOB\0\0" + trailer.to_bytes(4, "little")))
        parts += _zeros(z, trailer)
    return out.getvalue() + b"".join(parts) + z.flush()


def _zeros(z, n: int) -> list[bytes]:
    block = bytes(min(n, MB))
    return [z.compress(block[:min(MB, n - i)]) for i in range(0, n, MB)]


def peak_mb(fn, *args):
    """``fn(*args)`` and the most memory Python and NumPy held during it, in MB."""
    tracemalloc.start()
    try:
        result = fn(*args)
    finally:
        peak = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    return result, peak


def refused(data: bytes, spec: ImageSpec = SPEC) -> tuple[ImageError, float]:
    def decode():
        with pytest.raises(ImageError) as e:
            load_image(data, "x.dcm", spec)
        return e.value

    return peak_mb(decode)


def test_a_deflated_bomb_is_refused_before_it_is_inflated():
    """16x16 header, 128 MB of zero pixel data, 130 KB on the wire: pydicom alone inflates
    all of it (and decoding took 4.4 GB for 400 MB)."""
    bomb = deflated_dicom(128 * MB)
    assert len(bomb) < 200_000
    err, peak = refused(bomb)
    assert err.reason == "corrupt_image" and "need 512" in err.detail
    assert peak < 8, f"{peak:.0f} MB held while refusing a {len(bomb)}-byte file"


def test_deflated_data_past_what_the_header_declares_is_not_inflated():
    """An honest PixelData length, then 64 MB of trailing padding: inflation stops at the bound."""
    err, peak = refused(deflated_dicom(512, trailer=64 * MB))
    assert err.reason == "image_too_large" and "past the size its header declares" in err.detail
    assert peak < 8


def test_deflated_frames_count_against_the_pixel_budget():
    """Every frame of a deflated file must be inflated to reach the first: 100k frames of
    16x16 are refused from the header, before any pixel byte."""
    err, peak = refused(deflated_dicom(0, frames=100_000), ImageSpec(size=32, max_pixels=1_000_000))
    assert err.reason == "image_too_large" and "100000 frames" in err.detail
    assert peak < 8


def test_an_honest_deflated_file_still_decodes():
    honest = deflated_dicom(16 * 16 * 2)
    assert load_image(honest, "x.dcm", ImageSpec(size=32)).shape == (32, 32, 3)
    real = pydicom.data.get_testdata_file("image_dfl.dcm")
    with open(real, "rb") as f:
        assert load_image(f.read(), "x.dcm", ImageSpec(size=32)).shape == (32, 32, 3)


def _cfg(demo_dir, tmp_path, **kw) -> PreprocessConfig:
    return PreprocessConfig(data="-", image_root=str(tmp_path), output=str(tmp_path / "out"),
                            tokenizer=str(demo_dir / "tokenizer"), image_size=32, num_image_tokens=16,
                            max_length=128, **kw)


def _record(image: str = "x.png", **kw) -> str:
    rec = {"id": "r1", "image": image,
           "conversations": [{"from": "human", "value": "<image>\n问"}, {"from": "gpt", "value": "答"}], **kw}
    return json.dumps(rec, ensure_ascii=False)


def test_preprocessing_rejects_the_bomb_in_bounded_memory(demo_dir, tmp_path):
    (tmp_path / "bomb.dcm").write_bytes(deflated_dicom(128 * MB))
    row, peak = peak_mb(process_one, 3, _record("bomb.dcm"), _cfg(demo_dir, tmp_path))
    assert (row["id"], row["reason"]) == ("r1", "corrupt_image") and "need 512" in row["detail"]
    assert peak < 16


def tiff_pages(n: int) -> bytes:
    """A TIFF of ``n`` 1x1 pages (102 bytes each), written by hand: Pillow's own writer
    takes minutes for thousands of pages."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (278, 3, 1), (279, 4, 1)]  # 1x1, 8-bit grey, uncompressed, its pixel at byte 8
    out = bytearray(b"II*\x00" + struct.pack("<I", 12) + b"\x80\x00\x00\x00")
    for i in range(n):
        nxt = 0 if i == n - 1 else len(out) + 2 + 12 * len(entries) + 4
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            out += struct.pack("<HHI", tag, kind, 1)
            out += struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<I", nxt)
    return bytes(out)


def test_only_the_first_page_of_a_tiff_is_read():
    """``n_frames`` walked every page, quadratically in Pillow: 5,000 pages (510 KB) took
    seconds, 30,000 (3 MB, inside the body limit) 90 s."""
    data = tiff_pages(5000)
    load_image(tiff_pages(2), "warm.tif", ImageSpec(size=32))  # Pillow's first open imports plugins
    start = time.perf_counter()
    pixels = load_image(data, "x.tif", ImageSpec(size=32))
    assert time.perf_counter() - start < 0.5
    assert pixels.shape == (32, 32, 3) and pixels[16, 16, 0] == 128


def _saved(fmt: str, frames: int = 1) -> bytes:
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"save_all": True, "append_images": [img] * (frames - 1)} if frames > 1 else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PPM", "ICO", "TGA", "PCX"])
def test_formats_we_do_not_document_are_refused(fmt):
    """Only PNG, JPEG, BMP, TIFF (and DICOM): Pillow opened every format it knows."""
    with pytest.raises(ImageError) as e:
        load_image(_saved(fmt, frames=3 if fmt == "GIF" else 1), f"x.{fmt.lower()}", ImageSpec(size=32))
    assert e.value.reason == "corrupt_image" and "not a PNG, JPEG, BMP, TIFF or DICOM" in e.value.detail


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_documented_formats_still_decode(fmt):
    assert load_image(_saved(fmt), f"x.{fmt.lower()}", ImageSpec(size=32)).shape == (32, 32, 3)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"id": ' + "1" * 5000 + "}"])
def test_records_that_break_the_json_parser_are_rejects(demo_dir, tmp_path, text):
    """100,000 ``[`` raised RecursionError (a 5,000-digit number ValueError), ending the run."""
    row = process_one(4, text, _cfg(demo_dir, tmp_path))
    assert (row["id"], row["reason"]) == ("line-4", "bad_json") and row["detail"]


def test_an_image_path_with_a_nul_is_a_reject(demo_dir, tmp_path):
    """pyarrow raised ArrowInvalid for it, ending the run."""
    row = process_one(5, _record("scan\x00.png"), _cfg(demo_dir, tmp_path))
    assert (row["id"], row["reason"]) == ("r1", "missing_image") and "NUL" in row["detail"]


def test_burned_in_annotation_is_rejected_unless_allowed(demo_dir, tmp_path):
    """Patient text burned into the pixels must not reach a training shard by default."""
    (tmp_path / "burned.dcm").write_bytes(deflated_dicom(512, BurnedInAnnotation="YES"))
    row = process_one(2, _record("burned.dcm"), _cfg(demo_dir, tmp_path))
    assert (row["reason"], row["detail"]) == ("burned_in_annotation", "burned.dcm: BurnedInAnnotation is "
                                                                       "YES: its pixels carry patient text")
    kept = process_one(2, _record("burned.dcm"), _cfg(demo_dir, tmp_path, allow_burned_in_annotation=True))
    assert kept["reason"] == "" and len(kept["pixels"]) == 32 * 32 * 3
    (tmp_path / "clean.dcm").write_bytes(deflated_dicom(512, BurnedInAnnotation="NO"))
    assert process_one(2, _record("clean.dcm"), _cfg(demo_dir, tmp_path))["reason"] == ""


SECRET = "张三 1970-01-01 MRN 0012345"


@pytest.mark.parametrize("text", [
    '{"id": "p1", "patient": "' + SECRET + '", "image": ',  # bad_json: quoted its first 120 characters
    json.dumps({"id": {"name": SECRET}, "image": "x.png"}, ensure_ascii=False),  # bad_record: quoted the id
])
def test_a_reject_does_not_quote_its_record_unless_asked(demo_dir, tmp_path, text):
    row = process_one(6, text, _cfg(demo_dir, tmp_path))
    assert row["reason"] in ("bad_json", "bad_record") and row["detail"] and SECRET not in row["detail"]
    debug = process_one(6, text, _cfg(demo_dir, tmp_path, rejects_quote_records=True))
    assert SECRET in debug["detail"]
