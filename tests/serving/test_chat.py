"""`medvl chat`: one question about one image, streamed, in this process (no Ray, no server)."""

import base64
import subprocess
import sys

from tests.serving.conftest import ANSWER, QUESTION, png_data_uri


def chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvl.cli", "chat", *args], capture_output=True, text=True,
                          timeout=300)


def test_chat_answers_as_the_endpoint_would(taught_model_dir, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(base64.b64decode(png_data_uri().split(",", 1)[1]))  # the image the model was taught
    r = chat("--model", taught_model_dir, "--image", str(image), QUESTION)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == ANSWER + "\n"


def test_chat_reads_dicom(taught_model_dir, demo_dir):
    dicom = next((demo_dir / "images").glob("*.dcm"))
    r = chat("--model", taught_model_dir, "--image", str(dicom), "这是什么检查？", "--max-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]


def test_chat_mistakes_are_one_line(taught_model_dir, tmp_path):
    for args, words in [(["--model", str(tmp_path), "问"], "not an exported model directory"),
                        (["--model", taught_model_dir, "--image", str(tmp_path / "none.png"), "问"], "no such image"),
                        (["--model", taught_model_dir, "--image", __file__, "问"], "corrupt_image")]:
        r = chat(*args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
