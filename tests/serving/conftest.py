"""A tiny LLaVA taught one Chinese answer, served by the real Serve app on 127.0.0.1."""

import base64
import time

import numpy as np
import pytest
import requests
import torch

from medvl.data import templates
from medvl.data.images import ImageSpec, load_image, normalize
from medvl.data.tokenize import encode_turns
from medvl.model.build import build_tiny
from medvl.serving.engine import write_meta
from medvl.train.export import save_hf
from tests.conftest import free_port

QUESTION = "这是什么检查？"
ANSWER = "罕见字：龘靐齉，胸部X线。"  # rare characters: split across byte-level tokens
API_KEY = "sk-medvl-test"


def teach(tok, steps: int = 150):
    """Overfit a tiny model on one (image, question) -> ANSWER pair, so greedy output is known."""
    model = build_tiny(tok).train()
    enc = encode_turns([(f"<image>\n{QUESTION}", ANSWER)], templates.get("v1"), tok, model.config.image_seq_length)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    png = base64.b64decode(png_data_uri().split(",", 1)[1])  # the image the tests send
    pixels = torch.from_numpy(normalize(load_image(png, "x.png", ImageSpec(size=32))))[None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def taught_model_dir(bpe_tokenizer, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("taught"))
    save_hf(teach(bpe_tokenizer), bpe_tokenizer, uri)
    write_meta(uri, template="v1", aspect="pad", image_size=32)
    return uri


@pytest.fixture(scope="module")
def server(ray_cluster, taught_model_dir, tmp_path_factory):
    """The Serve app with an API key file and small limits so each limit can be hit."""
    from medvl.serving.api import ServeConfig

    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text(API_KEY + "\n")
    cfg = ServeConfig(model=taught_model_dir, max_body_bytes=200_000, max_image_bytes=100_000,
                      max_image_pixels=1_000_000, max_prompt_tokens=200, max_tokens_cap=32,
                      api_key_file=str(keyfile), body_timeout_s=3)
    yield from serving(cfg)


def serving(cfg):
    """The Serve app for ``cfg`` on a free loopback port, healthy; yields its URL, then shuts
    Serve down (the body of a fixture: ``yield from serving(cfg)``)."""
    from ray import serve

    from medvl.serving.app import run_local

    port = free_port()
    run_local(cfg, port=port, blocking=False, options={"ray_actor_options": {"num_cpus": 0.5}})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url
    serve.shutdown()


def wait_healthy(url: str, timeout: float = 120) -> None:
    """Poll ``/healthz`` until it answers 200; fail here, not in a later test, if it never does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)  # also after a non-200 answer: no busy loop
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout:.0f} s")


def png_data_uri(size=(40, 30)) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's, `make setup-browser`
# Without the background-networking flags Chromium's own outbound connections fail noisily
# on a machine without internet (and the page must need none).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,860")


def chromium(profile_dir: str):
    """Headless Chromium with a fresh profile in ``profile_dir``, driven by its own
    chromedriver (Selenium Manager, which would download one, is not used)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
