"""Limits and knobs of the search service, in one immutable object read in one place.

Every limit a client can run into lives here so that the CLI, the tests and the docs agree on
one set of numbers; the app reads them once at start-up. Each field can also be set from the
environment as ``WALDO_<FIELD>`` (e.g. ``WALDO_API_KEY``, ``WALDO_MAX_K``): keyword arguments
(``waldo serve``'s flags) win over the environment, which wins over the defaults below.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from waldo.data.images import DEFAULT_MAX_PIXELS

MB = 1024 * 1024
#: The page's files (index.html, app.js, style.css), served by the app itself: no CDN, no build.
STATIC_DIR = Path(__file__).parent / "static"
#: ``WALDO_API_KEY`` sets ``api_key``, and so on for every field.
ENV_PREFIX = "WALDO_"


class ServeSettings(BaseSettings):
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

    # An empty variable counts as unset (``WALDO_API_KEY=`` means no key); a wrong type or an
    # unknown keyword is a ValidationError (a ValueError) at start-up, not on the first request.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True)

    max_upload_bytes: int = Field(20 * MB, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_k: int = Field(100, ge=1)
    default_k: int = Field(10, ge=1)
    max_files_per_add: int = Field(32, ge=1)
    query_slots: int = Field(2, ge=1)
    thumbnail_size: int = Field(256, ge=1)
    thumbnail_cache: int = Field(4096, ge=1)
    body_slack_bytes: int = Field(64 * 1024, ge=0)
    max_inflight_uploads: int = Field(16, ge=1)
    api_key: str | None = Field(None, repr=False)
    compile_rrt: bool = True

    @field_validator("api_key")
    @classmethod
    def _not_blank(cls, api_key: str | None) -> str | None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        return api_key

    @model_validator(mode="after")
    def _default_k_within_max_k(self) -> ServeSettings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k must lie in 1..max_k={self.max_k}, got {self.default_k}")
        return self

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted: the upload limit plus the multipart envelope."""
        return self.max_upload_bytes + self.body_slack_bytes
