"""Request limits: the body guard (size, pace, memory) and the mapping of errors to HTTP statuses.

The size guard is plain ASGI middleware rather than a check inside the routes because FastAPI
parses (and spools to disk) the whole multipart body before a route runs: by then a 2 GB
upload would already have been read. Here a declared Content-Length over the limit is refused
before a single body byte is read, and a streamed (chunked) body is cut off as soon as it
passes the limit.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waldo.data.images import ImageLoadError

__all__ = ["BodySizeLimit", "image_error_status", "too_large_detail"]


def too_large_detail(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes ({limit / 1024 / 1024:.1f} MB)"


class BodySizeLimit:
    """Bound every request body: its size, how slowly it may arrive, and how much memory all
    bodies being received may hold together.

    * A declared Content-Length over ``max_body_bytes`` gets 413 before a byte is read; a
      streamed (chunked) body is cut off with 413 as soon as it passes the limit.
    * A body must keep arriving: no bytes for ``idle_timeout`` seconds, or not complete after
      ``total_timeout`` seconds, gets 408 and the connection is closed. Without this a client
      that sends headers and then one byte every few seconds holds its place for ever: sixteen
      such sockets used to lock every other client out.
    * At most ``max_inflight`` bodies are being received or processed at once, and together
      they may hold at most ``max_buffered_bytes`` in memory (uploads stay in memory, see
      ``create_app``); past either, 429 with Retry-After. The bytes are counted as they arrive,
      not as declared, so slow or lying clients reserve nothing they have not sent.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_inflight: int,
                 max_buffered_bytes: int | None = None, idle_timeout: float | None = None,
                 total_timeout: float | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self.max_buffered_bytes = max_buffered_bytes
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout
        # Only touched on the event loop's thread: no lock needed.
        self.inflight = 0
        self.buffered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send_json(send, 413, too_large_detail(self.max_body_bytes))
            return
        if self.inflight >= self.max_inflight:
            # Retry-After tells well-behaved clients to back off instead of retrying at once.
            await _send_json(send, 429, f"too many uploads in progress (limit {self.max_inflight}); retry shortly",
                             extra_headers=[(b"retry-after", b"1")])
            return
        self.inflight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        loop = asyncio.get_running_loop()
        deadline = None if self.total_timeout is None else loop.time() + self.total_timeout
        body_done = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body: only the disconnect message is left
            wait = self.idle_timeout
            if deadline is not None:
                left = deadline - loop.time()
                wait = left if wait is None else min(wait, left)
            try:
                if wait is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:
                slow = deadline is not None and loop.time() >= deadline
                raise HTTPException(status_code=408, headers={"connection": "close"}, detail=(
                    f"request body too slow: not complete after {self.total_timeout:g} s" if slow else
                    f"request body stalled: no data for {self.idle_timeout:g} s")) from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if received > self.max_body_bytes:
                    # FastAPI re-raises HTTPExceptions from body parsing (others become a
                    # generic 400), so the client gets this exact status and message.
                    raise HTTPException(status_code=413, detail=too_large_detail(self.max_body_bytes))
                if self.max_buffered_bytes is not None and self.buffered + chunk > self.max_buffered_bytes:
                    raise HTTPException(status_code=429, headers={"retry-after": "1"}, detail=(
                        f"too many upload bytes in memory at once (limit {self.max_buffered_bytes} bytes); "
                        f"retry shortly"))
                self.buffered += chunk
                counted.append(chunk)
                body_done = not message.get("more_body", False)
            return message

        counted: list[int] = []
        try:
            await self.app(scope, guarded_receive, send)
        finally:
            self.buffered -= sum(counted)


def _has_body(scope: Scope) -> bool:
    """Whether the request declares a body (a length above 0, or chunked transfer)."""
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def _content_length(scope: Scope) -> int | None:
    """The declared body length, or None when absent; a malformed value counts as absent
    (the server's HTTP parser rejects those itself)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, detail: str,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),  # the unread body makes the connection unusable
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


def image_error_status(error: ImageLoadError) -> int:
    """The HTTP status for an upload that :func:`waldo.data.images.load_image` refused.

    413 for too many pixels (a decompression bomb or simply a huge image), too many JPEG scans
    (a scan bomb) or more decode memory than the server's whole budget; 415 for bytes that are
    not an image in a supported format (arithmetic-coded and hierarchical JPEGs included); 400
    for an image that is corrupt, truncated or too elongated to be a photo.
    """
    reason = error.reason
    if "pixels" in reason and ("exceeds the limit" in reason or "too many" in reason):
        return 413
    if "exceeds the decode memory limit" in reason or "scans (the limit" in reason:
        return 413  # too much work for this server, like too many pixels
    if reason.startswith("not a recognised image format") or "is not supported (SOF" in reason:
        return 415
    return 400
