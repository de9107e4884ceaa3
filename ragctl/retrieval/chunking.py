"""Documents -> chunks, sized in tokens of the serving model's tokenizer (so a chunk's
`n_tokens` is what it costs in a prompt).

Two units, chosen by the dataset card: `document` keeps each document whole unless it exceeds
`max_tokens`; `window` cuts long documents into ~`chunk_tokens` windows of whole pieces (lines,
turns) with `chunk_overlap` tokens carried over. Splitting is langchain's recursive splitter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from langchain_text_splitters import RecursiveCharacterTextSplitter

from ragctl.engine.tokenizer import Tokenizer
from ragctl.retrieval.collection import Document, DocumentChunking, WindowChunking
from ragctl.types import Chunk


def chunk_documents(
    docs: Sequence[Document],
    chunking: DocumentChunking | WindowChunking,
    tokenizer: Tokenizer,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[Chunk]:
    """Chunk `docs` in order. Ids are `<doc_id>::<i>`; every chunk is at most `chunking.size`
    tokens; `progress(done_docs, total_docs)` is called as documents are done."""
    splitter = _splitter(chunking, tokenizer, chunking.size)
    chunks: list[Chunk] = []
    for n, doc in enumerate(docs, 1):
        if isinstance(chunking, DocumentChunking) and tokenizer.count(doc.text) <= chunking.size:
            # The natural unit stays verbatim (no stripping), one chunk per document.
            pieces = [doc.text] if doc.text.strip() else []
        else:
            pieces = _split(doc.text, splitter, chunking, tokenizer)
        for i, text in enumerate(pieces):
            chunks.append(
                Chunk(
                    id=f"{doc.id}::{i}",
                    doc_id=doc.id,
                    text=text,
                    title=doc.title,
                    n_tokens=tokenizer.count(text),
                )
            )
        if progress is not None:
            progress(n, len(docs))
    return chunks


def _splitter(
    chunking: DocumentChunking | WindowChunking, tokenizer: Tokenizer, size: int
) -> RecursiveCharacterTextSplitter:
    return RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
        tokenizer.hf,
        chunk_size=size,
        chunk_overlap=min(chunking.chunk_overlap, size - 1),
        separators=list(chunking.separators),
    )


def _split(
    text: str,
    splitter: RecursiveCharacterTextSplitter,
    chunking: DocumentChunking | WindowChunking,
    tokenizer: Tokenizer,
) -> list[str]:
    limit = chunking.size
    out: list[str] = []
    for piece in splitter.split_text(text):
        if not piece.strip():
            continue
        # The splitter adds up the token counts of the pieces it joins; tokenizing the joined
        # text can give a few more (BPE merges differ at the seams). Re-split the rare window
        # that ends up over the limit with a smaller target until every piece fits.
        target = limit
        pending = [piece]
        while pending:
            p = pending.pop(0)
            if tokenizer.count(p) <= limit or target == 1:
                out.append(p)
                continue
            target = max(1, int(target * 0.9))
            pending = _splitter(chunking, tokenizer, target).split_text(p) + pending
    return out
