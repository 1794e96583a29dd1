"""Compressed DICOM frames whose own stream header lies about the image: decoders size their
output from the stream, not from Rows x Columns, so the lie is caught before decoding."""

import io
import struct
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from medvl.data.images import load_image
from tests.data.test_hostile import SPEC, refused


def encapsulated(frame: bytes, syntax: str, bits: int) -> bytes:
    """A 16x16 monochrome file whose one frame is ``frame``, compressed as ``syntax``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _segment(marker: bytes, payload: bytes) -> bytes:
    return marker + struct.pack(">H", len(payload) + 2) + payload


def test_a_jpeg_lossless_frame_larger_than_its_header_is_not_decoded():
    """20 KB saying 20000x20000 behind a 16x16 header: 39 s and 2.3 GB in pylibjpeg before the
    mismatch showed (4000x4000 here: 1.2 s, 100 MB)."""
    jpeg = (b"\xff\xd8" + _segment(b"\xff\xc3", struct.pack(">BHHB", 16, 4000, 4000, 1) + b"\x01\x11\x00")
            + _segment(b"\xff\xc4", b"\x00" + bytes([1] + [0] * 15) + b"\x00")
            + _segment(b"\xff\xda", b"\x01\x01\x00\x01\x00\x00") + bytes(20000) + b"\xff\xd9")
    error, _ = refused(encapsulated(jpeg, pydicom.uid.JPEGLosslessSV1, 16))
    assert error.reason == "corrupt_image" and "4000x4000, the header says 16x16" in error.detail


def test_an_rle_frame_longer_than_its_rows_need_is_not_expanded():
    """pydicom's RLE decoder expands every run: 7 MB of runs (in a 10 MB upload) were 448 MB
    and 2.4 s of Python for a 16x16 image. 100 KB of runs here: 6.4 MB."""
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x00" * 50_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the padding it expanded
        error, peak = refused(encapsulated(frame, pydicom.uid.RLELossless, 8))
    assert error.reason == "image_too_large" and peak < 2


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm"])
def test_honest_compressed_files_still_decode(name):
    with open(get_testdata_file(name), "rb") as f:
        assert load_image(f.read(), "x.dcm", SPEC).shape == (32, 32, 3)
