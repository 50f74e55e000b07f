"""Waldo: instance-level image retrieval (global search, reranking, a persistent index).

``from waldo import Waldo`` is the main entry point; importing it loads torch lazily, on first use.
"""

__version__ = "0.1.0"

__all__ = ["Waldo", "SearchHit", "SearchOutcome", "AddReport", "__version__"]


def __getattr__(name: str):
    # Lazy: `import waldo` stays cheap (the CLI's --help, the index tools); torch loads on use.
    if name in ("Waldo", "SearchHit", "SearchOutcome", "AddReport"):
        from waldo import api

        return getattr(api, name)
    raise AttributeError(f"module 'waldo' has no attribute {name!r}")
