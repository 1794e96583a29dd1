"""Remote image URLs fetched without SSRF: only allow-listed ``host:port`` pairs, only
public addresses, the connection made to the very address that was checked, within one
deadline for the whole fetch.

Checking the name alone is not enough: an allow-listed name can resolve (or be re-resolved
between the check and the connect) to 169.254.169.254, 127.0.0.1 or an in-cluster service,
and a port left open lets a request reach any service on an allowed host. A per-socket
timeout lets a server that drips one byte every few seconds hold a front thread forever.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 5
READ_BYTES = 1 << 16


class FetchError(Exception):
    """Why a remote image was not fetched: an HTTP ``status`` and an OpenAI error ``code``."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def target(url: str, allowed: list[str]) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` when ``url`` is http(s) to an allow-listed ``host[:port]``
    (no port: the scheme's default), else None."""
    try:  # urlsplit refuses "http://[::1" and "http://a]b/"; .port a port out of range
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            return None
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return None
    for entry in allowed:
        try:
            listed = urlsplit(f"//{entry}")
            listed_port = listed.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:  # a malformed entry allows nothing
            continue
        if listed.hostname == parts.hostname and listed_port == port:
            return parts.scheme, parts.hostname, port
    return None


def _netloc(url: str) -> str:
    """``url``'s host and port for a message, which a malformed URL must not turn into a 500."""
    try:
        return urlsplit(url).netloc
    except ValueError:
        return "(malformed URL)"


def public_address(host: str, port: int, allow_private: bool) -> str:
    """One address ``host`` resolves to, if every one it resolves to may be reached: none
    private, loopback, link-local, multicast or reserved (unless ``allow_private``)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise FetchError(400, f"image_url host {host!r} does not resolve: {e}", "image_fetch_failed") from e
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        for ip in _carried(ipaddress.ip_address(address.split("%")[0])):
            if not allow_private and (not ip.is_global or ip.is_multicast):
                raise FetchError(400, f"image_url host {host!r} resolves to {ip}, a non-public address",
                                 "invalid_image_url")
    return addresses[0]


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: a gateway forwards to the last 32 bits


def _carried(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """``ip`` and the IPv4 address an IPv6 one hands on (mapped ``::ffff:127.0.0.1``, 6to4
    ``2002:a00:1::``, NAT64 ``64:ff9b::a9fe:a9fe``): the prefixes count as global, the
    IPv4 address behind them may be private or the metadata service."""
    if ip.version == 4:
        return [ip]
    if ip.ipv4_mapped:  # the IPv4 address itself, reached over an IPv6 socket
        return [ip.ipv4_mapped]
    carried = [ip.sixtofour, ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None]
    return [ip, *(v4 for v4 in carried if v4 is not None)]


class _Pinned(http.client.HTTPConnection):
    """HTTP to ``ip`` (checked), with ``host`` in the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    """HTTPS to ``ip`` (checked); the certificate is verified for ``host`` (SNI too)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _DeadlineIO(io.RawIOBase):
    """The socket's reads, each waiting only for what is left of the fetch's deadline."""

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float):
        super().__init__()
        self.sock, self.raw = sock, sock.makefile("rb", buffering=0)  # counted: close() waits for it
        self.deadline, self.timeout_s = deadline, timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        self.sock.settimeout(_left(self.deadline, self.timeout_s))
        return self.raw.readinto(b)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineSocket:
    """What the response reads through, status line and headers included: read under the
    connection's one timeout, a server dripping a header line at a time held the fetch (and
    a front thread) for as long as it liked."""

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float):
        self.sock, self.deadline, self.timeout_s = sock, deadline, timeout_s

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineIO(self.sock, self.deadline, self.timeout_s))


def fetch(url: str, allowed: list[str], limit: int, timeout_s: float, allow_private: bool = False) -> bytes:
    """GET ``url``'s bytes (at most ``limit``), following up to ``MAX_REDIRECTS`` redirects,
    each checked as the first; ``FetchError`` otherwise. ``timeout_s`` bounds the whole fetch."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        where = target(url, allowed)
        if where is None:
            raise FetchError(400, f"image_url {_netloc(url)!r} is not an allowed image host (host and port)",
                             "invalid_image_url")
        scheme, host, port = where
        ip = public_address(host, port, allow_private)
        conn = (_PinnedTLS if scheme == "https" else _Pinned)(host, port, ip, _left(deadline, timeout_s))
        conn.response_class = lambda sock, **kw: http.client.HTTPResponse(  # noqa: B023 - used in this turn
            _DeadlineSocket(sock, deadline, timeout_s), **kw)
        try:
            parts = urlsplit(url)
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                try:
                    url = urljoin(url, response.getheader("Location"))
                except ValueError as e:  # "http://[::1": urlsplit's refusal
                    raise FetchError(400, "image_url redirects to a malformed URL", "invalid_image_url") from e
                continue
            if response.status != 200:
                raise FetchError(400, f"image_url answered HTTP {response.status}", "image_fetch_failed")
            return _read(response, limit)
        except TimeoutError as e:  # every socket wait is what is left of the deadline
            raise FetchError(400, f"image_url not fetched within {timeout_s:g} s", "image_fetch_failed") from e
        except (OSError, http.client.HTTPException) as e:
            raise FetchError(400, f"image_url could not be fetched: {type(e).__name__}: {e}",
                             "image_fetch_failed") from e
        finally:
            conn.close()
    raise FetchError(400, f"image_url redirects more than {MAX_REDIRECTS} times", "image_fetch_failed")


def _read(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The body, refused once past ``limit`` (its reads are bounded by ``_DeadlineIO``)."""
    if int(response.getheader("Content-Length") or 0) > limit:
        raise FetchError(413, f"image larger than {limit} bytes", "image_too_large")
    body = bytearray()
    while True:
        part = response.read1(READ_BYTES)
        if not part:
            return bytes(body)
        body += part
        if len(body) > limit:
            raise FetchError(413, f"image larger than {limit} bytes", "image_too_large")


def _left(deadline: float, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(400, f"image_url not fetched within {timeout_s:g} s", "image_fetch_failed")
    return left
