"""The one error type the service raises for a request it refuses."""

from __future__ import annotations


class ClientError(ValueError):
    """A request refused for a reason that is the client's; ``status`` is the HTTP status
    (4xx) and ``detail`` the message the client receives."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
