"""Retrieval: dataset cards and data (`collection`), chunking in serving-model tokens
(`chunking`), embedding backends (`embeddings`), the persisted FAISS index (`index`) and the
batching of query embedding and search across concurrent requests (`batching`).

`open_retriever(settings, dataset, tokenizer)` is the entry point for everything above."""

from __future__ import annotations

from typing import Any

from ragctl.retrieval.batching import Batcher, BatchingRetriever, apply_retrieval_threads

__all__ = ["Batcher", "BatchingRetriever", "Retriever", "apply_retrieval_threads", "open_retriever"]


def __getattr__(name: str) -> Any:
    # The index module pulls in the tokenizer stack: imported on first use.
    if name in ("Retriever", "open_retriever"):
        from ragctl.retrieval import index

        return getattr(index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
