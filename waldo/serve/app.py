"""The search service: ``create_app(index_dir, settings)`` builds the FastAPI app.

This module only assembles: the lifespan loads the index and model once, the routers in
``routers/`` hold the endpoints, and the handlers below turn the service's typed errors into
4xx responses with a ``detail`` message, so nothing a client sends surfaces as a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waldo import __version__
from waldo.data.images import DecodeBusyError, ImageLoadError
from waldo.index import UnknownIdError
from waldo.index.errors import IndexBusyError, IndexResourceError, StorageFullError
from waldo.serve.errors import BackendUnavailableError, ClientError
from waldo.serve.limits import BodySizeLimit, image_error_status
from waldo.serve.memory import limit_heap_hoarding
from waldo.serve.origin import HostOriginGuard
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


def create_app(index_dir: str | Path, settings: ServeSettings | None = None,
               open_engine: Callable[[], Any] | None = None) -> FastAPI:
    """The app for one index (single or sharded). Nothing loads here: the lifespan opens the
    index and model when the server starts, so importing or building the app stays cheap.
    ``open_engine``: called then instead of opening the index here, for an engine served
    elsewhere (``waldo serve --engine ray``: waldo.serve.cluster.start_cluster)."""
    settings = settings or ServeSettings()

    def open_service() -> SearchService:
        return SearchService.open(index_dir, settings, engine=open_engine() if open_engine is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limit_heap_hoarding()
        service = await asyncio.to_thread(open_service)
        app.state.service = service
        app.state.query_slots = asyncio.Semaphore(settings.query_slots)
        app.state.write_slots = asyncio.Semaphore(1)
        log.info("serving %s (%d images, rerankers: %s)", service.root, await asyncio.to_thread(len, service.engine),
                 ", ".join(service.rerankers))
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

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
                       max_inflight=settings.max_inflight_uploads,
                       max_buffered_bytes=settings.max_upload_memory_bytes,
                       idle_timeout=settings.body_idle_timeout_s, total_timeout=settings.body_timeout_s)
    if settings.allowed_hosts is not None:  # outside the body guard: a foreign request reads nothing
        app.add_middleware(HostOriginGuard, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(_SecurityHeaders)
    app.openapi = lambda: _openapi_with_limits(app, settings)  # type: ignore[method-assign]
    return app


def _openapi_with_limits(app: FastAPI, settings: ServeSettings) -> dict[str, Any]:
    """The schema FastAPI generates, plus the limits that are settings rather than code: the
    range of ``k``, how many files one add may carry, and that no file may be empty. A client
    generated from the schema then knows them without reading /stats."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "k":
                    for option in parameter["schema"].get("anyOf", [parameter["schema"]]):
                        if option.get("type") == "integer":
                            option.update(minimum=1, maximum=settings.max_k)
    for name, body in schema.get("components", {}).get("schemas", {}).items():
        image = body.get("properties", {}).get("image")
        if not name.startswith("Body_") or image is None:
            continue
        if image.get("type") == "array":
            image.update(minItems=1, maxItems=settings.max_files_per_add)
            image["items"]["minLength"] = 1
        else:
            image["minLength"] = 1
    app.openapi_schema = schema
    return schema


def _allowed_methods(routes: list[Any], scope: Scope) -> set[str]:
    """The methods of every route whose path matches ``scope`` (routers included without a
    prefix are searched through: FastAPI wraps them in one object per ``include_router``)."""
    allowed: set[str] = set()
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            allowed |= _allowed_methods(inner.routes, scope)
            continue
        match, _ = route.matches(scope)
        if match in (Match.FULL, Match.PARTIAL):
            allowed |= set(getattr(route, "methods", None) or ())
    return allowed


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    def retry_later(detail: str, seconds: int) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(seconds)})

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

    # Resource limits: the request fails alone, says why and when to retry; the process goes on.
    # The exceptions' own messages name server paths: they go to the log, not to the client.
    @app.exception_handler(IndexBusyError)
    async def index_busy(request: Request, exc: IndexBusyError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return retry_later("the index is busy: another write (in this server or another process, e.g. "
                           "`waldo index add`) holds it; nothing was changed, retry shortly", 5)

    @app.exception_handler(BackendUnavailableError)
    async def backend_away(request: Request, exc: BackendUnavailableError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return retry_later(f"part of the service is unavailable: {exc}; retry shortly", 2)

    @app.exception_handler(DecodeBusyError)
    async def decode_busy(_: Request, exc: DecodeBusyError) -> JSONResponse:
        return retry_later(str(exc), 2)

    @app.exception_handler(StorageFullError)
    async def storage_full(request: Request, exc: StorageFullError) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return error(507, "insufficient storage: the index's disk is full; nothing was added (free space, then retry)")

    @app.exception_handler(IndexResourceError)
    async def out_of_resources(request: Request, exc: IndexResourceError) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return retry_later("the server is out of file handles or memory for this request; nothing was changed, "
                           "retry shortly", 5)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path: GET
            # for /images/{id} although DELETE is there too. Allow must list them all.
            headers["Allow"] = ", ".join(sorted(_allowed_methods(request.app.router.routes, request.scope)))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: log it whole, answer without internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, "internal server error")
