"""ragctl in a LangChain application, on the real engines.

The application: a FAISS vector store over SQuAD paragraphs (all-MiniLM-L6-v2 embeddings) and
calling code written against LangChain's retrieval-chain interface. It runs first on the classic
`create_retrieval_chain(retriever, create_stuff_documents_chain(ChatOpenAI(...), prompt))` against
the vLLM server, then, unchanged, on `RagctlRetrievalChain` over the same retriever and the
in-process engine; then the async forms, chat history, per-call ragctl options, and the chain
built from an OpenAI-compatible URL, used from plain (non-async) code.
"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
from typing import Any

import pytest
import pytest_asyncio

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_classic")
pytest.importorskip("langchain_community")
pytest.importorskip("langchain_openai")
pytest.importorskip("faiss")

from langchain_classic.chains import create_retrieval_chain  # noqa: E402
from langchain_classic.chains.combine_documents import create_stuff_documents_chain  # noqa: E402
from langchain_community.embeddings import HuggingFaceEmbeddings  # noqa: E402
from langchain_community.vectorstores import FAISS  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

from ragctl.engine.remote import RemoteEngine  # noqa: E402
from ragctl.errors import InvalidRequest  # noqa: E402
from ragctl.integrations.langchain import RagctlRetrievalChain  # noqa: E402
from ragctl.policy import AdaptivePolicy  # noqa: E402
from ragctl.retrieval.embeddings import resolve_st_model  # noqa: E402
from ragctl.types import Config, Decision  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

ANSWER_TOKENS = 32
N_DOCUMENTS = 60
RETRIEVER_K = 4
NO_GOLDEN = AdaptivePolicy(golden_every=0)


# --- the LangChain application ----------------------------------------------------------------


@pytest.fixture(scope="module")
def questions(small_squad) -> list[str]:
    return [q.question for q in small_squad[1][:3]]


@pytest.fixture(scope="module")
def documents(small_squad) -> list[Document]:
    """~60 SQuAD paragraphs, the gold ones of the test questions among them."""
    settings, queries = small_squad
    with open(settings.data_dir / "squad" / "corpus.jsonl") as f:
        rows = [json.loads(line) for line in f]
    gold = {g for q in queries[:3] for g in q.gold_doc_ids}
    rows = [r for r in rows if r["id"] in gold] + [r for r in rows if r["id"] not in gold]
    return [
        Document(
            page_content=r["text"],
            metadata={"id": r["id"], "doc_id": r["title"], "title": r["title"]},
        )
        for r in rows[:N_DOCUMENTS]
    ]


@pytest.fixture(scope="module")
def retriever(documents) -> BaseRetriever:
    embeddings = HuggingFaceEmbeddings(
        model_name=str(resolve_st_model("all-MiniLM-L6-v2")),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True},
    )
    store = FAISS.from_documents(documents, embeddings)
    return store.as_retriever(search_kwargs={"k": RETRIEVER_K})


def run_app(chain: Any, questions: list[str]) -> dict[str, Any]:
    """The application's calling code: written once against the retrieval-chain interface."""
    results = [chain.invoke({"input": questions[0]})]
    results += chain.batch([{"input": q} for q in questions[1:]])
    report = [
        {
            "question": r["input"],
            "answer": r["answer"].strip(),
            "sources": [d.metadata["id"] for d in r["context"]],
        }
        for r in results
    ]
    streamed = list(chain.stream({"input": questions[-1]}))
    return {"results": results, "report": report, "streamed": streamed}


def check_app_run(run: dict[str, Any], questions: list[str], documents: list[Document]) -> None:
    """What the calling code relies on, whichever chain it ran on."""
    for r, q in zip(run["results"], questions, strict=True):
        assert r["input"] == q
        assert isinstance(r["answer"], str)
        assert r["context"] and all(isinstance(d, Document) for d in r["context"])
    ids = {d.metadata["id"] for d in documents}
    assert [x["question"] for x in run["report"]] == questions
    assert all(set(x["sources"]) <= ids for x in run["report"])
    streamed = run["streamed"]
    assert streamed[0] == {"input": questions[-1]}
    # All the chunks add up to the whole output.
    whole = functools.reduce(operator.add, streamed)
    assert {"input", "context", "answer"} <= set(whole)
    assert isinstance(whole["answer"], str) and whole["context"]


def key_order(chunks: list[dict[str, Any]]) -> list[str]:
    """The output keys in the order a stream first yields them."""
    return list(dict.fromkeys(k for c in chunks for k in c))


class RetrievalRecorder(BaseCallbackHandler):
    """Sees what the LangChain retriever returned, and under which run, through LangChain's
    own callbacks."""

    def __init__(self) -> None:
        self.documents: list[Document] = []
        self.chain_runs: list[Any] = []
        self.retriever_parents: list[Any] = []

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: Any, **kwargs: Any) -> None:
        if kwargs.get("name") == "RagctlRetrievalChain":
            self.chain_runs.append(run_id)

    def on_retriever_end(self, documents: Any, *, parent_run_id: Any, **kwargs: Any) -> None:
        self.documents.extend(documents)
        self.retriever_parents.append(parent_run_id)


def kept(documents: list[Document], retrieved: list[Document]) -> bool:
    return all(any(d is r for r in retrieved) for d in documents)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chain(retriever, local_engine):
    """The ragctl chain on the in-process engine; built on the loop the engine runs on."""
    chain = RagctlRetrievalChain.from_engine(
        retriever,
        local_engine,
        answer_max_tokens=ANSWER_TOKENS,
        policy=NO_GOLDEN,
        collection_metadata="Wikipedia paragraphs (SQuAD)",
    )
    yield chain
    await chain.aclose()


# --- the tests --------------------------------------------------------------------------------


async def test_the_same_calling_code_runs_on_both_chains(
    vllm_server, chain, retriever, questions, documents
) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer the question from the context.\n\n{context}"), ("human", "{input}")]
    )
    llm = ChatOpenAI(
        base_url=vllm_server.url + "/v1",
        model=vllm_server.model,
        api_key="none",
        max_tokens=ANSWER_TOKENS,
        temperature=0,
    )
    classic = create_retrieval_chain(retriever, create_stuff_documents_chain(llm, prompt))

    # Plain blocking code, as an application would run it (off the event loop).
    before = await asyncio.to_thread(run_app, classic, questions)
    after = await asyncio.to_thread(run_app, chain, questions)

    check_app_run(before, questions, documents)
    check_app_run(after, questions, documents)
    for old, new in zip(before["results"], after["results"], strict=True):
        # The same keys (ragctl adds its decision), the same types.
        assert set(new) == set(old) | {"decision"}
        assert len(new["context"]) <= len(old["context"]) == RETRIEVER_K
        d = new["decision"]
        assert isinstance(d, Decision) and d.reason == "fit"  # one question at a time
        assert d.config.num_chunks >= len(new["context"])
        assert d.to_dict()["method"] == d.config.method
    # The stream yields the input, then the documents, then the answer; ragctl's yields the
    # answer's tokens as they are decoded, then the documents the answer used and its decision
    # (the chunks add up to the same output).
    assert key_order(before["streamed"]) == ["input", "context", "answer"]
    assert key_order(after["streamed"]) == ["input", "answer", "context", "decision"]
    # The profiler is told the chunk size measured on the retrieved documents.
    info = chain.controller.collection
    assert info == chain.adapter.collection and 20 < info.chunk_tokens < 1000
    assert (info.name, info.metadata) == ("langchain", "Wikipedia paragraphs (SQuAD)")


async def test_async_forms_history_and_a_fixed_configuration(chain, questions, documents) -> None:
    fixed = {"configurable": {"ragctl_config": "stuff:1"}}
    plain = await chain.abatch([{"input": q} for q in questions[:2]], config=fixed)
    for out, q in zip(plain, questions[:2], strict=True):
        assert out["input"] == q and isinstance(out["answer"], str)
        assert out["decision"].reason == "fixed"
        assert out["decision"].config == Config("stuff", 1)
        assert len(out["context"]) == 1

    # Chat history passes through, reaches the prompts, and other keys pass through too.
    history = [
        HumanMessage("Tell me about the paragraph you read."),
        AIMessage(" ".join(d.page_content for d in documents[-2:])),
        ("human", "Thanks."),
    ]
    recorder = RetrievalRecorder()
    out = await chain.ainvoke(
        {"input": questions[0], "chat_history": history, "user": "u1"},
        config={**fixed, "callbacks": [recorder]},
    )
    assert out["chat_history"] is history and out["user"] == "u1"
    assert out["decision"].reason == "fixed" and out["decision"].config == Config("stuff", 1)
    # The conversation makes the prompt, hence its KV need, larger than the bare question's.
    assert out["decision"].need_blocks > plain[0]["decision"].need_blocks
    # The context is the user's own Documents, among those the retriever returned.
    assert recorder.documents and kept(out["context"], recorder.documents)
    # The retriever's run is traced under the chain's.
    assert recorder.retriever_parents == recorder.chain_runs and len(recorder.chain_runs) == 1

    # Streaming, adaptive, with a cap on the chunks.
    recorder = RetrievalRecorder()
    chunks = [
        c
        async for c in chain.astream(
            {"input": questions[2]},
            config={"configurable": {"max_chunks": 2}, "callbacks": [recorder]},
        )
    ]
    assert key_order(chunks) == ["input", "answer", "context", "decision"]
    assert chunks[0] == {"input": questions[2]}
    whole = functools.reduce(operator.add, chunks)
    assert whole["decision"].reason == "fit"  # the space is clipped to the 2 chunks allowed
    assert 1 <= len(whole["context"]) <= whole["decision"].config.num_chunks <= 2
    assert kept(whole["context"], recorder.documents)


async def test_blocking_calls_on_the_engines_loop_are_refused(chain, questions) -> None:
    # This loop is the engine's: a blocking call here would deadlock, so it is a clear error.
    with pytest.raises(InvalidRequest, match="ainvoke"):
        chain.invoke({"input": questions[0]})
    with pytest.raises(InvalidRequest, match="'input' key"):
        await chain.ainvoke({"question": questions[0]})


async def test_from_openai_url_in_plain_code(vllm_server, retriever, questions) -> None:
    def program() -> tuple[RagctlRetrievalChain, dict, dict]:
        # No event loop anywhere in this code: the chain runs its own.
        with RagctlRetrievalChain.from_openai(
            retriever,
            base_url=vllm_server.url + "/v1",
            model=vllm_server.model,
            api_key="none",
            answer_max_tokens=ANSWER_TOKENS,
            policy=NO_GOLDEN,
        ) as chain:
            adaptive = chain.invoke({"input": questions[0]})
        # A generic OpenAI-compatible endpoint has no vLLM /metrics: KV memory is unknown.
        with RagctlRetrievalChain.from_openai(
            retriever,
            vllm_server.url,
            model=vllm_server.model,
            kv_metrics=False,
            answer_max_tokens=ANSWER_TOKENS,
        ) as generic:
            fixed = generic.invoke(
                {"input": questions[1]}, {"configurable": {"ragctl_config": "stuff:2"}}
            )
        return chain, adaptive, fixed

    chain, adaptive, fixed = await asyncio.to_thread(program)
    assert isinstance(chain.engine, RemoteEngine) and chain.engine.has_kv_metrics
    d = adaptive["decision"]
    assert d.reason == "fit" and d.kv.source == "metrics"
    assert isinstance(adaptive["answer"], str) and adaptive["context"]
    assert fixed["decision"].kv.source == "unknown"
    assert fixed["decision"].config == Config("stuff", 2) and len(fixed["context"]) <= 2
    with pytest.raises(InvalidRequest, match="closed"):
        chain.invoke({"input": questions[0]})
