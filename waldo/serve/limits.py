"""Request limits: the body-size guard and the mapping of image errors to HTTP statuses.

The size guard is plain ASGI middleware rather than a check inside the routes because FastAPI
parses (and spools to disk) the whole multipart body before a route runs: by then a 2 GB
upload would already have been read. Here a declared Content-Length over the limit is refused
before a single body byte is read, and a streamed (chunked) body is cut off as soon as it
passes the limit.
"""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waldo.data.images import ImageLoadError

__all__ = ["BodySizeLimit", "image_error_status", "too_large_detail"]


def too_large_detail(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes ({limit / 1024 / 1024:.1f} MB)"


class BodySizeLimit:
    """Refuse request bodies over ``max_body_bytes`` with 413, without buffering them, and
    more than ``max_inflight`` bodies at once with 429.

    Uploads are kept in memory (see ``create_app``: spooling them to the system's temporary
    folder would write outside the index folder), so the in-flight cap is what bounds the
    memory a crowd of large uploads can take: about ``max_inflight * max_body_bytes``.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_inflight: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self.inflight = 0  # only touched on the event loop thread: no lock needed

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

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # FastAPI re-raises HTTPExceptions from body parsing (others become a
                    # generic 400), so the client gets this exact status and message.
                    raise HTTPException(status_code=413, detail=too_large_detail(self.max_body_bytes))
            return message

        await self.app(scope, counting_receive, send)


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

    413 for too many pixels (a decompression bomb or simply a huge image), 415 for bytes that
    are not an image in a supported format, 400 for an image that is corrupt or truncated.
    """
    reason = error.reason
    if "pixels" in reason and ("exceeds the limit" in reason or "too many" in reason):
        return 413
    if reason.startswith("not a recognised image format"):
        return 415
    return 400
