"""The retriever: an exact FAISS inner-product index over a dataset's chunk embeddings, built
once and kept under `<cache_dir>/indexes/<dataset>/<fingerprint>/`.

The fingerprint covers everything the index depends on (corpus bytes, chunking settings, the
serving tokenizer, the embedding model), so a change to any of them builds a new index and an
unchanged setup loads the stored one without embedding anything. Builds are written to a
temporary folder and renamed into place, so a half-written index is never mistaken for one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ragctl.engine.tokenizer import Tokenizer
from ragctl.errors import EmbeddingError, InvalidRequest, MissingDependency
from ragctl.retrieval.chunking import chunk_documents
from ragctl.retrieval.collection import DatasetCard, dataset_path, load_card, load_corpus
from ragctl.retrieval.embeddings import Embedder, make_embedder
from ragctl.settings import Settings
from ragctl.types import Chunk

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""`(stage, done, total)`: stages `chunk` (documents) and `embed` (chunks)."""

# Bump when the stored layout or the chunk -> embedded-text recipe changes.
FORMAT_VERSION = 1
EMBED_BATCH = 64
INDEX_FILE, CHUNKS_FILE, META_FILE = "index.faiss", "chunks.jsonl", "meta.json"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise MissingDependency(
            "the retriever needs FAISS: pip install 'ragctl[cpu]' (faiss-cpu) or 'ragctl[gpu]'"
        ) from e
    return faiss


def embedding_text(chunk: Chunk, card: DatasetCard) -> str:
    """What gets embedded for a chunk: its text, headed by its title when the card asks."""
    if card.chunking.embed_title and chunk.title:
        # Wikipedia-style titles carry underscores for spaces (SQuAD); embed them as words.
        return f"{chunk.title.replace('_', ' ')}\n{chunk.text}"
    return chunk.text


class Retriever:
    """Top-k search over one dataset's chunks. Safe to call from several threads."""

    def __init__(
        self,
        card: DatasetCard,
        chunks: Sequence[Chunk],
        index: Any,
        embedder: Embedder,
        *,
        path: Path | None = None,
        fingerprint: str = "",
    ) -> None:
        if index.ntotal != len(chunks):
            raise ValueError(f"index holds {index.ntotal} vectors for {len(chunks)} chunks")
        self.card = card
        self.chunks: list[Chunk] = list(chunks)
        self.index = index
        self.embedder = embedder
        self.path = path
        """Folder the index was loaded from or saved to (None: in memory only)."""
        self.fingerprint = fingerprint
        # Embedding models are not guaranteed thread-safe; query embedding is milliseconds.
        self._lock = threading.Lock()

    @property
    def metadata(self) -> str:
        """The card's one-line description of this database (for the query profiler)."""
        return self.card.metadata

    @property
    def embedder_name(self) -> str:
        return self.embedder.name

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, question: str, k: int) -> list[Chunk]:
        """The `k` chunks most similar to `question`, best first, each with its `score`."""
        return self.search_batch([question], k)[0]

    def search_batch(self, questions: Sequence[str], k: int) -> list[list[Chunk]]:
        """`search` for several questions with one embedding call."""
        if k < 1:
            raise InvalidRequest(f"the number of chunks to retrieve must be >= 1, got {k}")
        vectors = self.embed_queries(questions)
        if not len(vectors):
            return []
        return self.search_vectors(vectors, k)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """The query embeddings of `texts` (stripped; none may be empty), one row each, of the
        index's dimension: the first half of `search_batch`."""
        stripped = [t.strip() for t in texts]
        if any(not t for t in stripped):
            raise InvalidRequest("the question is empty")
        if not stripped:
            return np.zeros((0, self.index.d), dtype=np.float32)
        with self._lock:
            vectors = self.embedder.embed_queries(stripped)
        if vectors.shape != (len(stripped), self.index.d):
            raise EmbeddingError(
                f"{self.embedder.name} gave query embeddings of shape {vectors.shape}; the index "
                f"expects ({len(stripped)}, {self.index.d})"
            )
        return vectors

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Chunk]]:
        """The `k` chunks nearest to each row of `vectors` (query embeddings from
        `embed_queries`), best first, each with its `score`: the second half of `search_batch`.
        """
        if k < 1:
            raise InvalidRequest(f"the number of chunks to retrieve must be >= 1, got {k}")
        if vectors.ndim != 2 or vectors.shape[1] != self.index.d:
            raise EmbeddingError(
                f"query embeddings of shape {vectors.shape}; the index expects (n, {self.index.d})"
            )
        if not len(vectors):
            return []
        scores, ids = self.index.search(
            np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self.chunks))
        )
        return [
            [
                replace(self.chunks[i], score=float(s))
                for s, i in zip(row_s, row_i, strict=True)
                if i >= 0  # faiss pads with -1 when k exceeds the index
            ]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]


def fingerprint(
    card: DatasetCard, corpus_file: Path, tokenizer: Tokenizer, embedder_name: str
) -> str:
    """sha256 over everything the index depends on."""
    h = hashlib.sha256()
    with open(corpus_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    recipe = {
        "format": FORMAT_VERSION,
        "corpus_fields": card.fields.corpus,
        "chunking": card.chunking.model_dump(mode="json"),
        "tokenizer": tokenizer.name,
        "vocab_size": len(tokenizer.hf),
        "embedder": embedder_name,
    }
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return h.hexdigest()


def build_retriever(
    card: DatasetCard,
    chunks: Sequence[Chunk],
    embedder: Embedder,
    *,
    progress: Progress | None = None,
) -> Retriever:
    """Embed `chunks` (in batches, reporting `embed` progress) into an in-memory retriever."""
    faiss = _faiss()
    if not chunks:
        raise InvalidRequest(f"dataset {card.name} has no text to index")
    texts = [embedding_text(c, card) for c in chunks]
    parts: list[np.ndarray] = []
    for start in range(0, len(texts), EMBED_BATCH):
        parts.append(embedder.embed_documents(texts[start : start + EMBED_BATCH]))
        if progress is not None:
            progress("embed", min(start + EMBED_BATCH, len(texts)), len(texts))
    vectors = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(chunks):
        raise EmbeddingError(f"{embedder.name} returned {vectors.shape} for {len(chunks)} texts")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return Retriever(card, chunks, index, embedder)


def open_retriever(
    settings: Settings,
    dataset: str | DatasetCard,
    tokenizer: Tokenizer,
    *,
    embedder: Embedder | None = None,
    rebuild: bool = False,
    progress: Progress | None = None,
) -> Retriever:
    """The retriever for `dataset` (a name, or a card to use instead of the shipped one): the
    stored index when it is current and intact, else a fresh build, which is then stored."""
    card = dataset if isinstance(dataset, DatasetCard) else load_card(dataset)
    corpus_file = dataset_path(settings.data_dir, card.name, "corpus")
    embedder = embedder or make_embedder(settings)
    fp = fingerprint(card, corpus_file, tokenizer, embedder.name)
    folder = Path(settings.cache_dir) / "indexes" / card.name / fp[:16]

    if not rebuild and folder.exists():
        try:
            return _load(folder, card, embedder, fp)
        except Exception as e:  # any damage: rebuild rather than fail
            log.warning("index in %s is unusable (%s); rebuilding", folder, e)

    start = time.perf_counter()
    docs = load_corpus(settings.data_dir, card.name)
    chunks = chunk_documents(
        docs,
        card.chunking,
        tokenizer,
        progress=(lambda d, t: progress("chunk", d, t)) if progress else None,
    )
    retriever = build_retriever(card, chunks, embedder, progress=progress)
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "dataset": card.name,
        "corpus_file": corpus_file.name,
        "n_documents": len(docs),
        "n_chunks": len(chunks),
        "dim": retriever.index.d,
        "embedder": embedder.name,
        "tokenizer": tokenizer.name,
        "vocab_size": len(tokenizer.hf),
        "chunking": card.chunking.model_dump(mode="json"),
        "build_seconds": round(time.perf_counter() - start, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _save(folder, retriever, meta)
    retriever.path, retriever.fingerprint = folder, fp
    return retriever


def _save(folder: Path, retriever: Retriever, meta: dict[str, Any]) -> None:
    faiss = _faiss()
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(folder.parent)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        faiss.write_index(retriever.index, str(tmp / INDEX_FILE))
        with open(tmp / CHUNKS_FILE, "w", encoding="utf-8") as f:
            for c in retriever.chunks:
                row = asdict(c)
                row.pop("score")
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        # meta.json last: its presence marks the folder complete.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if folder.exists():
            # A damaged or superseded index (rebuild): move it aside, then swap.
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            # Another process finished the same build first; its index is as good as ours.
            if not folder.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dead_builds(parent: Path) -> None:
    """Delete temporary folders left by builds whose process is gone (interrupted builds)."""
    for p in parent.glob(".*.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _load(folder: Path, card: DatasetCard, embedder: Embedder, fp: str) -> Retriever:
    faiss = _faiss()
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("fingerprint") != fp or meta.get("format") != FORMAT_VERSION:
        raise ValueError("meta.json belongs to another build")
    chunks: list[Chunk] = []
    with open(folder / CHUNKS_FILE, encoding="utf-8") as f:
        for line in f:
            chunks.append(Chunk(**json.loads(line)))
    index = faiss.read_index(str(folder / INDEX_FILE))
    if not (index.ntotal == len(chunks) == meta.get("n_chunks") and index.d == meta.get("dim")):
        raise ValueError(
            f"index holds {index.ntotal} vectors of dimension {index.d}, chunks.jsonl "
            f"{len(chunks)} rows, meta.json says {meta.get('n_chunks')} of {meta.get('dim')}"
        )
    return Retriever(card, chunks, index, embedder, path=folder, fingerprint=fp)
