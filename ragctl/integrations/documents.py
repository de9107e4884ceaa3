"""LangChain Documents as ragctl Chunks, both ways, and `LangChainRetriever`: any LangChain
`BaseRetriever` as a ragctl retriever. Imported through `ragctl.integrations.langchain`, which
says what to install when langchain-core is missing."""

from __future__ import annotations

import contextvars
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig

from ragctl.errors import InvalidRequest
from ragctl.types import Chunk, CollectionInfo

DEFAULT_NAME = "langchain"
DEFAULT_METADATA = "a document collection"
DEFAULT_CHUNK_TOKENS = 256
"""Chunk size the profiler is told before any document has been seen (and none was given)."""
ESTIMATE_SAMPLE = 32
"""Documents whose mean token count is the collection's estimated chunk size."""
KEEP_DOCUMENTS = 4096
"""Chunk id -> Document entries a `LangChainRetriever` keeps beyond the calls in flight."""


class TokenCounter(Protocol):
    """What the adapter needs of a tokenizer (`ragctl.engine.tokenizer.Tokenizer` has it)."""

    def count(self, text: str) -> int: ...


def chunk_id_of(doc: Document) -> str:
    """A Document's chunk id: `metadata["id"]`, else the Document's own `id` (vector stores
    set it), else a stable hash of its text (the same text gives the same id in every process)."""
    for value in (doc.metadata.get("id"), doc.id):
        if value is not None and str(value).strip():
            return str(value)
    return "lc-" + hashlib.sha1(doc.page_content.encode("utf-8")).hexdigest()[:16]


def _score(metadata: Mapping[str, Any]) -> float | None:
    for key in ("score", "relevance_score"):
        value = metadata.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
            return value if math.isfinite(value) else None
    return None


def document_to_chunk(doc: Document, n_tokens: int, chunk_id: str | None = None) -> Chunk:
    """The ragctl Chunk of a LangChain Document: doc_id from metadata `doc_id`, else `source`,
    else the chunk id; title from `title`; score from `score` (or `relevance_score`)."""
    cid = chunk_id or chunk_id_of(doc)
    meta = doc.metadata
    doc_id = next(
        (str(meta[k]) for k in ("doc_id", "source") if meta.get(k) not in (None, "")), cid
    )
    title = meta.get("title")
    return Chunk(
        id=cid,
        doc_id=doc_id,
        text=doc.page_content,
        title=str(title) if title is not None else "",
        n_tokens=n_tokens,
        score=_score(meta),
    )


def chunk_to_document(chunk: Chunk) -> Document:
    """A new Document with a chunk's text, ids and title (`document_to_chunk` reads them back)."""
    meta: dict[str, Any] = {"id": chunk.id, "doc_id": chunk.doc_id}
    if chunk.title:
        meta["title"] = chunk.title
    return Document(page_content=chunk.text, metadata=meta)


@dataclass
class RetrievalCall:
    """One chain call's state, seen by the retriever through a context variable: the
    LangChain config (so the retriever's run nests under the chain's) and the Documents it
    returned (so `context` gives back exactly those objects, whatever else runs at once)."""

    config: RunnableConfig | None = None
    documents: dict[str, Document] = field(default_factory=dict)


CURRENT_CALL: contextvars.ContextVar[RetrievalCall | None] = contextvars.ContextVar(
    "ragctl_langchain_call", default=None
)


class LangChainRetriever:
    """ragctl's `Retriever` protocol over any LangChain `BaseRetriever`.

    `search(question, k)` invokes the LangChain retriever and returns the first `k` of its
    documents as Chunks (documents with no text and repeats of an id are left out). The
    retriever chooses how many documents it returns (its own k); ragctl only ever uses a
    prefix of them.

    `tokenizer`: the serving model's (`engine.tokenizer`), so chunk sizes are counted in the
    tokens the engine sees. `name`/`metadata`/`chunk_tokens` describe the collection to the
    profiler (`collection`); `chunk_tokens` left out is estimated as the mean size of the first
    documents retrieved (`DEFAULT_CHUNK_TOKENS` until then)."""

    def __init__(
        self,
        retriever: BaseRetriever,
        tokenizer: TokenCounter,
        *,
        name: str = DEFAULT_NAME,
        metadata: str = DEFAULT_METADATA,
        chunk_tokens: int | None = None,
        keep_documents: int = KEEP_DOCUMENTS,
    ) -> None:
        if not isinstance(retriever, BaseRetriever):
            raise InvalidRequest(
                f"expected a LangChain BaseRetriever (e.g. vectorstore.as_retriever()), got "
                f"{type(retriever).__name__}"
            )
        if chunk_tokens is not None and chunk_tokens < 1:
            raise InvalidRequest(f"chunk_tokens must be at least 1, got {chunk_tokens}")
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.name = name
        self.metadata = metadata
        self._chunk_tokens = chunk_tokens
        self._keep = keep_documents
        self._sample: list[int] = []
        self._documents: OrderedDict[str, Document] = OrderedDict()
        self._lock = threading.Lock()  # search runs in worker threads, several at once

    @property
    def chunk_tokens(self) -> int:
        """The chunk size given, else the mean of the first documents seen, else the default."""
        if self._chunk_tokens is not None:
            return self._chunk_tokens
        with self._lock:
            sample = list(self._sample)
        return max(1, round(sum(sample) / len(sample))) if sample else DEFAULT_CHUNK_TOKENS

    @property
    def collection(self) -> CollectionInfo:
        """What the profiler is told about this collection."""
        return CollectionInfo(self.name, self.metadata, self.chunk_tokens)

    def search(self, question: str, k: int) -> list[Chunk]:
        call = CURRENT_CALL.get()
        docs = self.retriever.invoke(question, config=call.config if call else None)
        pairs = self._convert(docs, k)
        if call is not None:
            call.documents.update((c.id, d) for c, d in pairs)
        return [c for c, _ in pairs]

    def to_chunks(self, documents: Iterable[Document], k: int | None = None) -> list[Chunk]:
        """The Chunks of `documents` (the first `k`), remembered for `document`."""
        return [c for c, _ in self._convert(documents, k)]

    def document(self, chunk: Chunk) -> Document:
        """The Document a chunk came from (the retriever's own object) while it is remembered;
        else a new Document with the chunk's text and ids."""
        with self._lock:
            doc = self._documents.get(chunk.id)
        return doc if doc is not None else chunk_to_document(chunk)

    def _convert(
        self, documents: Iterable[Document], k: int | None
    ) -> list[tuple[Chunk, Document]]:
        picked: list[tuple[str, Document]] = []
        seen: set[str] = set()
        for doc in documents:
            if k is not None and len(picked) >= k:
                break
            if not isinstance(doc, Document):
                raise InvalidRequest(
                    f"the LangChain retriever returned a {type(doc).__name__}, not a Document"
                )
            if not doc.page_content.strip():
                continue
            cid = chunk_id_of(doc)
            if cid in seen:
                continue
            seen.add(cid)
            picked.append((cid, doc))
        counts = _count_tokens(self.tokenizer, [d.page_content for _, d in picked])
        pairs = [
            (document_to_chunk(doc, n, cid), doc)
            for (cid, doc), n in zip(picked, counts, strict=True)
        ]
        with self._lock:
            for chunk, doc in pairs:
                self._documents[chunk.id] = doc
                self._documents.move_to_end(chunk.id)
            while len(self._documents) > self._keep:
                self._documents.popitem(last=False)
            room = ESTIMATE_SAMPLE - len(self._sample)
            if room > 0:
                self._sample.extend(c.n_tokens for c, _ in pairs[:room])
        return pairs


def _count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    count_many = getattr(tokenizer, "count_many", None)
    if count_many is not None:
        return list(count_many(texts))
    return [tokenizer.count(t) for t in texts]
