"""Remote image URLs against a real HTTP server on 127.0.0.1: only allow-listed host:port
pairs at public addresses (loopback only where the config allows it explicitly), on every
redirect too, within one deadline; a failed fetch is a 400, not a 500."""

import time
from dataclasses import dataclass, field

import pytest

from medvl.serving import remote
from medvl.serving.api import APIError, ServeConfig, image_bytes
from tests.conftest import QuietHandler, free_port, http_server


@dataclass
class Site:
    url: str
    port: int
    hosts: list[str] = field(default_factory=list)  # the Host header of every request served


@pytest.fixture(scope="module")
def site():
    port = free_port()
    site = Site(f"http://127.0.0.1:{port}", port)

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            site.hosts.append(self.headers["Host"])
            if self.path == "/drip":  # one byte every 0.25 s: each read is quick, the whole is not
                self.send_response(200)
                self.send_header("Content-Length", "20")
                self.end_headers()
                try:
                    for _ in range(20):
                        self.wfile.write(b"x")
                        time.sleep(0.25)
                except ConnectionError:  # the client gave up, as it should
                    pass
            elif self.path == "/drip-headers":  # a header line every 0.25 s, before any body
                self.send_response_only(200)
                self.flush_headers()
                try:
                    for i in range(20):
                        self.wfile.write(f"X-Drip-{i}: x\r\n".encode())
                        self.wfile.flush()
                        time.sleep(0.25)
                except ConnectionError:
                    pass
            elif self.path == "/img.png":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\x89PNG fake")
            elif self.path == "/redirect":  # to the same server under a name not allowed
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/img.png")
                self.end_headers()
            elif self.path == "/redirect-malformed":
                self.send_response(302)
                self.send_header("Location", "http://[::1/img.png")
                self.end_headers()
            elif self.path == "/redirect-allowed":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{port}/img.png")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

    with http_server(port, Handler):
        yield site


def _cfg(*hosts: str, **kw) -> ServeConfig:
    return ServeConfig(allowed_image_hosts=list(hosts), allow_private_image_hosts=True, **kw)


def test_allowed_host_and_redirects_within_the_allow_list(site):
    cfg = _cfg(f"127.0.0.1:{site.port}")
    assert image_bytes(f"{site.url}/img.png", cfg)[0] == b"\x89PNG fake"
    assert image_bytes(f"{site.url}/redirect-allowed", cfg)[0] == b"\x89PNG fake"


def test_a_redirect_off_the_allow_list_is_refused(site):
    with pytest.raises(APIError) as e:
        image_bytes(f"{site.url}/redirect", _cfg(f"127.0.0.1:{site.port}"))
    assert e.value.status == 400 and "localhost" in e.value.message


@pytest.mark.parametrize("path", ["/missing", ":1/closed-port"])
def test_a_failed_fetch_is_a_400(site, path):
    url = f"{site.url}{path}" if path.startswith("/") else f"http://127.0.0.1{path}"
    with pytest.raises(APIError) as e:
        image_bytes(url, _cfg(f"127.0.0.1:{site.port}", "127.0.0.1:1"))
    assert e.value.status == 400 and e.value.code == "image_fetch_failed"


def test_a_host_off_the_allow_list_is_refused_without_a_request():
    with pytest.raises(APIError) as e:
        image_bytes("http://169.254.169.254/latest/meta-data", _cfg("127.0.0.1"))
    assert e.value.status == 400


def test_the_allow_list_matches_the_port_too(site):
    """An allowed host on any port reached every service on it; no port means the scheme's."""
    served = len(site.hosts)
    with pytest.raises(APIError) as e:
        image_bytes(f"{site.url}/img.png", _cfg("127.0.0.1"))
    assert e.value.status == 400 and e.value.code == "invalid_image_url" and len(site.hosts) == served
    assert remote.target("https://pacs.example/x.png", ["pacs.example"]) == ("https", "pacs.example", 443)
    assert remote.target("http://pacs.example:8042/x.png", ["pacs.example"]) is None
    assert remote.target("http://pacs.example:8042/x.png", ["pacs.example:x", "pacs.example:8042"])


def test_an_allowed_name_that_resolves_to_loopback_is_refused(site):
    """The name was checked, not the address it resolves to: an allow-listed name pointing
    at 127.0.0.1 (or 169.254.169.254) reached it. The flag allows it for tests only, and the
    request then goes to the checked address with the name in its Host header."""
    name = f"localhost:{site.port}"
    strict = ServeConfig(allowed_image_hosts=[name])
    served = len(site.hosts)
    with pytest.raises(APIError) as e:
        image_bytes(f"http://{name}/img.png", strict)
    assert e.value.status == 400 and "non-public address" in e.value.message and len(site.hosts) == served
    assert image_bytes(f"http://{name}/img.png", _cfg(name))[0] == b"\x89PNG fake"
    assert site.hosts[-1] == name


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "224.0.0.1", "0.0.0.0",
                                     "240.0.0.1", "::1", "fe80::1", "::ffff:127.0.0.1", "100.64.0.1",
                                     "64:ff9b::a9fe:a9fe", "2002:a00:1::1"])  # NAT64, 6to4 to IPv4
def test_non_public_addresses_are_refused(address):
    with pytest.raises(remote.FetchError) as e:
        remote.public_address(address, 80, allow_private=False)
    assert e.value.code == "invalid_image_url"
    for public in ("93.184.215.14", "::ffff:93.184.215.14", "64:ff9b::5db8:d70e", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"):
        assert remote.public_address(public, 80, allow_private=False) == public


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_one_deadline_bounds_the_whole_fetch(site, path):
    """A 10 s timeout per socket read let a server that sends a byte every 0.25 s hold the
    fetch for as long as it liked (here 5 s; a real one, forever). The status line and
    headers too: they were read under the timeout left when the connection opened, per read."""
    start = time.monotonic()
    with pytest.raises(APIError) as e:
        image_bytes(f"{site.url}{path}", _cfg(f"127.0.0.1:{site.port}", image_fetch_timeout_s=1.0))
    assert e.value.status == 400 and "within 1 s" in e.value.message
    assert time.monotonic() - start < 4.0  # the drip lasts 5 s: cut short, with room for a loaded machine


MALFORMED = ["http://[::1", "https://[evil", "http://a]b/"]  # urlsplit raises ValueError on each


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_url_is_a_400_not_a_500(url):
    """urlsplit's ValueError went up uncaught: a 500 with a traceback at ERROR."""
    with pytest.raises(APIError) as e:
        image_bytes(url, _cfg("127.0.0.1", "[::1]"))
    assert e.value.status == 400 and e.value.code == "invalid_image_url"
    assert remote.target(url, ["[::1]"]) is None
    with pytest.raises(remote.FetchError) as f:  # called directly, fetch says so too
        remote.fetch(url, ["[::1]"], 100, 1.0)
    assert f.value.code == "invalid_image_url"


def test_a_redirect_to_a_malformed_url_and_a_malformed_allow_list_entry_are_refused(site):
    with pytest.raises(APIError) as e:
        image_bytes(f"{site.url}/redirect-malformed", _cfg(f"127.0.0.1:{site.port}"))
    assert e.value.status == 400 and e.value.code == "invalid_image_url"
    assert remote.target("http://pacs.example/x.png", ["[pacs.example", "pacs.example"])  # the bad entry allows nothing
