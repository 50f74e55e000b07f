"""Route dependencies: the shared service and the query slots, both created in the lifespan."""

from __future__ import annotations

import asyncio

from fastapi import Request

from waldo.serve.service import SearchService


def get_service(request: Request) -> SearchService:
    """The one SearchService of this app (its model was loaded once, at start-up)."""
    return request.app.state.service


def get_slots(request: Request) -> asyncio.Semaphore:
    """Bounds how many requests run the model at once. An asyncio semaphore, so a waiting
    query holds no worker thread (thumbnails and health checks keep flowing under load)."""
    return request.app.state.query_slots
