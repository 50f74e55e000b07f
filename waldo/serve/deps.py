"""Route dependencies: the shared service and the query slots, both created in the lifespan,
and the API-key check of the write endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from waldo.index.errors import IndexBusyError
from waldo.serve.errors import ClientError
from waldo.serve.service import SearchService


def get_service(request: Request) -> SearchService:
    """The one SearchService of this app (its model was loaded once, at start-up)."""
    return request.app.state.service


def get_slots(request: Request) -> asyncio.Semaphore:
    """Bounds how many requests run the model at once. An asyncio semaphore, so a waiting
    query holds no worker thread (thumbnails and health checks keep flowing under load)."""
    return request.app.state.query_slots


@contextlib.asynccontextmanager
async def _write_turn(slots: asyncio.Semaphore, wait: float) -> AsyncIterator[None]:
    try:
        await asyncio.wait_for(slots.acquire(), timeout=wait)
    except asyncio.TimeoutError:
        raise IndexBusyError(f"other writes to this index are queued; waited {wait:g} s") from None
    try:
        yield
    finally:
        slots.release()


def get_write_turn(request: Request) -> contextlib.AbstractAsyncContextManager[None]:
    """``async with turn:`` waits (holding no thread, at most ``write_wait_s``, then 503) for the
    one write that runs at a time. Writes never take a query slot: a write stuck behind another
    process's lock must not keep searches waiting."""
    return _write_turn(request.app.state.write_slots, request.app.state.settings.write_wait_s)


WriteTurn = Annotated[contextlib.AbstractAsyncContextManager[None], Depends(get_write_turn)]


# The header is declared through FastAPI's security helper so that /openapi.json documents it;
# auto_error=False because without a configured key the header is not needed at all.
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="needed by POST /images and DELETE /images/{id} when the "
                                          "server was started with --api-key (or WALDO_API_KEY)")


def require_write_key(request: Request, key: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
    """Refuse a write (401) unless the server has no key or the request carries the right one.

    Route dependencies are solved before the route's own parameters are validated, so a write
    without the key is refused whatever else is wrong with it. The comparison takes the same
    time wherever the strings differ (``hmac.compare_digest``): no timing side channel.
    """
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    if key is None:
        raise ClientError(401, "this server needs an API key for writes: send it in the X-API-Key header")
    if not hmac.compare_digest(key.encode(), expected.encode()):
        raise ClientError(401, "the X-API-Key header does not hold this server's API key")
