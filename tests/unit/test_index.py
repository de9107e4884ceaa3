"""The persisted FAISS retriever over a small real SQuAD subset (written to tmp_path at test
time): it finds gold paragraphs, loads instead of re-embedding, and rebuilds when data, chunking
or embedder change or when its files are damaged."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ragctl.engine.tokenizer import Tokenizer
from ragctl.errors import EmbeddingError, InvalidRequest
from ragctl.retrieval.collection import load_card, load_queries
from ragctl.retrieval.embeddings import SentenceTransformerEmbedder, normalize
from ragctl.retrieval.index import CHUNKS_FILE, INDEX_FILE, META_FILE, Retriever, open_retriever
from ragctl.settings import Settings


class Counting:
    """Wraps an embedder and counts the documents it is asked to embed."""

    def __init__(self, inner, name: str | None = None, fail_after: int | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.doc_calls = 0
        self.docs_embedded = 0
        self.fail_after = fail_after

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if self.fail_after is not None and self.doc_calls >= self.fail_after:
            raise EmbeddingError("simulated failure mid-build")
        self.doc_calls += 1
        self.docs_embedded += len(texts)
        return self.inner.embed_documents(texts)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed_queries(texts)


class HashingEmbedder:
    """Bag of hashed words: cheap and deterministic, for the tests about files and rebuilds."""

    name = "test:hashing-64"
    dim = 64

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1
        return normalize(out)

    embed_documents = embed_queries = _embed


def write_subset(data_dir: Path, dest: Path, n_docs: int, query_ids: Sequence[str] = ()) -> None:
    """`dest/squad/`: the first `n_docs` corpus rows plus the gold paragraphs of `query_ids`."""
    rows = [json.loads(line) for line in (data_dir / "squad" / "corpus.jsonl").open()]
    queries = [json.loads(line) for line in (data_dir / "squad" / "queries.jsonl").open()]
    chosen = [q for q in queries if q["id"] in set(query_ids)]
    gold = {g for q in chosen for g in q["gold_doc_ids"]}
    keep = [r for i, r in enumerate(rows) if i < n_docs or r["id"] in gold]
    (dest / "squad").mkdir(parents=True)
    with open(dest / "squad" / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
    with open(dest / "squad" / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in chosen)


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="module")
def subset(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """~150 SQuAD paragraphs plus the gold paragraphs of 12 questions spread over the set."""
    queries = load_queries(data_dir, "squad")
    picked = [q.id for q in queries[:: len(queries) // 12]][:12]
    root = tmp_path_factory.mktemp("squad-subset")
    write_subset(data_dir, root / "data", 150, picked)
    return Settings(data_dir=root / "data", cache_dir=root / "cache")


def test_gold_paragraphs_rank_in_the_top_5(subset: Settings, tokenizer: Tokenizer, minilm) -> None:
    counting = Counting(minilm)
    retriever = open_retriever(subset, "squad", tokenizer, embedder=counting)
    queries = load_queries(subset.data_dir, "squad")
    assert retriever.card == load_card("squad")
    assert retriever.metadata == load_card("squad").metadata
    assert counting.docs_embedded == len(retriever) > 150

    results = retriever.search_batch([q.question for q in queries], 5)
    hits = 0
    for q, found in zip(queries, results, strict=True):
        assert len(found) == 5
        scores = [c.score for c in found]
        assert all(s is not None and -1.0 <= s <= 1.0 + 1e-5 for s in scores)
        assert scores == sorted(scores, reverse=True)
        hits += bool(set(q.gold_doc_ids) & {c.doc_id for c in found})
    assert hits >= 0.8 * len(queries)
    # search() is search_batch() for one question.
    one = retriever.search(queries[0].question, 5)
    assert [c.id for c in one] == [c.id for c in results[0]]

    # A chunk's own text finds that chunk first.
    chunk = retriever.chunks[37]
    top = retriever.search(chunk.text, 3)[0]
    assert top.id == chunk.id and top.score == pytest.approx(1.0, abs=0.1)


def test_second_open_loads_without_embedding(
    subset: Settings, tokenizer: Tokenizer, minilm
) -> None:
    first = open_retriever(subset, "squad", tokenizer, embedder=Counting(minilm))
    counting = Counting(minilm)
    stages: list[str] = []
    second = open_retriever(
        subset, "squad", tokenizer, embedder=counting, progress=lambda s, d, t: stages.append(s)
    )
    assert counting.doc_calls == 0 and stages == []
    assert second.path == first.path
    assert second.path is not None and second.path.parent == subset.cache_dir / "indexes" / "squad"
    assert {p.name for p in second.path.iterdir()} == {INDEX_FILE, CHUNKS_FILE, META_FILE}
    assert second.chunks == first.chunks
    question = load_queries(subset.data_dir, "squad")[1].question
    assert [(c.id, round(c.score, 5)) for c in second.search(question, 4)] == [
        (c.id, round(c.score, 5)) for c in first.search(question, 4)
    ]


def test_search_rejects_bad_requests(subset: Settings, tokenizer: Tokenizer, minilm) -> None:
    retriever = open_retriever(subset, "squad", tokenizer, embedder=minilm)
    with pytest.raises(InvalidRequest):
        retriever.search("   ", 3)
    with pytest.raises(InvalidRequest):
        retriever.search("a question", 0)
    assert len(retriever.search("a question", len(retriever) + 10)) == len(retriever)


# --- rebuilds, with a cheap embedder over a smaller subset ---------------------------------------


@pytest.fixture
def small(data_dir: Path, tmp_path: Path) -> Settings:
    write_subset(data_dir, tmp_path / "data", 40)
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


def build(settings: Settings, tokenizer: Tokenizer, **kw) -> tuple[Retriever, Counting]:
    counting = kw.pop("embedder", None) or Counting(HashingEmbedder())
    return open_retriever(
        settings, kw.pop("dataset", "squad"), tokenizer, embedder=counting, **kw
    ), counting


def test_progress_reports_chunking_and_embedding(small: Settings, tokenizer: Tokenizer) -> None:
    seen: dict[str, list[tuple[int, int]]] = {}
    retriever, _ = build(
        small, tokenizer, progress=lambda s, d, t: seen.setdefault(s, []).append((d, t))
    )
    assert seen["chunk"][-1] == (40, 40)
    assert seen["embed"][-1] == (len(retriever), len(retriever))
    assert len(seen["embed"]) == -(-len(retriever) // 64)  # batches of 64


def test_rebuild_flag_and_unchanged_inputs(small: Settings, tokenizer: Tokenizer) -> None:
    first, c1 = build(small, tokenizer)
    _, c2 = build(small, tokenizer)
    again, c3 = build(small, tokenizer, rebuild=True)
    assert c1.doc_calls > 0 and c2.doc_calls == 0 and c3.doc_calls > 0
    assert again.path == first.path and again.chunks == first.chunks


def test_chunking_change_builds_a_new_index(small: Settings, tokenizer: Tokenizer) -> None:
    first, _ = build(small, tokenizer)
    card = load_card("squad")
    smaller = card.model_copy(
        update={"chunking": card.chunking.model_copy(update={"max_tokens": 64})}
    )
    second, counting = build(small, tokenizer, dataset=smaller)
    assert counting.doc_calls > 0
    assert second.path != first.path and len(second) > len(first)
    assert all(c.n_tokens <= 64 for c in second.chunks)
    # The original index is still there and current for the original card.
    _, unchanged = build(small, tokenizer)
    assert unchanged.doc_calls == 0


def test_data_or_embedder_change_builds_a_new_index(small: Settings, tokenizer: Tokenizer) -> None:
    first, _ = build(small, tokenizer)
    _, other_model = build(small, tokenizer, embedder=Counting(HashingEmbedder(), name="test:v2"))
    assert other_model.doc_calls > 0
    corpus = small.data_dir / "squad" / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("Super Bowl", "Superbowl", 1))
    changed, data_changed = build(small, tokenizer)
    assert data_changed.doc_calls > 0 and changed.path != first.path
    assert "Superbowl" in changed.chunks[0].text


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / INDEX_FILE).write_bytes(b"not a faiss index"),
        lambda p: (p / CHUNKS_FILE).unlink(),
        lambda p: (p / CHUNKS_FILE).write_text(
            "".join(line for i, line in enumerate((p / CHUNKS_FILE).open()) if i != 3)
        ),
        lambda p: (p / META_FILE).write_text('{"fingerprint": '),
    ],
    ids=["garbage-index", "missing-chunks", "dropped-chunk", "truncated-meta"],
)
def test_damaged_index_is_rebuilt(small: Settings, tokenizer: Tokenizer, damage) -> None:
    first, _ = build(small, tokenizer)
    assert first.path is not None
    damage(first.path)
    second, counting = build(small, tokenizer)
    assert counting.doc_calls > 0
    assert second.chunks == first.chunks and second.path == first.path
    assert second.search("Super Bowl", 1)
    _, third = build(small, tokenizer)
    assert third.doc_calls == 0  # the rebuilt index is stored again


def test_failed_embedding_stores_nothing(small: Settings, tokenizer: Tokenizer) -> None:
    with pytest.raises(EmbeddingError):
        build(small, tokenizer, embedder=Counting(HashingEmbedder(), fail_after=0))
    folder = small.cache_dir / "indexes" / "squad"
    assert not folder.exists() or not any(folder.iterdir())
    _, counting = build(small, tokenizer)
    assert counting.doc_calls > 0


def test_interrupted_write_is_never_taken_as_complete(
    small: Settings, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import faiss

    import ragctl.retrieval.index as index_module

    class DiskFull:
        """faiss whose write_index leaves a partial file behind, then fails."""

        def __getattr__(self, name: str):
            return getattr(faiss, name)

        def write_index(self, index, path: str) -> None:
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")

    monkeypatch.setattr(index_module, "_faiss", lambda: DiskFull())
    with pytest.raises(OSError, match="disk full"):
        build(small, tokenizer)
    folder = small.cache_dir / "indexes" / "squad"
    assert list(folder.iterdir()) == []  # neither a final folder nor the temporary one
    monkeypatch.undo()
    retriever, counting = build(small, tokenizer)
    assert counting.doc_calls > 0 and retriever.path is not None
    assert [p.name for p in folder.iterdir()] == [retriever.path.name]


def test_builds_left_by_dead_processes_are_cleaned_up(
    small: Settings, tokenizer: Tokenizer
) -> None:
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # reaped: its pid now names no process
    folder = small.cache_dir / "indexes" / "squad"
    leftover = folder / f".0123456789abcdef.tmp-{finished.pid}-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / INDEX_FILE).write_bytes(b"partial")
    retriever, _ = build(small, tokenizer)
    assert retriever.path is not None
    assert [p.name for p in folder.iterdir()] == [retriever.path.name]


def test_default_embedder_comes_from_settings(small: Settings, tokenizer: Tokenizer) -> None:
    retriever = open_retriever(small, "squad", tokenizer)
    assert retriever.embedder_name == small.embedder == "sentence-transformers:all-MiniLM-L6-v2"
