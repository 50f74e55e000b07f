"""The collection: add uploads, fetch an indexed image or its thumbnail, remove one.

Images are addressed only by id: the file served is whatever path the index stores for that
id, so no client-supplied string ever becomes a path (no traversal).
"""

from __future__ import annotations

import mimetypes
import pathlib
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Response, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from waldo.serve.deps import WriteTurn, require_write_key
from waldo.serve.errors import ClientError
from waldo.serve.routers.search import QUERY_ERRORS, Service, read_upload
from waldo.serve.schemas import AddResponse, ErrorResponse, RemoveResponse
from waldo.serve.service import SearchService
from waldo.serve.uploads import MAX_IDENTITY_CHARS

router = APIRouter(tags=["images"])

ImageId = Annotated[int, Path(ge=0, le=2**62, description="an indexed image's id")]
# 422 is declared here because the app answers it as {"detail": "a sentence"} (see app.py):
# without this, FastAPI documents its own list-of-errors body, which the app never sends.
NOT_FOUND = {404: {"model": ErrorResponse, "description": "no live image with this id, or its file is gone"},
             422: {"model": ErrorResponse, "description": "the id is not an integer in 0..2**62"}}
UNAUTHORISED = {401: {"model": ErrorResponse, "description": "the server has an API key and the request's "
                                                              "X-API-Key header is missing or wrong"}}
#: What a write can meet besides the client's own mistakes.
WRITE_ERRORS = {
    403: {"model": ErrorResponse, "description": "a browser page of another site (Origin) may not write here"},
    503: {"model": ErrorResponse, "description": "the index is busy (another write, or another process holds its "
                                                 "write lock) or out of file handles; retry after Retry-After"},
    507: {"model": ErrorResponse, "description": "no space left on the index's disk; nothing was added"},
}
#: Writes change what every client sees: when the server has an API key, they need it.
WRITE_GUARD = [Depends(require_write_key)]
# Ids are never reused, so what an id names never changes: let browsers keep it.
IMMUTABLE = {"Cache-Control": "public, max-age=86400, immutable"}


@router.post("/images", response_model=AddResponse, status_code=201,
             responses={**QUERY_ERRORS, **UNAUTHORISED, **WRITE_ERRORS, 409: {
                 "model": ErrorResponse, "description": "these bytes are already indexed under another identity"}},
             dependencies=WRITE_GUARD)
async def add_images(
    image: Annotated[list[UploadFile], File(description="one or more photos to index (at most max_files_per_add, "
                                                        "see /stats; none empty)")],
    service: Service,
    turn: WriteTurn,
    identity: Annotated[str, Form(max_length=MAX_IDENTITY_CHARS, description=(
        "the instance the photos show, stored exactly as given (no control characters)"))] = "",
) -> AddResponse:
    """Store the photos under ``INDEX/uploads/<sha256>.<ext>`` and index them, atomically:
    queries see all of them or none. Uploading bytes already indexed returns their id and the
    identity they were indexed under (``created: false``); under another identity, 409.
    Writes take their turn one at a time, never a query slot: searches go on meanwhile."""
    files = [(await read_upload(upload, service.settings.max_upload_bytes), upload.filename) for upload in image]
    async with turn:
        added = await run_in_threadpool(service.add, files, identity)
    # A sharded index served on Ray counts over its shards: not on the event loop.
    return AddResponse(images=added, count=await run_in_threadpool(len, service.engine))


@router.get("/images/{image_id}", response_class=FileResponse, responses=NOT_FOUND)
def get_image(image_id: ImageId, service: Service) -> FileResponse:
    """The stored file of an indexed image, as it was indexed."""
    path = _existing_file(service, image_id)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers=IMMUTABLE)


@router.get("/thumbnails/{image_id}", response_class=Response, responses=NOT_FOUND)
def get_thumbnail(image_id: ImageId, service: Service) -> Response:
    """A JPEG preview, longest side ``thumbnail_size`` pixels (256 by default)."""
    _existing_file(service, image_id)
    return Response(service.thumbnail(image_id), media_type="image/jpeg", headers=IMMUTABLE)


@router.delete("/images/{image_id}", response_model=RemoveResponse,
               responses={**NOT_FOUND, **UNAUTHORISED, **WRITE_ERRORS}, dependencies=WRITE_GUARD)
async def remove_image(image_id: ImageId, service: Service, turn: WriteTurn) -> RemoveResponse:
    """Remove an image from the index (and its stored file, if it was uploaded here)."""
    async with turn:
        await run_in_threadpool(service.remove, image_id)
    return RemoveResponse(removed=1, count=await run_in_threadpool(len, service.engine))


def _existing_file(service: SearchService, image_id: int) -> pathlib.Path:
    try:
        return service.image_path(image_id)
    except FileNotFoundError as error:
        raise ClientError(404, str(error)) from None
