"""The page, health and statistics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from waldo.serve.routers.search import Service
from waldo.serve.schemas import Health
from waldo.serve.settings import STATIC_DIR

router = APIRouter(tags=["meta"])


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    """The single-page search UI; its script and styles are under /static (no build step)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/healthz", response_model=Health)
def healthz(service: Service) -> Health:
    """Liveness: the index answers (the model was loaded before the server accepted traffic)."""
    return Health(status="ok", images=len(service.engine))


@router.get("/stats")
def stats(service: Service) -> dict:
    """Index size, model, available rerankers, limits, counters, query latency percentiles
    (server side, per reranker) and the server's resident memory."""
    return service.stats()
