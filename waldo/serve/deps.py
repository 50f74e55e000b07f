"""Route dependencies: the shared service and the query slots, both created in the lifespan,
and the API-key check of the write endpoints."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from waldo.serve.errors import ClientError
from waldo.serve.service import SearchService


def get_service(request: Request) -> SearchService:
    """The one SearchService of this app (its model was loaded once, at start-up)."""
    return request.app.state.service


def get_slots(request: Request) -> asyncio.Semaphore:
    """Bounds how many requests run the model at once. An asyncio semaphore, so a waiting
    query holds no worker thread (thumbnails and health checks keep flowing under load)."""
    return request.app.state.query_slots


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
