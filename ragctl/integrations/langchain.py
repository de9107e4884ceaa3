"""ragctl inside a LangChain application.

- `LangChainRetriever` (in `documents.py`, with the Document <-> Chunk conversions) makes any
  LangChain `BaseRetriever` (a vector store's `as_retriever()`, BM25, an ensemble, ...) a ragctl
  retriever: `search(question, k)` runs it and turns its `Document`s into `Chunk`s, remembering
  which Document each chunk came from.
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
`"map_reduce:6:100"` or a `ragctl.Config`; the adaptive path is skipped), `max_chunks` caps
the chunks the adaptive path may use, and `answer_options` (a `ragctl.types.AnswerOptions` or
a dict of its fields: max_tokens, temperature, top_p, stop, seed) applies to the final stage.

Event loops: an engine belongs to the event loop it runs on, and the chain runs every engine
call there (its home loop). Built in plain code, or with `loop="private"`, the chain gets a
private loop on a daemon thread: `invoke`/`batch`/`stream` work from plain code and
`ainvoke`/`abatch`/`astream` from any event loop. Built inside a running event loop (an async
app whose engine already runs on that loop), that loop is home: the async forms run on it
directly and the blocking forms work from other threads (`await asyncio.to_thread(chain.invoke,
...)`), but not on the loop's own thread, which they would block forever (a clear error says so).

Nothing but this module (and `documents.py`, imported through it) needs langchain-core;
without it, importing this module raises `MissingDependency`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from ragctl.bridge import Bridge, Sink, running_loop, stream_through
from ragctl.controller import Controller
from ragctl.engine.base import Engine, gather_or_cancel
from ragctl.engine.remote import RemoteEngine
from ragctl.errors import InvalidRequest, MissingDependency
from ragctl.policy import AdaptivePolicy
from ragctl.types import AnswerOptions, Config, Message

try:
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

from ragctl.integrations.documents import (  # noqa: E402 - after the check for langchain-core
    CURRENT_CALL,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_METADATA,
    DEFAULT_NAME,
    LangChainRetriever,
    RetrievalCall,
    chunk_id_of,
    chunk_to_document,
    document_to_chunk,
)

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "ChainRequest",
    "LangChainRetriever",
    "RagctlRetrievalChain",
    "chunk_id_of",
    "chunk_to_document",
    "document_to_chunk",
    "parse_input",
    "to_messages",
]

OUTPUT_KEYS = ("context", "answer", "decision")
"""What the chain adds to its input (input keys of these names are replaced)."""

LoopChoice = Literal["auto", "private"] | asyncio.AbstractEventLoop


# --- the chain's input ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainRequest:
    """A chain input, checked and turned into the Controller's arguments."""

    question: str
    history: tuple[Message, ...] = ()
    config: Config | None = None
    max_chunks: int | None = None
    options: AnswerOptions | None = None


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
        options=_answer_options(configurable.get("answer_options")),
    )


def _answer_options(value: Any) -> AnswerOptions | None:
    if value is None or isinstance(value, AnswerOptions):
        return value
    if isinstance(value, Mapping):
        try:
            fields = dict(value)
            if isinstance(fields.get("stop"), str):
                fields["stop"] = (fields["stop"],)
            elif fields.get("stop") is not None:
                fields["stop"] = tuple(fields["stop"])
            return AnswerOptions(**fields)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"configurable answer_options: {e}") from e
    raise InvalidRequest(
        "configurable answer_options must be a dict (max_tokens, temperature, top_p, stop, "
        f"seed) or a ragctl AnswerOptions, got {type(value).__name__}"
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


def _stream_chunk(item: str | dict[str, Any]) -> AddableDict:
    """A delta as an `answer` chunk; the finished output as its context and decision (its
    answer is the deltas' sum, already sent)."""
    if isinstance(item, str):
        return AddableDict(answer=item)
    chunk = AddableDict(context=item["context"], decision=item["decision"])
    if not item["answer"]:
        chunk["answer"] = ""  # nothing streamed: the key is still there
    return chunk


# --- the event loop the engine runs on --------------------------------------------------------

BLOCKING_HINT = (
    "use ainvoke/abatch/astream here, or the blocking form (invoke/batch/stream) from another "
    "thread"
)


def _bridge(loop: LoopChoice) -> Bridge:
    """The chain's home loop: see the module's notes on event loops."""
    if loop == "private" or (loop == "auto" and running_loop() is None):
        return Bridge.private(hint=BLOCKING_HINT)
    if loop == "auto":
        return Bridge(asyncio.get_running_loop(), hint=BLOCKING_HINT)
    if isinstance(loop, asyncio.AbstractEventLoop):
        return Bridge(loop, hint=BLOCKING_HINT)
    raise InvalidRequest(f"loop must be 'auto', 'private' or an event loop, got {loop!r}")


# --- the chain --------------------------------------------------------------------------------


class RagctlRetrievalChain(Runnable[dict[str, Any], dict[str, Any]]):
    """A drop-in for `create_retrieval_chain(retriever, combine_docs_chain)` that answers with
    ragctl's controller.

    Input: `{"input": question, "chat_history"?: [messages or (role, content) pairs], ...}`.
    Output: the input's keys, plus `"context"` (the retriever's own Documents that the answer
    used), `"answer"` (str) and `"decision"` (the ragctl `Decision`; `.to_dict()` for JSON).
    `stream`/`astream` yield `{...input}`, then `{"answer": delta}` chunks as the final stage
    decodes them (stuff, map_reduce; map_rerank's chosen answer in one chunk when ranked),
    then `{"context": ...}` and `{"decision": ...}`: the chunks add up to `invoke`'s output,
    as create_retrieval_chain's do (the context comes last here: it is the context the answer
    used, known once the answer is done). Closing the stream early cancels the request.

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
            bridge = _bridge("private")
            try:
                engine = bridge.run(
                    RemoteEngine.connect(
                        base_url, model=model, api_key=api_key, tokenizer=tokenizer,
                        timeout_s=timeout_s, kv_metrics=kv_metrics,
                    )
                )  # fmt: skip
            except BaseException:
                bridge.close()
                raise
            owns_engine = True if owns_engine is None else owns_engine
        else:
            bridge = _bridge(loop)
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
                bridge=bridge,
            )
        except BaseException:
            if base_url is not None:
                bridge.run(engine.aclose())
            bridge.close()
            raise
        self.adapter = adapter
        """The `LangChainRetriever` over the user's retriever."""
        self._bridge = bridge
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
        engine = await RemoteEngine.connect(
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
        await self.controller.aclose()

    def close(self) -> None:
        """`aclose`, blocking (from plain code, or from a thread off the chain's loop)."""
        if self._closed:
            return
        if self._bridge.is_home():
            raise InvalidRequest(
                "close() was called on the event loop this chain's engine runs on; use "
                "`await chain.aclose()` there"
            )
        self._closed = True
        self.controller.close()

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

    # LangChain passes each of these the config of the chain's run (its callbacks nest the
    # retriever's run under the chain's); they take no run manager, so it passes none.

    def _invoke(self, input: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        return self._bridge.run(self._answer(input, self._request(input, config), config))

    async def _ainvoke(self, input: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        return await self._bridge.arun(self._answer(input, self._request(input, config), config))

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
        self, inputs: list[dict[str, Any]], config: list[RunnableConfig], keep_errors: bool = False
    ) -> list[dict[str, Any] | Exception]:
        jobs = self._jobs(inputs, config, keep_errors)
        return self._bridge.run(self._answer_all(jobs, keep_errors, config[0]))

    async def _abatch(
        self, inputs: list[dict[str, Any]], config: list[RunnableConfig], keep_errors: bool = False
    ) -> list[dict[str, Any] | Exception]:
        jobs = self._jobs(inputs, config, keep_errors)
        return await self._bridge.arun(self._answer_all(jobs, keep_errors, config[0]))

    def _transform(
        self, inputs: Iterator[dict[str, Any]], config: RunnableConfig
    ) -> Iterator[dict[str, Any]]:
        input = _merge_chunks(inputs)
        request = self._request(input, config)
        yield AddableDict(_passthrough(input))
        for item in self._bridge.iterate(lambda sink: self._answer(input, request, config, sink)):
            yield _stream_chunk(item)

    async def _atransform(
        self, inputs: AsyncIterator[dict[str, Any]], config: RunnableConfig
    ) -> AsyncIterator[dict[str, Any]]:
        input = _merge_chunks([chunk async for chunk in inputs])
        request = self._request(input, config)
        yield AddableDict(_passthrough(input))
        stream = stream_through(
            lambda sink: self._bridge.arun(self._answer(input, request, config, sink))
        )
        async with aclosing(stream):
            async for item in stream:
                yield _stream_chunk(item)

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
        self,
        input: Mapping[str, Any],
        request: ChainRequest,
        config: RunnableConfig | None,
        on_token: Sink | None = None,
    ) -> dict[str, Any]:
        """One answer, on the home loop: the output dict of create_retrieval_chain's shape
        (`on_token`: the answer's deltas as they are decoded)."""
        call = RetrievalCall(config)
        token = CURRENT_CALL.set(call)
        try:
            self._sync_collection()
            answer = await self.controller.aask(
                request.question,
                request.config,
                history=request.history,
                max_chunks=request.max_chunks,
                options=request.options,
                on_token=on_token,
            )
        finally:
            CURRENT_CALL.reset(token)
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
