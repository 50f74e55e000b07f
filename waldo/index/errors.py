"""Exceptions raised by the persistent index.

They subclass ``ValueError`` (and ``KeyError`` for unknown ids) so that callers that only
catch the built-in families still catch them, while callers that care can tell a damaged
index from one built by a different model.
"""

from __future__ import annotations

from typing import Any


class IndexCorruptError(ValueError):
    """The directory is missing, is not a Waldo index, or its files disagree with each other."""


class IndexMismatchError(ValueError):
    """The index was built with settings (model, transform, sizes) that differ from the caller's.

    ``differences`` maps each differing manifest key to ``(index_value, expected_value)``;
    ``index_value`` is ``None`` when the manifest lacks the key.
    """

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.differences = differences


class UnknownIdError(ValueError, KeyError):
    """One or more image ids (or paths) are not live in the index.

    A ``KeyError`` for ``store.get(id)``-style callers and a ``ValueError`` for bulk calls;
    ``missing`` lists every unknown key so the caller need not probe one by one.
    """

    def __init__(self, message: str, missing: list[Any]) -> None:
        super().__init__(message)
        self.missing = missing

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


def describe_keys(keys: list[Any], limit: int = 10) -> str:
    """A short, readable list for error messages: the first ``limit`` keys and a count."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = len(keys) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown
