"""The search service: ``create_app(index_dir, settings)`` builds the FastAPI app.

This module only assembles: the lifespan loads the index and model once, the routers in
``routers/`` hold the endpoints, and the handlers below turn the service's typed errors into
4xx responses with a ``detail`` message, so nothing a client sends surfaces as a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waldo import __version__
from waldo.data.images import ImageLoadError
from waldo.index import UnknownIdError
from waldo.serve.errors import ClientError
from waldo.serve.limits import BodySizeLimit, image_error_status
from waldo.serve.routers import images, meta, search
from waldo.serve.service import SearchService
from waldo.serve.settings import STATIC_DIR, ServeSettings

__all__ = ["STATIC_DIR", "create_app"]

log = logging.getLogger("waldo.serve")

# Everything the page needs comes from this server: the policy makes a stray CDN reference
# fail loudly in the browser test instead of working only on machines with internet.
_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class _SecurityHeaders:
    """Adds nosniff (uploaded bytes are served back), the CSP and no-referrer to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"content-security-policy", _CSP.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(index_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The app for one index. Nothing loads here: the lifespan opens the index and model when
    the server starts, so importing or building the app stays cheap."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await asyncio.to_thread(SearchService.open, index_dir, settings)
        app.state.service = service
        app.state.query_slots = asyncio.Semaphore(settings.query_slots)
        log.info("serving %s (%d images, rerankers: %s)", service.root, len(service.engine),
                 ", ".join(service.rerankers))
        try:
            yield
        finally:
            service.engine.store.close()

    app = FastAPI(
        title="Waldo search service",
        version=__version__,
        description="Instance-level image retrieval: upload a photo, get the indexed images of "
                    "the same thing. All limits answer 4xx with a `detail` message.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN; the schema stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(meta.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_error_handlers(app)
    # Keep uploads in memory up to the body limit instead of spooling them to the system's
    # temporary folder: nothing a client sends is written outside the index folder. (A class
    # attribute, so process-wide; the service is the only multipart consumer in the process.)
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_body_bytes)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes,
                       max_inflight=settings.max_inflight_uploads)
    app.add_middleware(_SecurityHeaders)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(ClientError)
    async def upload_error(_: Request, exc: ClientError) -> JSONResponse:
        return error(exc.status, exc.detail)

    @app.exception_handler(ImageLoadError)
    async def image_error(_: Request, exc: ImageLoadError) -> JSONResponse:
        return error(image_error_status(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default is a list of dicts; one readable line per problem is clearer for a
        # person reading a 422 and keeps every error body the same shape ({"detail": str}).
        problems = []
        for item in exc.errors():
            where = ".".join(str(part) for part in item.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return error(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(UnknownIdError)
    async def unknown_id(_: Request, exc: UnknownIdError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: log it whole, answer without internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, "internal server error")
