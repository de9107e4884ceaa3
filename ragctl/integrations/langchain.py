"""ragctl inside a LangChain application.

- `LangChainRetriever` makes any LangChain `BaseRetriever` (a vector store's `as_retriever()`,
  BM25, an ensemble, ...) a ragctl retriever: `search(question, k)` runs it and turns its
  `Document`s into `Chunk`s, remembering which Document each chunk came from.
- `RagctlRetrievalChain` is a LangChain `Runnable` with exactly the input and output of
  `create_retrieval_chain` (langchain_classic.chains), so the code that calls a retrieval chain
  does not change: `{"input": question, "chat_history"?: [...]}` in, `{..., "context":
  [Document, ...], "answer": str}` out, plus `"decision"`, the ragctl `Decision` that says
  which configuration (method, chunk count) answered and why. The answer comes from ragctl's
  controller: profile -> rules -> best-fit on the engine's free KV cache -> synthesis.

    from ragctl.integrations.langchain import RagctlRetrievalChain

    retriever = vectorstore.as_retriever(search_kwargs={"k": 10})
    chain = RagctlRetrievalChain.from_openai(retriever, base_url="http://localhost:8000/v1")
    out = chain.invoke({"input": "Who won Super Bowl 50?"})
    out["answer"], out["context"], out["decision"].config.label
    chain.close()

How many documents: the LangChain retriever decides how many it returns (its own k, e.g.
`search_kwargs={"k": 10}`); ragctl chooses how many of those, first ones first, each answer
uses (`context` lists exactly those). So give the retriever a k as large as the most chunks you
want ragctl to consider; ragctl never asks for more than its rules' largest chunk count (30 with
the default rules), and uses what the retriever returns when that is fewer.

Per call, in `config["configurable"]`: `ragctl_config` fixes the configuration (`"stuff:5"`,
`"map_reduce:6:100"` or a `ragctl.Config`; the adaptive path is skipped) and `max_chunks` caps
the chunks the adaptive path may use.

Event loops: an engine belongs to the event loop it runs on, and the chain runs every engine
call there (its home loop). Built in plain code, or with `loop="private"`, the chain gets a
private loop on a daemon thread: `invoke`/`batch`/`stream` work from plain code and
`ainvoke`/`abatch`/`astream` from any event loop. Built inside a running event loop (an async
app whose engine already runs on that loop), that loop is home: the async forms run on it
directly and the blocking forms work from other threads (`await asyncio.to_thread(chain.invoke,
...)`), but not on the loop's own thread, which they would block forever (a clear error says so).

Nothing but this module needs langchain-core; without it, importing this module raises
`MissingDependency`.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ragctl.controller import AdaptivePolicy, CollectionInfo, Controller
from ragctl.engine.base import Engine, gather_or_cancel
from ragctl.errors import (
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    MissingDependency,
)
from ragctl.runner import LoopThread
from ragctl.types import Chunk, Config, Message

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForChainRun,
        CallbackManagerForChainRun,
    )
    from langchain_core.documents import Document
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        convert_to_messages,
    )
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.utils import AddableDict
except ImportError as e:  # pragma: no cover - exercised by a test that hides langchain-core
    raise MissingDependency(
        f"ragctl.integrations.langchain needs langchain-core ({e}): "
        "pip install 'ragctl[langchain]' (or langchain-core)"
    ) from e

__all__ = [
    "ChainRequest",
    "LangChainRetriever",
    "RagctlRetrievalChain",
    "chunk_id_of",
    "document_to_chunk",
    "parse_input",
    "to_messages",
]

log = logging.getLogger(__name__)

DEFAULT_NAME = "langchain"
DEFAULT_METADATA = "a document collection"
DEFAULT_CHUNK_TOKENS = 256
"""Chunk size the profiler is told before any document has been seen (and none was given)."""
ESTIMATE_SAMPLE = 32
"""Documents whose mean token count is the collection's estimated chunk size."""
KEEP_DOCUMENTS = 4096
"""Chunk id -> Document entries a `LangChainRetriever` keeps beyond the calls in flight."""
OUTPUT_KEYS = ("context", "answer", "decision")
"""What the chain adds to its input (input keys of these names are replaced)."""

LoopChoice = Literal["auto", "private"] | asyncio.AbstractEventLoop


class TokenCounter(Protocol):
    """What the adapter needs of a tokenizer (`ragctl.engine.tokenizer.Tokenizer` has it)."""

    def count(self, text: str) -> int: ...


# --- Documents <-> Chunks ---------------------------------------------------------------------


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


@dataclass
class _Call:
    """One chain call's state, seen by the retriever through a context variable: the
    LangChain config (so the retriever's run nests under the chain's) and the Documents it
    returned (so `context` gives back exactly those objects, whatever else runs at once)."""

    config: RunnableConfig | None = None
    documents: dict[str, Document] = field(default_factory=dict)


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
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
        call = _CALL.get()
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
        if doc is not None:
            return doc
        meta: dict[str, Any] = {"id": chunk.id, "doc_id": chunk.doc_id}
        if chunk.title:
            meta["title"] = chunk.title
        return Document(page_content=chunk.text, metadata=meta)

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


# --- the chain's input ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainRequest:
    """A chain input, checked and turned into the Controller's arguments."""

    question: str
    history: tuple[Message, ...] = ()
    config: Config | None = None
    max_chunks: int | None = None


def to_messages(chat_history: Any) -> tuple[Message, ...]:
    """LangChain chat history (messages, `(role, content)` tuples, `{"role", "content"}` dicts)
    as ragctl Messages. Tool and function results are left out: the synthesis prompts show the
    conversation, not tool traffic."""
    if chat_history is None:
        return ()
    if isinstance(chat_history, str | bytes | Mapping) or not isinstance(chat_history, Iterable):
        raise InvalidRequest(
            "chat_history must be a list of messages or (role, content) pairs, got "
            f"{type(chat_history).__name__}"
        )
    try:
        messages = convert_to_messages(list(chat_history))
    except (ValueError, TypeError, NotImplementedError, KeyError) as e:
        raise InvalidRequest(f"chat_history: {e}") from e
    out: list[Message] = []
    for m in messages:
        role = _role_of(m)
        if role is not None:
            out.append(Message(role, str(m.text)))
    return tuple(out)


_CHAT_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "system": "system",
}


def _role_of(m: BaseMessage) -> Literal["system", "user", "assistant"] | None:
    if isinstance(m, HumanMessage):
        return "user"
    if isinstance(m, AIMessage):
        return "assistant"
    if isinstance(m, SystemMessage):
        return "system"
    if isinstance(m, ChatMessage):
        return _CHAT_ROLES.get(m.role)
    return None


def parse_input(input: Any, config: RunnableConfig | None = None) -> ChainRequest:
    """Check a chain input (`create_retrieval_chain`'s shape) and the ragctl options in
    `config["configurable"]` (`ragctl_config`, `max_chunks`); a clear `InvalidRequest` if wrong."""
    if not isinstance(input, Mapping):
        raise InvalidRequest(
            "RagctlRetrievalChain takes a dict like {'input': 'your question'} (the input of "
            f"create_retrieval_chain), got {type(input).__name__}"
        )
    if "input" not in input:
        raise InvalidRequest(
            "the chain's input needs an 'input' key with the question (as create_retrieval_chain "
            f"does); got keys {sorted(map(str, input))}"
        )
    question = input["input"]
    if not isinstance(question, str):
        raise InvalidRequest(
            f"'input' must be the question as a string, got {type(question).__name__}"
        )
    if not question.strip():
        raise InvalidRequest("the question ('input') is empty")
    history = to_messages(input.get("chat_history"))
    configurable = (config or {}).get("configurable") or {}
    return ChainRequest(
        question=question,
        history=history,
        config=_ragctl_config(configurable.get("ragctl_config")),
        max_chunks=_max_chunks(configurable.get("max_chunks")),
    )


def _ragctl_config(value: Any) -> Config | None:
    if value is None or isinstance(value, Config):
        return value
    if isinstance(value, str):
        try:
            return Config.parse(value)
        except ValueError as e:
            raise InvalidRequest(f"configurable ragctl_config: {e}") from e
    raise InvalidRequest(
        "configurable ragctl_config must be 'method:chunks[:intermediate_length]' (e.g. "
        f"'stuff:5') or a ragctl Config, got {type(value).__name__}"
    )


def _max_chunks(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"configurable max_chunks must be an integer >= 1, got {value!r}")
    return value


def _merge_chunks(chunks: Iterable[Any]) -> Any:
    """Input chunks of a transform, added up (dicts merged) the way LangChain streams inputs."""
    final: Any = None
    for chunk in chunks:
        if final is None:
            final = chunk
        else:
            try:
                final = final + chunk
            except TypeError:
                final = {**final, **chunk}
    return final


def _passthrough(input: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in input.items() if k not in OUTPUT_KEYS}


# --- the event loop the engine runs on --------------------------------------------------------


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Home:
    """The event loop the chain's engine runs on, and hand-offs to it from other threads and
    loops (a private one on a daemon thread, or a loop the caller's engine already runs on)."""

    def __init__(self, loop: LoopChoice) -> None:
        self._thread: LoopThread | None = None
        if loop == "private" or (loop == "auto" and _running_loop() is None):
            self._thread = LoopThread("ragctl-langchain")
            self.loop = self._thread.loop
        elif loop == "auto":
            self.loop = asyncio.get_running_loop()
        elif isinstance(loop, asyncio.AbstractEventLoop):
            self.loop = loop
        else:
            raise InvalidRequest(f"loop must be 'auto', 'private' or an event loop, got {loop!r}")

    @property
    def private(self) -> bool:
        return self._thread is not None

    def is_current(self) -> bool:
        return _running_loop() is self.loop

    def _check(self) -> None:
        # A private loop may not have started running yet; it only stops when the chain closes.
        if self.loop.is_closed() or (self._thread is None and not self.loop.is_running()):
            raise InvalidRequest(
                "the event loop this chain's engine runs on is not running any more; build "
                "the chain where it will be used (or with loop='private')"
            )

    def run(self, coro: Any) -> Any:
        """Run `coro` on the home loop and wait for it (blocking)."""
        if self.is_current():
            coro.close()
            raise InvalidRequest(
                "a blocking call (invoke/batch/stream) was made on the event loop this chain's "
                "engine runs on, which it would block forever; use ainvoke/abatch/astream here, "
                "or the blocking form from another thread"
            )
        try:
            self._check()
        except BaseException:
            coro.close()
            raise
        if self._thread is not None:
            return self._thread.run(coro)
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def arun(self, coro: Any) -> Any:
        """Await `coro` on the home loop (directly when already on it)."""
        if self.is_current():
            return await coro
        try:
            self._check()
        except BaseException:
            coro.close()
            raise
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()


async def _connect(
    base_url: str,
    *,
    model: str | None,
    api_key: str | None,
    tokenizer: str | None,
    timeout_s: float,
    kv_metrics: bool | None,
) -> Engine:
    """A RemoteEngine to an OpenAI-compatible endpoint. `kv_metrics=None`: use vLLM's
    `/metrics` when the server has it, else run without KV figures (any other server)."""
    from ragctl.engine.remote import RemoteEngine

    engine = await RemoteEngine.connect(
        base_url,
        model=model,
        tokenizer=tokenizer,
        api_key=api_key,
        timeout_s=timeout_s,
        kv_metrics=kv_metrics is not False,
    )
    if kv_metrics is None:
        try:
            await engine.kv_state()
        except (EngineUnavailable, EngineTimeout):
            await engine.aclose()
            raise
        except EngineError as e:  # no /metrics, not vLLM's, or not readable with this key
            log.info("%s: no vLLM KV metrics (%s); KV memory is treated as unknown", base_url, e)
            engine.kv_metrics = False  # type: ignore[attr-defined]
        except BaseException:
            await engine.aclose()
            raise
    return engine


# --- the chain --------------------------------------------------------------------------------


class RagctlRetrievalChain(Runnable[dict[str, Any], dict[str, Any]]):
    """A drop-in for `create_retrieval_chain(retriever, combine_docs_chain)` that answers with
    ragctl's controller.

    Input: `{"input": question, "chat_history"?: [messages or (role, content) pairs], ...}`.
    Output: the input's keys, plus `"context"` (the retriever's own Documents that the answer
    used), `"answer"` (str) and `"decision"` (the ragctl `Decision`; `.to_dict()` for JSON).
    `stream`/`astream` yield `{...input}`, `{"context": ...}`, `{"answer": ...}`,
    `{"decision": ...}`, like create_retrieval_chain's stream (the answer in one piece).

    Build it from a ragctl engine (`RagctlRetrievalChain(retriever, engine)`, `from_engine`:
    a `LocalEngine`, or a `RemoteEngine` to a vLLM server) or from any OpenAI-compatible chat
    endpoint (`from_openai`, or `base_url=`). The other options are the Controller's:
    `settings`, `rules`, `profiler`, `policy`, `answer_max_tokens`, `temperature`; and the
    collection as the profiler sees it: `collection_name`, `collection_metadata` (a one-line
    description of the documents) and `chunk_tokens` (estimated when left out).
    `owns_engine`: whether `close()` also stops the engine (default: only one the chain
    connected itself). `loop`: see the module's notes on event loops.
    """

    def __init__(
        self,
        retriever: BaseRetriever | LangChainRetriever,
        engine: Engine | None = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        tokenizer: str | None = None,
        timeout_s: float = 300.0,
        kv_metrics: bool | None = None,
        settings: Any | None = None,
        rules: Any | None = None,
        profiler: Any | None = None,
        policy: AdaptivePolicy | None = None,
        answer_max_tokens: int | None = None,
        temperature: float | None = None,
        collection_name: str = DEFAULT_NAME,
        collection_metadata: str = DEFAULT_METADATA,
        chunk_tokens: int | None = None,
        owns_engine: bool | None = None,
        loop: LoopChoice = "auto",
    ) -> None:
        if (engine is None) == (base_url is None):
            raise InvalidRequest("give the chain either an engine or a base_url, not both")
        if base_url is not None:
            if loop not in ("auto", "private"):
                raise InvalidRequest(
                    "with base_url the chain connects on a private loop; inside a running loop "
                    "use `await RagctlRetrievalChain.afrom_openai(...)`"
                )
            home = _Home("private")
            try:
                engine = home.run(
                    _connect(
                        base_url, model=model, api_key=api_key, tokenizer=tokenizer,
                        timeout_s=timeout_s, kv_metrics=kv_metrics,
                    )
                )  # fmt: skip
            except BaseException:
                home.stop()
                raise
            owns_engine = True if owns_engine is None else owns_engine
        else:
            home = _Home(loop)
            owns_engine = False if owns_engine is None else owns_engine
        assert engine is not None
        try:
            if isinstance(retriever, LangChainRetriever):
                adapter = retriever
            else:
                adapter = LangChainRetriever(
                    retriever,
                    engine.tokenizer,
                    name=collection_name,
                    metadata=collection_metadata,
                    chunk_tokens=chunk_tokens,
                )
            self.controller = Controller(
                engine,
                adapter,
                settings=settings,
                answer_max_tokens=answer_max_tokens,
                temperature=temperature,
                collection=adapter.collection,
                rules=rules,
                profiler=profiler,
                policy=policy,
                owns_engine=owns_engine,
            )
        except BaseException:
            if base_url is not None:
                home.run(engine.aclose())
                home.stop()
            raise
        self.adapter = adapter
        """The `LangChainRetriever` over the user's retriever."""
        self._home = home
        self._closed = False

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_engine(
        cls, retriever: BaseRetriever | LangChainRetriever, engine: Engine, **options: Any
    ) -> RagctlRetrievalChain:
        """A chain on a ragctl engine (`LocalEngine`, `RemoteEngine`); `options` as for the
        constructor (`rules=`, `settings=`, `policy=`, `answer_max_tokens=`, ...). The engine
        stays the caller's: `close()` leaves it running unless `owns_engine=True`."""
        return cls(retriever, engine, **options)

    @classmethod
    def from_openai(
        cls,
        retriever: BaseRetriever | LangChainRetriever,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        tokenizer: str | None = None,
        **options: Any,
    ) -> RagctlRetrievalChain:
        """A chain on any OpenAI-compatible chat endpoint (`.../v1`, with or without `/v1`):
        a vLLM server, or another server when `tokenizer` names the served model's tokenizer
        (an HF folder or id; vLLM's own is found). KV memory comes from vLLM's `/metrics` when
        the server has it and is treated as unknown otherwise (`kv_metrics=` to force). Connects
        now, on the chain's private loop; `close()` closes the connection."""
        return cls(
            retriever, base_url=base_url, model=model, api_key=api_key, tokenizer=tokenizer,
            **options,
        )  # fmt: skip

    @classmethod
    async def afrom_openai(
        cls,
        retriever: BaseRetriever | LangChainRetriever,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        tokenizer: str | None = None,
        timeout_s: float = 300.0,
        kv_metrics: bool | None = None,
        **options: Any,
    ) -> RagctlRetrievalChain:
        """`from_openai` for async code: the connection lives on the running event loop."""
        engine = await _connect(
            base_url, model=model, api_key=api_key, tokenizer=tokenizer, timeout_s=timeout_s,
            kv_metrics=kv_metrics,
        )  # fmt: skip
        options.setdefault("owns_engine", True)
        try:
            return cls(retriever, engine, **options)
        except BaseException:
            await engine.aclose()
            raise

    @property
    def engine(self) -> Engine:
        return self.controller.engine

    @property
    def retriever(self) -> BaseRetriever:
        """The user's LangChain retriever."""
        return self.adapter.retriever

    # -- Runnable -------------------------------------------------------------------------------

    def invoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self._call_with_config(self._invoke, input, config)

    async def ainvoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return await self._acall_with_config(self._ainvoke, input, config)

    def batch(
        self,
        inputs: list[dict[str, Any]],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """All inputs at once on the engine (it batches them); outputs in input order."""
        if not inputs:
            return []
        return self._batch_with_config(
            self._batch, inputs, config, return_exceptions=return_exceptions,
            keep_errors=return_exceptions,
        )  # fmt: skip

    async def abatch(
        self,
        inputs: list[dict[str, Any]],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        if not inputs:
            return []
        return await self._abatch_with_config(
            self._abatch, inputs, config, return_exceptions=return_exceptions,
            keep_errors=return_exceptions,
        )  # fmt: skip

    def stream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        yield from self.transform(iter([input]), config)

    def transform(
        self,
        input: Iterator[dict[str, Any]],
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        yield from self._transform_stream_with_config(input, self._transform, config)

    async def astream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        async def one() -> AsyncIterator[dict[str, Any]]:
            yield input

        async for chunk in self.atransform(one(), config):
            yield chunk

    async def atransform(
        self,
        input: AsyncIterator[dict[str, Any]],
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config):
            yield chunk

    # -- closing --------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the controller's background work and, when the chain owns it, the engine."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._home.arun(self.controller.aclose())
        finally:
            if self._home.private:
                await asyncio.to_thread(self._home.stop)

    def close(self) -> None:
        """`aclose`, blocking (from plain code, or from a thread off the chain's loop)."""
        if self._closed:
            return
        if self._home.is_current():
            raise InvalidRequest(
                "close() was called on the event loop this chain's engine runs on; use "
                "`await chain.aclose()` there"
            )
        self._closed = True
        try:
            self._home.run(self.controller.aclose())
        finally:
            self._home.stop()

    def __enter__(self) -> RagctlRetrievalChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RagctlRetrievalChain:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals ------------------------------------------------------------------------------

    def _request(self, input: Any, config: RunnableConfig | None) -> ChainRequest:
        if self._closed:
            raise InvalidRequest("this RagctlRetrievalChain is closed")
        return parse_input(input, config)

    def _invoke(
        self, input: dict[str, Any], run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> dict[str, Any]:
        request = self._request(input, config)
        return self._home.run(self._answer(input, request, config))

    async def _ainvoke(
        self,
        input: dict[str, Any],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> dict[str, Any]:
        request = self._request(input, config)
        return await self._home.arun(self._answer(input, request, config))

    def _jobs(
        self, inputs: Sequence[dict[str, Any]], configs: Sequence[RunnableConfig], keep_errors: bool
    ) -> list[tuple[dict[str, Any], ChainRequest | Exception, RunnableConfig]]:
        jobs: list[tuple[dict[str, Any], ChainRequest | Exception, RunnableConfig]] = []
        for input, config in zip(inputs, configs, strict=True):
            try:
                jobs.append((input, self._request(input, config), config))
            except Exception as e:
                if not keep_errors:
                    raise
                jobs.append((input, e, config))
        return jobs

    def _batch(
        self,
        inputs: list[dict[str, Any]],
        run_manager: list[CallbackManagerForChainRun],
        config: list[RunnableConfig],
        keep_errors: bool = False,
    ) -> list[dict[str, Any] | Exception]:
        jobs = self._jobs(inputs, config, keep_errors)
        return self._home.run(self._answer_all(jobs, keep_errors, config[0]))

    async def _abatch(
        self,
        inputs: list[dict[str, Any]],
        run_manager: list[AsyncCallbackManagerForChainRun],
        config: list[RunnableConfig],
        keep_errors: bool = False,
    ) -> list[dict[str, Any] | Exception]:
        jobs = self._jobs(inputs, config, keep_errors)
        return await self._home.arun(self._answer_all(jobs, keep_errors, config[0]))

    def _transform(
        self,
        inputs: Iterator[dict[str, Any]],
        run_manager: CallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> Iterator[dict[str, Any]]:
        input = _merge_chunks(inputs)
        request = self._request(input, config)
        yield AddableDict(_passthrough(input))
        out = self._home.run(self._answer(input, request, config))
        for key in OUTPUT_KEYS:
            yield AddableDict({key: out[key]})

    async def _atransform(
        self,
        inputs: AsyncIterator[dict[str, Any]],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[dict[str, Any]]:
        input = _merge_chunks([chunk async for chunk in inputs])
        request = self._request(input, config)
        yield AddableDict(_passthrough(input))
        out = await self._home.arun(self._answer(input, request, config))
        for key in OUTPUT_KEYS:
            yield AddableDict({key: out[key]})

    async def _answer_all(
        self,
        jobs: list[tuple[dict[str, Any], ChainRequest | Exception, RunnableConfig]],
        keep_errors: bool,
        config: RunnableConfig,
    ) -> list[dict[str, Any] | Exception]:
        """Every job at once (the engine batches them), at most `max_concurrency` at a time."""
        limit = config.get("max_concurrency")
        gate = asyncio.Semaphore(limit) if limit else None

        async def one(
            input: dict[str, Any], request: ChainRequest | Exception, config: RunnableConfig
        ) -> dict[str, Any] | Exception:
            if isinstance(request, Exception):
                return request
            if gate is None:
                return await self._answer(input, request, config)
            async with gate:
                return await self._answer(input, request, config)

        coros = [one(*job) for job in jobs]
        if not keep_errors:
            return await gather_or_cancel(coros)
        results = await asyncio.gather(*coros, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # cancellation and the like are not per-input results
        return list(results)  # type: ignore[arg-type]

    async def _answer(
        self, input: Mapping[str, Any], request: ChainRequest, config: RunnableConfig | None
    ) -> dict[str, Any]:
        """One answer, on the home loop: the output dict of create_retrieval_chain's shape."""
        call = _Call(config)
        token = _CALL.set(call)
        try:
            self._sync_collection()
            answer = await self.controller.aask(
                request.question,
                request.config,
                history=request.history,
                max_chunks=request.max_chunks,
            )
        finally:
            _CALL.reset(token)
        self._sync_collection()
        context = [call.documents.get(c.id) or self.adapter.document(c) for c in answer.chunks]
        out = _passthrough(input)
        out.update(context=context, answer=answer.text, decision=answer.decision)
        return out

    def _sync_collection(self) -> None:
        # The chunk size estimate settles over the first retrievals.
        info = self.adapter.collection
        if self.controller.collection != info:
            self.controller.collection = info
