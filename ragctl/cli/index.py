"""`ragctl index`."""

from __future__ import annotations

import time

import typer

from ragctl.cli.common import DATASET_FLAGS, open_retriever, out, serving_tokenizer
from ragctl.settings import Settings


def index(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", *DATASET_FLAGS, help="Dataset card name."),
    rebuild: bool = typer.Option(False, help="Rebuild even if a current index exists."),
) -> None:
    """Chunk, embed and index a dataset (reused until data, chunking or embedder change)."""
    from ragctl.retrieval.collection import load_card

    settings: Settings = ctx.obj
    load_card(dataset)
    t = time.perf_counter()
    retriever = open_retriever(settings, dataset, serving_tokenizer(settings), rebuild=rebuild)
    out.print(
        f"index {dataset}: {len(retriever.chunks)} chunks, embedder {retriever.embedder_name}, "
        f"{retriever.path} ({time.perf_counter() - t:.1f}s)"
    )
