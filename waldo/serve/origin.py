"""Host and Origin checks: a page on another site must not be able to use this server.

Two attacks matter for a service bound to loopback on someone's laptop:

* **DNS rebinding.** A page on ``evil.example`` re-points its own name at 127.0.0.1; the
  browser then treats this server as same-origin with the page and lets it read /stats and
  search results. The request still carries ``Host: evil.example:8000``, so refusing hosts
  that are not this server's names (400, like Django's ``ALLOWED_HOSTS``) defeats it.
* **Cross-site writes.** A plain multipart POST needs no CORS preflight: any page the user
  visits could add images (201) or delete them. Browsers send ``Origin`` (and
  ``Sec-Fetch-Site``) on such requests, so unsafe methods whose origin is another site get 403.
  Requests without ``Origin`` (curl, scripts, the CLI) are not from a browser page and pass.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["LOOPBACK_HOSTS", "HostOriginGuard", "default_allowed_hosts", "host_name"]

#: Names a loopback-bound server answers to by default.
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """What ``waldo serve --host BIND`` allows when no host list is configured: the loopback
    names for a loopback binding (nothing else can reach it legitimately), any host otherwise
    (a server on a network address is reached under names only its operator knows)."""
    host = bind_host.strip("[]").lower()
    if host in LOOPBACK_HOSTS or host.startswith("127."):
        return (*LOOPBACK_HOSTS, host) if host not in LOOPBACK_HOSTS else LOOPBACK_HOSTS
    return ("*",)


def host_name(value: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``; lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # a bare IPv6 address or a name without port


class HostOriginGuard:
    """ASGI middleware: 400 for a ``Host`` outside ``allowed_hosts``, 403 for an unsafe method
    whose ``Origin`` is another site. ``allowed_hosts`` may hold ``*`` (any host; then an
    origin must match the request's own ``Host``)."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed = {host.lower().strip("[]") for host in allowed_hosts if host != "*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
        host_header = headers.get("host", "")
        if not self.any_host and host_name(host_header) not in self.allowed:
            await _refuse(send, 400, f"invalid Host header {host_header[:100]!r}: this server answers to "
                                     f"{', '.join(sorted(self.allowed))} (set --allowed-host to add a name)")
            return
        if scope.get("method", "GET") not in _SAFE_METHODS and not self._same_site(headers, host_header):
            await _refuse(send, 403, "cross-site request refused: a page on another site may not change this "
                                     "index (the Origin header names another host)")
            return
        await self.app(scope, receive, send)

    def _same_site(self, headers: dict[str, str], host_header: str) -> bool:
        origin = headers.get("origin")
        if origin is None:
            # No Origin: not a browser page's request (or a very old browser); fall back on
            # Fetch Metadata, which every current browser sends.
            return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
        if origin == "null":
            return False  # sandboxed frames, data: URLs, file: pages
        origin_host = urlsplit(origin).netloc.lower()
        if self.any_host:
            return origin_host == host_header.strip().lower()
        return host_name(origin_host) in self.allowed


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
