"""``POST /search`` and ``POST /match/{id}``: query the index with an uploaded photo."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Path, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from waldo.serve.deps import get_service, get_slots
from waldo.serve.errors import ClientError
from waldo.serve.schemas import ErrorResponse, MatchResponse, SearchResponse
from waldo.serve.service import SearchService

router = APIRouter(tags=["search"])

#: Statuses a query can answer besides 200, for the OpenAPI schema.
QUERY_ERRORS = {
    400: {"model": ErrorResponse, "description": "empty, corrupt or truncated image"},
    413: {"model": ErrorResponse, "description": "upload over the size limit, or too many pixels"},
    415: {"model": ErrorResponse, "description": "not an image in a supported format"},
    422: {"model": ErrorResponse, "description": "k out of range, unknown reranker, missing field, or more "
                                                 "than one image"},
    503: {"model": ErrorResponse, "description": "too many big images being decoded at once; retry after "
                                                 "Retry-After"},
}

ImageUpload = Annotated[UploadFile, File(description="the query photo (JPEG, PNG, WebP, GIF, BMP, TIFF)")]
Service = Annotated[SearchService, Depends(get_service)]
Slots = Annotated[asyncio.Semaphore, Depends(get_slots)]


async def one_image(request: Request) -> None:
    """Refuse a query with several ``image`` parts (422): which one would be searched is not
    the client's choice to leave to the parser (FastAPI keeps the last one)."""
    count = len((await request.form()).getlist("image"))  # parsed once already: cached
    if count > 1:
        raise ClientError(422, f"image: one photo per query, got {count} 'image' fields")


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The upload's bytes; the body-size middleware has already bounded the whole request, this
    only guards the per-file limit when a request carries several files."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ClientError(413, f"the upload {upload.filename!r} is over the limit of {limit} bytes")
    return data


@router.post("/search", response_model=SearchResponse, responses=QUERY_ERRORS, dependencies=[Depends(one_image)])
async def search(
    image: ImageUpload,
    service: Service,
    slots: Slots,
    k: Annotated[int | None, Query(description="how many results (1..max_k, see /stats)")] = None,
    rerank: Annotated[str | None, Query(
        description="none (the global ranking alone), or a reranker /stats lists for this index; "
                    "omitted: the index's default (/stats default_reranker, chosen on validation)")] = None,
) -> SearchResponse:
    """The ``k`` indexed images most like the uploaded photo, best first, with stage timings;
    ``rerank`` in the answer names the reranker that ran."""
    k = service.settings.default_k if k is None else k
    rerank = service.resolve_rerank(rerank)
    service.check_query(k, rerank)  # before reading the upload or waiting for a slot
    data = await read_upload(image, service.settings.max_upload_bytes)
    async with slots:
        return await run_in_threadpool(service.search, data, image.filename, k, rerank)


@router.post("/match/{image_id}", response_model=MatchResponse, responses={**QUERY_ERRORS, 404: {
    "model": ErrorResponse, "description": "no live image with this id"}}, dependencies=[Depends(one_image)])
async def match(
    image: ImageUpload,
    service: Service,
    slots: Slots,
    image_id: Annotated[int, Path(ge=0, le=2**62, description="an indexed image")],
    method: Annotated[str, Query(
        description="geometry: the geometric verifier's inlier correspondences; cells: the image cells "
                    "the local-match reranker counted (an index that offers local-match)")] = "geometry",
) -> MatchResponse:
    """Correspondences between the uploaded photo and one indexed image, to draw the pair side
    by side: geometric-verification inliers (``available`` is false without a verifier), or
    with ``method=cells`` the mutually matched image cells of local-match."""
    data = await read_upload(image, service.settings.max_upload_bytes)
    async with slots:
        result = await run_in_threadpool(service.match, data, image.filename, image_id, method)
    return MatchResponse(**result)
