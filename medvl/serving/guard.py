"""Who may use the endpoint, and how much of it: API keys, exposure, per-key slots, request ids.

The HTTP front (``medvl.serving.app``) applies these to every engine behind it, so the
same rules hold for ``backend: medvl`` and ``backend: vllm``.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import os
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from medvl.serving.api import APIError, ServeConfig

logger = logging.getLogger("ray.serve")  # a replica's lines land in its Serve log


def load_api_keys(cfg: ServeConfig) -> list[bytes]:
    """The keys from ``$api_keys_env`` and ``api_key_file``, as bytes: ``hmac.compare_digest``
    takes non-ASCII text only as bytes."""
    keys = {k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()}
    if cfg.api_key_file:
        with open(cfg.api_key_file, encoding="utf-8") as f:
            keys |= {line.strip() for line in f if line.strip()}
    return sorted(k.encode() for k in keys)


def key_of(authorization: str, keys: list[bytes]) -> bytes | None:
    """The caller's key if it is one of ``keys``. Every key is compared, each in constant
    time, so the answer's timing says nothing about how much of a key was right."""
    scheme, _, token = authorization.partition(" ")
    given = token.encode() if scheme.lower() == "bearer" else b""  # the scheme is case-insensitive (RFC 7235)
    found = None
    for key in keys:
        if hmac.compare_digest(given, key):
            found = key
    return found


def host_name(header: str) -> str:
    """The host a ``Host`` header names, without its port (``[::1]:8000`` -> ``::1``);
    ``""`` when it names none."""
    try:
        return urlsplit(f"//{header}").hostname or ""
    except ValueError:  # an unclosed IPv6 bracket
        return ""


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(cfg: ServeConfig, host: str, keys: list[bytes]) -> None:
    """Refuse (one line, ``ValueError``) to serve beyond loopback without API keys, unless the
    recipe says ``allow_anonymous: true``; then say so in the log."""
    if keys or is_loopback(host):
        return
    if not cfg.allow_anonymous:
        raise ValueError(f"refusing to serve on {host} without API keys: set ${cfg.api_keys_env} or "
                         "api_key_file, bind 127.0.0.1, or set allow_anonymous: true")
    logger.warning("serving on %s WITHOUT API keys (allow_anonymous: true): anyone who reaches it may use it",
                   host)


class Busy(APIError):
    """A 429 that tells the client when to retry."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(429, message, code="too_many_concurrent_requests")
        self.headers = {"Retry-After": str(retry_after_s)}


class KeySlots:
    """Requests in flight per API key on one front replica, so that one key cannot take every
    slot of ``max_ongoing_requests``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.busy: collections.Counter[bytes] = collections.Counter()

    def take(self, key: bytes) -> Callable[[], None]:
        """A slot for ``key`` (``Busy`` when it has ``limit``); the returned function gives it
        back, once however often it is called."""
        if self.busy[key] >= self.limit:
            raise Busy(f"this API key already has {self.limit} requests in flight; retry when one ends")
        self.busy[key] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.busy[key] -= 1
                if not self.busy[key]:
                    del self.busy[key]

        return release


def request_id() -> str:
    """The id Serve's proxy gave this request (its ``x-request-id`` response header and the
    Serve logs carry the same one), or a fresh one outside a request."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or uuid.uuid4().hex
