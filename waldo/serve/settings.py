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
        max_upload_memory_bytes: bytes of request bodies held in memory at once, all requests
            together (uploads are kept in memory, never spooled to disk); a body that would pass
            it gets 429. Counted as bytes arrive, so a slow client reserves nothing it has not sent.
        body_idle_timeout_s: a request body that sends nothing for this long gets 408 and its
            connection is closed (slow-upload sockets cannot hold a place for ever).
        body_timeout_s: a request body not complete after this long gets 408 (20 MB at 1.4 Mbit/s).
        write_wait_s: how long ``POST /images`` and ``DELETE /images/{id}`` wait for their turn to
            write and for the index's write lock (another ``waldo index add`` may hold it); then
            503 with Retry-After. Writes never take a query slot, so searches go on meanwhile.
        decode_memory_bytes: memory all image decodes of the process may hold at once (queries,
            uploads, thumbnails); a decode waits for room (up to ``write_wait_s``, then 503), and
            an image that alone needs more is refused with 413.
        allowed_hosts: host names (without port) the ``Host`` header may carry; ``*`` allows any.
            None (the default of ``create_app``): no check; ``waldo serve`` on a loopback address
            sets the loopback names, which defeats DNS rebinding. Writes whose ``Origin`` is not an
            allowed host (or, with ``*``, not the request's own host) get 403.
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
    max_inflight_uploads: int = Field(64, ge=1)
    max_upload_memory_bytes: int = Field(320 * MB, ge=1)
    body_idle_timeout_s: float = Field(5.0, gt=0)
    body_timeout_s: float = Field(120.0, gt=0)
    write_wait_s: float = Field(10.0, ge=0)
    decode_memory_bytes: int = Field(384 * MB, ge=1)
    allowed_hosts: tuple[str, ...] | None = None
    api_key: str | None = Field(None, repr=False)
    compile_rrt: bool = True

    @field_validator("api_key")
    @classmethod
    def _not_blank(cls, api_key: str | None) -> str | None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        return api_key

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, hosts: object) -> object:
        # WALDO_ALLOWED_HOSTS=localhost,example.org reads as a list, like the repeated flag.
        if isinstance(hosts, str):
            hosts = [part for part in hosts.replace(" ", ",").split(",") if part]
        if isinstance(hosts, (list, tuple)):
            return tuple(str(host).strip().lower().strip("[]") for host in hosts)
        return hosts

    @model_validator(mode="after")
    def _default_k_within_max_k(self) -> ServeSettings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k must lie in 1..max_k={self.max_k}, got {self.default_k}")
        return self

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted: the upload limit plus the multipart envelope."""
        return self.max_upload_bytes + self.body_slack_bytes
