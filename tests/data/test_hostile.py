"""Hostile inputs to the image decoders and the preprocessing records (issue 31, part 4):
each is refused with a reason, in bounded memory, and never ends a run."""

import json
import tracemalloc
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from medvl.data.images import ImageError, ImageSpec, load_image
from medvl.data.preprocess import PreprocessConfig, process_one

MB = 1 << 20


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


def refused(data: bytes, spec: ImageSpec = ImageSpec(size=32)) -> tuple[ImageError, float]:
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
