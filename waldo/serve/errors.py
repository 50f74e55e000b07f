"""The error types the service raises itself: a request it refuses, a backend that is away."""

from __future__ import annotations


class ClientError(ValueError):
    """A request refused for a reason that is the client's; ``status`` is the HTTP status
    (4xx) and ``detail`` the message the client receives."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BackendUnavailableError(RuntimeError):
    """A deployment the request needs (the query model, or every shard of a sharded index served
    on Ray, waldo.serve.cluster) did not answer in time or has no live replica: 503 with
    Retry-After; nothing was changed by a search, and an add says which shards committed."""
