"""The chat web page the HTTP front serves at ``/``: three static files shipped with the
package (``web/``), no framework, no CDN, so it works on an air-gapped network.

The page holds no data: it may be fetched without a key. Everything it does goes through
the same ``/v1`` calls a client makes (keys, limits, image checks), so it behaves alike
behind ``backend: medvl`` and ``backend: vllm``.
"""

from __future__ import annotations

import html
import io
from importlib import resources

import numpy as np

# Scripts and styles from this origin only (no inline script), images also from the blob:
# URL of a preview; nothing may frame the page or receive its address.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _read(name: str) -> bytes:
    return (resources.files("medvl.serving") / "web" / name).read_bytes()


ASSETS = {name: (_read(name), media) for name, media in MEDIA.items()}  # a few KB, read once


def render(model_name: str, needs_key: bool, max_tokens: int) -> bytes:
    """``index.html`` with what the page must know of this server: the model id its requests
    name, whether it shows the key field, and the ``max_tokens`` cap."""
    text = _read("index.html").decode()
    for name, value in (("model", model_name), ("needs_key", "yes" if needs_key else "no"),
                        ("max_tokens", str(max_tokens))):
        text = text.replace("{{" + name + "}}", html.escape(value))
    return text.encode()


def png(pixels: np.ndarray) -> bytes:
    """The model's input image (uint8 HxWx3) as a PNG, for the page's preview."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()
