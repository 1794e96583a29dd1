"""docs/web-page.png: the chat page with a DICOM and an answer, taken with the browser test's
headless Chromium against a real Serve app.

    python tests/serving/web_screenshot.py --model runs/demo/model \
        --image runs/demo/demo-data/images/explicit_VR-UN.dcm --out docs/web-page.png

It starts a Ray of its own (never joins another) on free ports, serves ``--model`` with an API
key, asks ``--question`` (and ``--follow-up``) through the page, and saves the screenshot.
"""

import argparse
import os
import tempfile

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from medvl.serving.api import ServeConfig
from tests.conftest import free_port
from tests.serving.conftest import chromium, serving

KEY = "sk-medvl-screenshot"


def ask(driver, question: str) -> None:
    """Type ``question``, send it with Enter, wait for its answer to end."""
    box = driver.find_element(By.ID, "question")
    box.send_keys(question, Keys.ENTER)
    WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
                                     .get_attribute("data-done") == "true")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--question", default="这是什么检查？")
    p.add_argument("--follow-up", default="这张图像的检查方式是什么？选项：CT、磁共振、X线、超声")
    p.add_argument("--out", default="docs/web-page.png")
    args = p.parse_args()
    import ray

    tmp = tempfile.mkdtemp(prefix="medvl-shot-")
    ray.init(address="local", _temp_dir=tmp, include_dashboard=False, num_cpus=2,
             _node_ip_address="127.0.0.1", object_store_memory=200_000_000, dashboard_port=free_port())
    keys = os.path.join(tmp, "keys.txt")  # a file: the replicas do not see this process's env
    with open(keys, "w") as f:
        f.write(KEY + "\n")
    server = serving(ServeConfig(model=os.path.abspath(args.model), api_key_file=keys, max_tokens_cap=64))
    url = next(server)
    driver = chromium(os.path.join(tmp, "chromium"))
    try:
        driver.get(f"{url}/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "file").send_keys(os.path.abspath(args.image))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Image ready"))
        ask(driver, args.question)
        if args.follow_up:
            ask(driver, args.follow_up)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        next(server, None)  # Serve down
        ray.shutdown()


if __name__ == "__main__":
    main()
