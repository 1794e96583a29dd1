"""The chat page (issue #33) in real headless Chromium, against the real Serve app on
127.0.0.1: a DICOM is previewed as the model sees it, an answer streams in, stop stops it,
a second turn follows, and the API's 401 and 413 reach the page in the API's words.

The model is a random tiny one with a long position range, so an answer decodes for seconds
(as in test_failures.py): long enough to be stopped mid-stream.
"""

import base64
import io
import os
import time

import numpy as np
import pytest
import requests

from medvl.model.build import build_tiny
from medvl.serving.api import ServeConfig
from medvl.serving.engine import Preparer, write_meta
from medvl.train.export import save_hf
from tests.serving.conftest import API_KEY, CHROMEDRIVER, CHROMIUM, chromium, serving

pytestmark = pytest.mark.slow  # starts Serve and Chromium: not in `make test-fast`

N = 3000  # max tokens: seconds of decoding on 2 cores
BODY_LIMIT = 200_000


@pytest.fixture(scope="module")
def web_model(bpe_tokenizer, tmp_path_factory) -> str:
    model = build_tiny(bpe_tokenizer, seed=0)
    model.config.text_config.max_position_embeddings = N + 512  # RoPE positions are computed, not learned
    uri = str(tmp_path_factory.mktemp("web-model"))
    save_hf(model, bpe_tokenizer, uri)
    write_meta(uri, template="v1", aspect="pad", image_size=32)
    return uri


@pytest.fixture(scope="module")
def web_server(ray_cluster, web_model, tmp_path_factory):
    uri = web_model
    keyfile = tmp_path_factory.mktemp("web-keys") / "keys.txt"
    keyfile.write_text(API_KEY + "\n")
    yield from serving(ServeConfig(model=uri, max_tokens_cap=N, max_body_bytes=BODY_LIMIT, api_key_file=str(keyfile)))


@pytest.fixture(scope="module")
def dicom() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by its own chromedriver: missing, the test fails (CI must not
    lose it silently); `make test` installs both."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make setup-browser` installs them")
    driver = chromium(str(tmp_path_factory.mktemp("chromium")))
    yield driver
    driver.quit()


def open_page(browser, url: str, key: str = API_KEY) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/")
    browser.find_element(By.ID, "key").send_keys(key)


def wait(browser, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda _: condition())


def element(browser, id_: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, id_)


def status(browser) -> str:
    return element(browser, "status").text


def answers(browser) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")


def ask(browser, question: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = element(browser, "question")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)  # Enter sends


def test_page_needs_no_key_and_sets_its_headers(web_server):
    r = requests.get(f"{web_server}/", timeout=30)
    assert r.status_code == 200 and 'data-needs-key="yes"' in r.text and f'data-max-tokens="{N}"' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    js = requests.get(f"{web_server}/web/app.js", timeout=30)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "http" not in js.text and "http" not in r.text  # no CDN, nothing remote
    missing = requests.get(f"{web_server}/web/../app.py", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()


def test_preview_is_the_models_input(web_server, web_model, dicom):
    """The preview endpoint answers the pixels the chat endpoint would give the model, and
    only to a caller with a key."""
    from PIL import Image

    with open(dicom, "rb") as f:
        raw = f.read()
    body = {"image_url": {"url": "data:application/dicom;base64," + base64.b64encode(raw).decode()}}
    assert requests.post(f"{web_server}/v1/images/preview", json=body, timeout=30).status_code == 401
    r = requests.post(f"{web_server}/v1/images/preview", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(r.content)))
    expected = Preparer(web_model).pixels(raw, "upload.dcm", 50_000_000, False)
    assert shown.shape == expected.shape == (32, 32, 3) and (shown == expected).all()


def test_dicom_question_streams_stops_and_goes_on(web_server, browser, dicom):
    """Upload a DICOM (previewed at the model's input size), ask with Enter: the answer grows
    in several updates; Stop ends it (the page says so, it grows no more and the server stops
    decoding); a second question continues the same conversation."""
    open_page(browser, web_server)
    element(browser, "file").send_keys(dicom)
    wait(browser, lambda: status(browser) == "Image ready: ask a question.")
    assert "32×32" in element(browser, "caption").text
    ask(browser, "这是什么检查？")
    wait(browser, lambda: answers(browser) and int(answers(browser)[-1].get_attribute("data-updates")) >= 2)
    answer = answers(browser)[-1]
    assert answer.get_attribute("data-done") is None and answer.text  # streaming: updates before the end
    element(browser, "stop").click()
    wait(browser, lambda: answer.get_attribute("data-done") == "true")
    assert status(browser) == "Stopped."
    stopped = answer.text
    wait(browser, lambda: requests.get(f"{web_server}/healthz", timeout=30).json()["decoding"] == 0, timeout=10)
    time.sleep(0.5)
    assert answer.text == stopped and len(stopped) < N  # no more deltas after Stop
    box = element(browser, "max-tokens")
    box.clear()
    box.send_keys("3")
    ask(browser, "What does it show?")
    wait(browser, lambda: len(answers(browser)) == 2 and answers(browser)[-1].get_attribute("data-done") == "true")
    assert status(browser) == "Done: the answer reached max tokens.", status(browser)
    assert [m.text for m in browser.find_elements("css selector", "#log .msg.user")] == [
        "这是什么检查？", "What does it show?"]


def test_wrong_key_shows_the_apis_401(web_server, browser, dicom):
    open_page(browser, web_server, key="sk-wrong")
    element(browser, "file").send_keys(dicom)
    wait(browser, lambda: status(browser).startswith("401"))
    assert status(browser) == "401: missing or invalid API key: send `Authorization: Bearer <key>`"


def test_over_limit_file_shows_the_apis_413(web_server, browser, tmp_path):
    big = tmp_path / "big.dcm"
    big.write_bytes(os.urandom(BODY_LIMIT))  # its base64 data URL is 4/3 of the limit
    open_page(browser, web_server)
    element(browser, "file").send_keys(str(big))
    wait(browser, lambda: status(browser).startswith("413"))
    assert status(browser) == f"413: request body larger than {BODY_LIMIT} bytes"
