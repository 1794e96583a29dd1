import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvl.data import images
from medvl.data.demo import find_dicom_files
from medvl.data.dicom import dicom_to_rgb
from tests.conftest import png_header


def llava_pad(img: Image.Image, size: int) -> np.ndarray:
    """LLaVA's expand2square followed by a bicubic resize: the reference."""
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), images.PAD_COLOR)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return np.asarray(canvas.resize((size, size), images.RESAMPLE))


@pytest.mark.parametrize("w,h", [(1841, 1955), (1955, 1841), (1400, 480), (480, 1400), (640, 480),
                                 (480, 640), (100, 37), (335, 333), (64, 64)])
@pytest.mark.parametrize("size", [32, 336])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_pad_matches_expand2square(w, h, size, mode):
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    ours = images.fit(img, size, "pad").astype(int)
    diff = np.abs(ours - llava_pad(img.convert("RGB"), size).astype(int))
    assert ours.shape == (size, size, 3)
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_pad_colour_fills_the_border():
    img = Image.new("RGB", (100, 20), (255, 0, 0))
    out = images.fit(img, 50, "pad")
    assert tuple(out[0, 0]) == images.PAD_COLOR and tuple(out[25, 25]) == (255, 0, 0)


def test_crop_is_centre_crop():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # white centre third
    out = images.fit(Image.fromarray(arr), 20, "crop")
    assert out.shape == (20, 20, 3) and out.min() >= 250


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def test_formats_and_guards():
    spec = images.ImageSpec(size=16, max_pixels=10_000)
    for fmt in ("JPEG", "PNG", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 100, 50)).save(buf, fmt)
        assert images.load_image(buf.getvalue(), f"x.{fmt.lower()}", spec).shape == (16, 16, 3)
    with pytest.raises(images.ImageError) as e:
        images.load_image(_png(200, 200), "big.png", spec)
    assert e.value.reason == "image_too_large"
    with pytest.raises(images.ImageError) as e:
        images.load_image(_png(50, 50)[:60], "cut.png", spec)
    assert e.value.reason == "corrupt_image"
    with pytest.raises(images.ImageError) as e:
        images.load_image(b"not an image at all", "x.jpg", spec)
    assert e.value.reason == "corrupt_image"


DICOM = find_dicom_files()


@pytest.mark.parametrize("name, modality_shape", [
    ("CT_small.dcm", (128, 128)), ("693_UNCI.dcm", (512, 512)),  # CT, rescale slope/intercept
    ("MR_small.dcm", (64, 64)), ("MR2_UNCR.dcm", (1024, 1024)),  # MR
    ("RG1_UNCR.dcm", (1955, 1841)), ("RG3_UNCI.dcm", (1760, 1760)),  # CR, MONOCHROME1
    ("US1_UNCR.dcm", (480, 640)), ("OBXXXX1A.dcm", (600, 800)),  # US: RGB and palette
    ("emri_small.dcm", (64, 64)), ("OBXXXX1A_2frame.dcm", (600, 800)),  # multi-frame
    ("JPEG2000.dcm", (1024, 256)),  # NM, compressed
    ("JPEG-LL.dcm", (1024, 256)), ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024)),  # JPEG Lossless
])
def test_dicom_decodes_to_rgb(name, modality_shape):
    rgb = dicom_to_rgb(Path(DICOM[name]).read_bytes(), 10**8)
    assert rgb.dtype == np.uint8 and rgb.shape == (*modality_shape, 3)
    assert rgb.std() > 5  # a real picture, not a flat frame


def test_monochrome1_is_inverted():
    """A chest radiograph stored as MONOCHROME1: after inversion the body is bright."""
    import pydicom

    path = DICOM["RG1_UNCR.dcm"]
    assert pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME1"
    rgb = dicom_to_rgb(Path(path).read_bytes(), 10**8)[..., 0].astype(float)
    h, w = rgb.shape
    centre = rgb[h // 3: 2 * h // 3, w // 3: 2 * w // 3].mean()
    corner = np.concatenate([rgb[:50, :50].ravel(), rgb[:50, -50:].ravel()]).mean()
    assert centre > corner + 40  # the mediastinum is brighter than the air outside


def _voi_reference(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2, written out piece by piece, onto 0..255."""
    if function == "SIGMOID":
        return 255 / (1 + np.exp(-4 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, ((x - c) / w + 0.5) * 255))
    below, above = x <= c - 0.5 - (w - 1) / 2, x > c - 0.5 + (w - 1) / 2
    return np.where(below, 0, np.where(above, 255, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_stored_window_is_the_standard_voi_transform(function):
    """MR_small's window (600/1600) starts below its darkest value: no stretch may follow it."""
    import io

    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(DICOM["MR_small.dcm"])
    if function != "LINEAR":
        ds.VOILUTFunction = function
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    buf = io.BytesIO()
    ds.save_as(buf)
    ours = dicom_to_rgb(buf.getvalue(), 10**8)[..., 0].astype(float)
    x = apply_modality_lut(ds.pixel_array, ds).astype(float)
    assert np.abs(ours - _voi_reference(x, c, w, function)).max() <= 0.5 + 1e-6
    assert ours.min() > 40  # the darkest pixel (127) sits ~20% into the window, not at black


@pytest.mark.parametrize("center,width", [("100", "0"), ("abc", "200"), ("100", "")])
def test_invalid_stored_window_falls_back_to_percentiles(center, width):
    """A zero window width (seen in real exports), or a window that is not a number (it was
    a 400 corrupt_image), must not cost the image."""
    import io

    import pydicom

    ds = pydicom.dcmread(DICOM["MR_small.dcm"])
    ds.WindowCenter, ds.WindowWidth = 100, 0
    ds.add_new("WindowCenter", "LO", center)  # as text: pydicom refuses to write "abc" as a number
    ds.add_new("WindowWidth", "LO", width)
    buf = io.BytesIO()
    ds.save_as(buf)
    rgb = dicom_to_rgb(buf.getvalue(), 10**8)
    assert rgb.shape == (64, 64, 3) and rgb.std() > 5


def test_dicom_guards():
    data = Path(DICOM["RG1_UNCR.dcm"]).read_bytes()
    with pytest.raises(images.ImageError) as e:
        dicom_to_rgb(data, max_pixels=1000)
    assert e.value.reason == "image_too_large"
    with pytest.raises(images.ImageError) as e:
        dicom_to_rgb(data[:5000], max_pixels=10**8)
    assert e.value.reason == "corrupt_image"


# Memory bombs: small files describing images whose decode or canvas would fill the host.
# Every size check reads the header only (serving and preprocessing share these paths).

def test_an_image_over_pillows_own_bomb_limit_is_too_large_not_corrupt():
    with pytest.raises(images.ImageError) as e:
        images.load_image(png_header(20000, 20000), "x.png", images.ImageSpec())
    assert e.value.reason == "image_too_large"


def test_a_thin_image_whose_padded_canvas_is_a_bomb_is_rejected_from_its_header():
    """100000 x 1 is 1e5 pixels, but the pad band around it would be ~3.6e8."""
    spec = images.ImageSpec(size=336, aspect="pad", max_pixels=10**6)
    with pytest.raises(images.ImageError) as e:
        images.load_image(png_header(100_000, 1), "x.png", spec)
    assert e.value.reason == "image_too_large" and "canvas" in e.value.detail


def scan_bomb(w: int, h: int, extra: int) -> bytes:
    """A flat progressive JPEG with its last scan repeated ``extra`` times before EOI: every
    scan is a pass over the whole image (7000x7000 with 400: 21 s of decode in 222 KB)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), 128).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data[data.rindex(b"\xff\xda"):-2]
    return data[:-2] + last * extra + b"\xff\xd9"


def test_a_jpeg_of_countless_scans_is_refused_before_it_is_decoded():
    spec = images.ImageSpec(size=32)
    assert images.load_image(scan_bomb(256, 256, 0), "ok.jpg", spec).shape == (32, 32, 3)  # 10 scans
    assert images.load_image(scan_bomb(256, 256, 54), "ok.jpg", spec).shape == (32, 32, 3)  # 64: the limit
    with pytest.raises(images.ImageError) as e:  # load_image: preprocessing's path (serving's: test_hostile)
        images.load_image(scan_bomb(256, 256, 400), "bomb.jpg", spec)
    assert e.value.reason == "too_many_scans" and "410 scans" in e.value.detail
    buf = io.BytesIO()  # metadata is skipped by its length, as the decoder skips it: no false scans
    Image.new("RGB", (64, 64)).save(buf, "JPEG", progressive=True, comment=b"\xff\xda" * 1000)
    assert images.load_image(buf.getvalue(), "comment.jpg", spec).shape == (32, 32, 3)


def test_crop_of_a_thin_image_resamples_only_the_kept_box():
    """An 82-byte 20000 x 1 PNG: resize-then-crop built a 6.7M x 336 image (2.5 GB)."""
    import subprocess
    import sys

    code = ("import io, resource\nfrom PIL import Image\nfrom medvl.data.images import ImageSpec, load_image\n"
            "b = io.BytesIO(); Image.new('L', (20000, 1), 200).save(b, 'PNG')\n"
            "r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "out = load_image(b.getvalue(), 'x.png', ImageSpec(336, 'crop'))\n"
            "print(out.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    shape, grown_mb = out.stdout.rsplit(" ", 1)
    assert shape == "(336, 336, 3)" and int(grown_mb) < 100, out.stdout + out.stderr


def test_a_multi_frame_dicom_decodes_its_first_frame_only():
    """Frames after the first are never decoded: here they are garbage, which decoding every
    frame (``ds.pixel_array``) fails on."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(DICOM["MR_small.dcm"])
    first = ds.pixel_array
    ds.NumberOfFrames = 8
    ds.compress(RLELossless, np.stack([first] * 8))
    frames = list(generate_frames(ds.PixelData, number_of_frames=8))
    ds.PixelData = encapsulate([frames[0]] + [b"\x00" * 64] * 7)
    buf = io.BytesIO()
    ds.save_as(buf)
    rgb = dicom_to_rgb(buf.getvalue(), 10**8)
    assert rgb.shape == first.shape + (3,) and rgb.std() > 5
