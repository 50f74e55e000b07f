"""Generated blocks inside hand-written Markdown (docs/results.md and friends).

A script that measures something owns the text between its ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers and rewrites only that, so prose around the tables survives a rerun.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["markers", "replace_block", "write_block"]


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(text: str, block: str, start: str, end: str, heading: str = "") -> str:
    """``text`` with the span from ``start`` to ``end`` replaced by ``block`` (which carries its
    own markers); appended under ``heading`` when the markers are not there yet."""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"


def write_block(doc: Path, block: str, start: str, end: str, heading: str = "") -> None:
    """:func:`replace_block` on the file ``doc`` (created with a ``# Results`` title if missing)."""
    text = doc.read_text() if doc.exists() else "# Results\n"
    doc.write_text(replace_block(text, block, start, end, heading))
