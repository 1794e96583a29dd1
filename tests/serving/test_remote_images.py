"""Remote image URLs against a real HTTP server on 127.0.0.1: only allow-listed hosts, on
every redirect too, and a failed fetch is a 400, not a 500."""

import http.server
import threading

import pytest

from medvl.serving.api import APIError, ServeConfig, image_bytes
from tests.conftest import free_port


@pytest.fixture(scope="module")
def site():
    port = free_port()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/img.png":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\x89PNG fake")
            elif self.path == "/redirect":  # to the same server under a name not allowed
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/img.png")
                self.end_headers()
            elif self.path == "/redirect-allowed":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{port}/img.png")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


CFG = ServeConfig(allowed_image_hosts=["127.0.0.1"])


def test_allowed_host_and_redirects_within_the_allow_list(site):
    assert image_bytes(f"{site}/img.png", CFG)[0] == b"\x89PNG fake"
    assert image_bytes(f"{site}/redirect-allowed", CFG)[0] == b"\x89PNG fake"


def test_a_redirect_off_the_allow_list_is_refused(site):
    with pytest.raises(APIError) as e:
        image_bytes(f"{site}/redirect", CFG)
    assert e.value.status == 400 and "localhost" in e.value.message


@pytest.mark.parametrize("path", ["/missing", ":1/closed-port"])
def test_a_failed_fetch_is_a_400(site, path):
    url = f"{site}{path}" if path.startswith("/") else f"http://127.0.0.1{path}"
    with pytest.raises(APIError) as e:
        image_bytes(url, CFG)
    assert e.value.status == 400 and e.value.code == "image_fetch_failed"


def test_a_host_off_the_allow_list_is_refused_without_a_request():
    with pytest.raises(APIError) as e:
        image_bytes("http://169.254.169.254/latest/meta-data", CFG)
    assert e.value.status == 400
