"""Waldo: instance-level image retrieval (global search, reranking, a persistent index)."""

__version__ = "0.1.0"
