"""Limits and knobs of the search service, in one immutable object.

Every limit a client can run into lives here so that the CLI, the tests and the docs agree on
one set of numbers; the app reads them once at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from waldo.data.images import DEFAULT_MAX_PIXELS

MB = 1024 * 1024
#: The page's files (index.html, app.js, style.css), served by the app itself: no CDN, no build.
STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeSettings:
    """How the service limits and shapes its work.

    Attributes:
        max_upload_bytes: largest request upload accepted by ``POST /search``, ``POST /match``
            and ``POST /images`` (all files of one request together; the body may exceed it only
            by the multipart envelope, ``body_slack_bytes``). Larger requests get 413, refused
            from their Content-Length before being read, or as soon as a streamed body passes it.
        max_pixels: largest ``width * height`` of an uploaded image; checked from the header,
            before decoding, so decompression bombs are refused cheaply (413).
        max_k: largest ``k`` a search may ask for (422 above it).
        default_k: ``k`` when the client gives none.
        max_files_per_add: how many files one ``POST /images`` may carry.
        query_slots: queries that may run model inference at once. Extraction is CPU bound, so
            more threads than cores only add memory (each decoded upload can be ~100 MB) and
            latency; further queries wait for a slot instead.
        thumbnail_size: longest side of ``GET /thumbnails/{id}`` JPEGs, in pixels.
        thumbnail_cache: thumbnails kept in memory (ids are never reused, so entries never go
            stale; the bound only caps memory, ~15 KB each).
        body_slack_bytes: allowance for multipart headers and small form fields on top of the
            file bytes when the request body is measured.
        max_inflight_uploads: request bodies being received or processed at once; more get 429.
            Uploads are held in memory, so this bounds their memory (16 x 20 MB = 320 MB).
        api_key: when set, the write endpoints (``POST /images``, ``DELETE /images/{id}``) need
            it in the ``X-API-Key`` header (401 otherwise); reads stay open. None: no key.
            Kept out of ``repr`` so that logging the settings never prints it.
        compile_rrt: run RRT rerankers' scorer through torch.compile (bf16 where the CPU has it):
            about 2x faster queries for 10-20 s more start-up, paid in the warm-up query.
    """

    max_upload_bytes: int = 20 * MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_k: int = 100
    default_k: int = 10
    max_files_per_add: int = 32
    query_slots: int = 2
    thumbnail_size: int = 256
    thumbnail_cache: int = 4096
    body_slack_bytes: int = 64 * 1024
    max_inflight_uploads: int = 16
    api_key: str | None = field(default=None, repr=False)
    compile_rrt: bool = True

    def __post_init__(self) -> None:
        # Fail at start-up, not on the first request, when a limit makes no sense.
        for name in ("max_upload_bytes", "max_pixels", "max_k", "default_k", "max_files_per_add",
                     "query_slots", "thumbnail_size", "thumbnail_cache", "max_inflight_uploads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"default_k must lie in 1..max_k={self.max_k}, got {self.default_k}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted: the upload limit plus the multipart envelope."""
        return self.max_upload_bytes + self.body_slack_bytes
