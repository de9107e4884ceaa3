"""Chunking in the serving model's tokens: paragraphs stay whole, long documents become windows
that fit the budget, cover the text and overlap as configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragctl.engine.tokenizer import Tokenizer
from ragctl.retrieval.chunking import chunk_documents
from ragctl.retrieval.collection import Document, WindowChunking, load_card, load_corpus
from ragctl.types import Chunk


def spans(text: str, chunks: list[Chunk]) -> list[tuple[int, int]]:
    """Where each chunk sits in its document, found left to right."""
    out: list[tuple[int, int]] = []
    start = -1
    for c in chunks:
        start = text.find(c.text, start + 1)
        assert start >= 0, f"{c.id} is not a piece of its document"
        out.append((start, start + len(c.text)))
    return out


def check_windows(doc: Document, chunks: list[Chunk], size: int, overlap: int, tok: Tokenizer):
    """Every window fits, the windows cover all of the document's text in order, and
    consecutive windows share at most `overlap` tokens. Returns how many pairs overlap."""
    assert [c.id for c in chunks] == [f"{doc.id}::{i}" for i in range(len(chunks))]
    for c in chunks:
        assert c.doc_id == doc.id and c.title == doc.title
        assert c.n_tokens == tok.count(c.text)
        assert 0 < c.n_tokens <= size
    where = spans(doc.text, chunks)
    covered = bytearray(len(doc.text))
    for a, b in where:
        covered[a:b] = b"\x01" * (b - a)
    gaps = "".join(ch for ch, cov in zip(doc.text, covered, strict=True) if not cov)
    assert not gaps.strip(), f"text not in any chunk: {gaps.strip()[:80]!r}"
    overlapping = 0
    for (_, end), (start, _) in zip(where, where[1:], strict=False):
        shared = doc.text[start:end] if start < end else ""
        if shared.strip():
            overlapping += 1
            assert tok.count(shared) <= overlap
    return overlapping


@pytest.fixture(scope="module")
def squad_docs(data_dir: Path) -> list[Document]:
    return load_corpus(data_dir, "squad")


def test_paragraphs_stay_whole(squad_docs: list[Document], tokenizer: Tokenizer) -> None:
    chunking = load_card("squad").chunking
    chunks = chunk_documents(squad_docs, chunking, tokenizer)
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    assert list(by_doc) == [d.id for d in squad_docs]  # document order kept
    long_docs = 0
    for doc in squad_docs:
        pieces = by_doc[doc.id]
        if tokenizer.count(doc.text) <= chunking.max_tokens:
            assert len(pieces) == 1
            (c,) = pieces
            assert (c.id, c.text, c.title) == (f"{doc.id}::0", doc.text, doc.title)
        else:
            long_docs += 1
            assert len(pieces) > 1
            check_windows(doc, pieces, chunking.max_tokens, chunking.chunk_overlap, tokenizer)
    assert len({c.id for c in chunks}) == len(chunks)
    # Both branches ran: SQuAD has a few paragraphs over the budget.
    assert 0 < long_docs < len(squad_docs) // 100


def test_a_document_over_the_budget_is_split(squad_docs: list[Document], tokenizer) -> None:
    text = "\n\n".join(d.text for d in squad_docs[:20])
    doc = Document("joined", "Joined", text)
    chunking = load_card("squad").chunking
    chunks = chunk_documents([doc], chunking, tokenizer)
    assert tokenizer.count(text) > 2 * chunking.max_tokens
    assert len(chunks) >= 3
    check_windows(doc, chunks, chunking.max_tokens, chunking.chunk_overlap, tokenizer)


@pytest.mark.parametrize("name", ["qmsum", "finsec"])
def test_windows_fit_cover_and_overlap(data_dir: Path, tokenizer: Tokenizer, name: str) -> None:
    docs = load_corpus(data_dir, name)[:2]
    chunking = load_card(name).chunking
    assert isinstance(chunking, WindowChunking)
    done: list[tuple[int, int]] = []
    chunks = chunk_documents(docs, chunking, tokenizer, progress=lambda d, t: done.append((d, t)))
    assert done == [(1, 2), (2, 2)]
    assert len({c.id for c in chunks}) == len(chunks)
    for doc in docs:
        mine = [c for c in chunks if c.doc_id == doc.id]
        total = tokenizer.count(doc.text)
        # Windows are well filled: not many more than the minimum needed.
        assert total / chunking.chunk_tokens <= len(mine) <= 2 * total / chunking.chunk_tokens
        overlapping = check_windows(
            doc, mine, chunking.chunk_tokens, chunking.chunk_overlap, tokenizer
        )
        assert overlapping > 0  # the configured overlap is actually carried over


def test_qmsum_windows_are_whole_turns(data_dir: Path, tokenizer: Tokenizer) -> None:
    doc = load_corpus(data_dir, "qmsum")[0]
    turns = set(doc.text.split("\n"))
    chunks = chunk_documents([doc], load_card("qmsum").chunking, tokenizer)
    whole = [c for c in chunks if all(line in turns for line in c.text.split("\n"))]
    # Only a turn longer than a whole window may be cut.
    assert len(whole) >= 0.9 * len(chunks)


def test_zero_overlap_means_disjoint_windows(data_dir: Path, tokenizer: Tokenizer) -> None:
    doc = load_corpus(data_dir, "qmsum")[0]
    chunking = load_card("qmsum").chunking.model_copy(update={"chunk_overlap": 0})
    chunks = chunk_documents([doc], chunking, tokenizer)
    assert check_windows(doc, chunks, chunking.chunk_tokens, 0, tokenizer) == 0


def test_blank_documents_give_no_chunks(tokenizer: Tokenizer) -> None:
    docs = [Document("a", "A", "  \n"), Document("b", "B", "Some text.")]
    for name in ("squad", "qmsum"):
        chunks = chunk_documents(docs, load_card(name).chunking, tokenizer)
        assert [c.id for c in chunks] == ["b::0"]
