"""The LangChain adapter's pure parts: Documents -> Chunks, chunk ids, the chain's input checks
and chat-history conversion. No engine here (the real-engine tests are in
tests/integration/test_langchain.py); a word-counting tokenizer stands in for the model's."""

from __future__ import annotations

import asyncio
import importlib
import sys

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import (  # noqa: E402
    BaseCallbackHandler,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402

from ragctl.errors import InvalidRequest, MissingDependency, UserError  # noqa: E402
from ragctl.integrations.langchain import (  # noqa: E402
    DEFAULT_CHUNK_TOKENS,
    ChainRequest,
    LangChainRetriever,
    RagctlRetrievalChain,
    chunk_id_of,
    document_to_chunk,
    parse_input,
    to_messages,
)
from ragctl.types import AnswerOptions, Config, Message  # noqa: E402


class Words:
    """One token per word."""

    def count(self, text: str) -> int:
        return len(text.split())


class ListRetriever(BaseRetriever):
    """A real LangChain retriever that returns the same documents for every query."""

    docs: list[Document]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return self.docs


def doc(text: str, **metadata: object) -> Document:
    return Document(page_content=text, metadata=metadata)


# --- Documents -> Chunks ----------------------------------------------------------------------


def test_document_fields_become_chunk_fields() -> None:
    d = doc("Denver won.", id="sb50#0", doc_id="sb50", source="wiki", title="Super Bowl", score=0.7)
    c = document_to_chunk(d, n_tokens=2)
    assert (c.id, c.doc_id, c.title, c.text, c.n_tokens, c.score) == (
        "sb50#0", "sb50", "Super Bowl", "Denver won.", 2, 0.7,
    )  # fmt: skip
    # doc_id falls back to the source, then to the chunk id; no score, no title.
    assert document_to_chunk(doc("x", id="a", source="s.txt"), 1).doc_id == "s.txt"
    bare = document_to_chunk(doc("x", id="a"), 1)
    assert (bare.doc_id, bare.title, bare.score) == ("a", "", None)
    # A reranker's relevance_score counts; a score that is not a number does not.
    assert document_to_chunk(doc("x", relevance_score=3), 1).score == 3.0
    assert document_to_chunk(doc("x", score="high"), 1).score is None


def test_chunk_ids_are_stable() -> None:
    # metadata["id"] first, then the Document's own id (vector stores set it), then a hash.
    assert chunk_id_of(Document(page_content="t", id="store-1", metadata={"id": 7})) == "7"
    assert chunk_id_of(Document(page_content="t", id="store-1")) == "store-1"
    hashed = chunk_id_of(doc("Super Bowl 50 was played in Santa Clara."))
    assert hashed.startswith("lc-") and len(hashed) == 3 + 16
    # The same text gives the same id from a new object (and in any process: no hash()).
    assert chunk_id_of(doc("Super Bowl 50 was played in Santa Clara.", title="t")) == hashed
    assert chunk_id_of(doc("Super Bowl 51 was played in Houston.")) != hashed
    assert chunk_id_of(doc("x", id="")) == chunk_id_of(doc("x"))


def test_search_uses_a_prefix_and_keeps_the_users_documents() -> None:
    docs = [
        doc("one two three", id="a"),
        doc("   ", id="blank"),  # no text: left out
        doc("four five", id="b"),
        doc("one two three", id="a"),  # the same chunk again: left out
        doc("six", id="c"),
        doc("seven eight", id="d"),
    ]
    adapter = LangChainRetriever(ListRetriever(docs=docs), Words())
    chunks = adapter.search("q", 3)
    assert [c.id for c in chunks] == ["a", "b", "c"]
    assert [c.n_tokens for c in chunks] == [3, 2, 1]
    # The Documents the chunks came from are the retriever's own objects.
    originals = [docs[0], docs[2], docs[4]]
    assert all(adapter.document(c) is d for c, d in zip(chunks, originals, strict=True))
    # More than the retriever has: all of them.
    assert len(adapter.search("q", 30)) == 4


def test_forgotten_chunks_come_back_as_new_documents() -> None:
    adapter = LangChainRetriever(ListRetriever(docs=[]), Words(), keep_documents=1)
    first, second = adapter.to_chunks([doc("a b", id="1", title="T"), doc("c", id="2")])
    assert adapter.document(second).page_content == "c"
    rebuilt = adapter.document(first)  # only one is kept
    assert rebuilt.page_content == "a b"
    assert rebuilt.metadata == {"id": "1", "doc_id": "1", "title": "T"}


def test_collection_info_defaults_estimate_and_override() -> None:
    docs = [doc("a b c d", id="1"), doc("e f", id="2")]
    adapter = LangChainRetriever(ListRetriever(docs=docs), Words())
    info = adapter.collection
    assert (info.name, info.metadata, info.chunk_tokens) == (
        "langchain", "a document collection", DEFAULT_CHUNK_TOKENS,
    )  # fmt: skip
    adapter.search("q", 5)
    assert adapter.collection.chunk_tokens == 3  # mean of 4 and 2
    given = LangChainRetriever(
        ListRetriever(docs=docs), Words(), name="wiki", metadata="Wikipedia", chunk_tokens=120
    )
    given.search("q", 5)
    assert (given.collection.name, given.collection.chunk_tokens) == ("wiki", 120)


def test_adapter_refuses_what_is_not_a_retriever() -> None:
    with pytest.raises(InvalidRequest, match="BaseRetriever"):
        LangChainRetriever(lambda q: [], Words())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="chunk_tokens"):
        LangChainRetriever(ListRetriever(docs=[]), Words(), chunk_tokens=0)
    adapter = LangChainRetriever(ListRetriever(docs=[]), Words())
    with pytest.raises(InvalidRequest, match="not a Document"):
        adapter.to_chunks(["plain text"])  # type: ignore[list-item]


# --- the chain's input ------------------------------------------------------------------------


def test_input_is_create_retrieval_chains() -> None:
    assert parse_input({"input": "Who won?", "extra": 1}) == ChainRequest("Who won?")
    with pytest.raises(InvalidRequest, match="needs an 'input' key") as err:
        parse_input({"question": "Who won?"})
    assert "question" in str(err.value)  # the keys it got
    assert isinstance(err.value, UserError) and err.value.http_status == 400
    with pytest.raises(InvalidRequest, match="takes a dict"):
        parse_input("Who won?")
    with pytest.raises(InvalidRequest, match="string"):
        parse_input({"input": 42})
    with pytest.raises(InvalidRequest, match="empty"):
        parse_input({"input": "  "})


def test_chat_history_becomes_messages() -> None:
    history = [
        SystemMessage("Be brief."),
        HumanMessage("Tell me about Super Bowl 50."),
        AIMessage("Denver beat Carolina."),
        ToolMessage("{}", tool_call_id="t1"),  # tool traffic is not conversation
    ]
    assert to_messages(history) == (
        Message("system", "Be brief."),
        Message("user", "Tell me about Super Bowl 50."),
        Message("assistant", "Denver beat Carolina."),
    )
    pairs = [("human", "hi"), ("ai", "hello"), {"role": "user", "content": "and?"}]
    request = parse_input({"input": "Where?", "chat_history": pairs})
    assert request.history == (
        Message("user", "hi"), Message("assistant", "hello"), Message("user", "and?"),
    )  # fmt: skip
    assert parse_input({"input": "q", "chat_history": []}).history == ()
    with pytest.raises(InvalidRequest, match="chat_history"):
        parse_input({"input": "q", "chat_history": "hi"})
    with pytest.raises(InvalidRequest, match="chat_history"):
        parse_input({"input": "q", "chat_history": [("wizard", "hi")]})


def test_ragctl_options_come_from_configurable() -> None:
    request = parse_input(
        {"input": "q"}, {"configurable": {"ragctl_config": "stuff:5", "max_chunks": 4}}
    )
    assert request.config == Config("stuff", 5) and request.max_chunks == 4
    fixed = Config("map_reduce", 3, 50)
    assert parse_input({"input": "q"}, {"configurable": {"ragctl_config": fixed}}).config == fixed
    assert parse_input({"input": "q"}, {"configurable": {}}).config is None
    with pytest.raises(InvalidRequest, match="ragctl_config"):
        parse_input({"input": "q"}, {"configurable": {"ragctl_config": "stuff"}})
    with pytest.raises(InvalidRequest, match="ragctl_config"):
        parse_input({"input": "q"}, {"configurable": {"ragctl_config": 5}})
    for bad in (0, True, "3"):
        with pytest.raises(InvalidRequest, match="max_chunks"):
            parse_input({"input": "q"}, {"configurable": {"max_chunks": bad}})
    opts = {"answer_options": {"max_tokens": 8, "temperature": 0.5, "stop": "\n"}}
    assert parse_input({"input": "q"}, {"configurable": opts}).options == AnswerOptions(
        8, 0.5, stop=("\n",)
    )
    for bad_opts in ({"max_tokens": 0}, {"nope": 1}, "x"):
        with pytest.raises(InvalidRequest, match="answer_options"):
            parse_input({"input": "q"}, {"configurable": {"answer_options": bad_opts}})


def test_chain_needs_an_engine_or_a_url() -> None:
    retriever = ListRetriever(docs=[])
    with pytest.raises(InvalidRequest, match="either an engine or a base_url"):
        RagctlRetrievalChain(retriever)


def test_without_langchain_core_the_import_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name == "langchain_core" or name.startswith("langchain_core."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "ragctl.integrations.langchain")
    with pytest.raises(MissingDependency, match=r"ragctl\[langchain\]"):
        importlib.import_module("ragctl.integrations.langchain")


# --- the chain's event loops, over the fake engine of test_controller --------------------------


def fake_chain(docs: list[Document], **options: object) -> RagctlRetrievalChain:
    from tests.unit.test_controller import NO_GOLDEN, FakeEngine, FakeProfiler

    return RagctlRetrievalChain.from_engine(
        ListRetriever(docs=docs), FakeEngine(), profiler=FakeProfiler(), policy=NO_GOLDEN,
        **options,
    )  # fmt: skip


def test_a_chain_built_in_plain_code_runs_on_a_private_loop() -> None:
    docs = [doc("Denver won Super Bowl 50.", id="a"), doc("It was in Santa Clara.", id="b")]
    chain = fake_chain(docs)
    fixed = {"configurable": {"ragctl_config": "stuff:1"}}
    out = chain.invoke({"input": "Who won?", "user": "u1"}, fixed)
    assert out["answer"] == "Denver" and out["user"] == "u1"
    assert out["context"][0] is docs[0]  # the retriever's own Document
    adaptive = asyncio.run(chain.ainvoke({"input": "Who won?"}))  # from another loop
    assert adaptive["decision"].reason == "fit"  # the fake engine's cache is idle
    assert [o["answer"] for o in chain.batch([{"input": "a?"}, {"input": "b?"}], fixed)] == [
        "Denver", "Denver",
    ]  # fmt: skip
    # The fake engine cannot stream: the answer comes as one delta, then context and decision.
    assert [sorted(c) for c in chain.stream({"input": "a?"}, fixed)] == [
        ["input"], ["answer"], ["context", "decision"],
    ]  # fmt: skip
    home = chain.controller.bridge.loop
    assert set(chain.engine.loops) == {home}
    chain.close()
    assert home.is_closed() and not chain.engine.closed  # not the chain's engine
    with pytest.raises(InvalidRequest, match="closed"):
        chain.invoke({"input": "Who won?"})


class Runs(BaseCallbackHandler):
    """The chain's runs and the parents of the retriever's runs, as LangChain reports them."""

    def __init__(self) -> None:
        self.chains: list[object] = []
        self.retriever_parents: list[object] = []

    def on_chain_start(self, serialized, inputs, *, run_id, **kwargs) -> None:
        if kwargs.get("name") == "RagctlRetrievalChain":
            self.chains.append(run_id)

    def on_retriever_end(self, documents, *, parent_run_id, **kwargs) -> None:
        self.retriever_parents.append(parent_run_id)


def test_the_retrievers_run_nests_under_the_chains_in_every_form() -> None:
    chain = fake_chain([doc("Denver won Super Bowl 50.", id="a")])
    runs = Runs()
    config = {"configurable": {"ragctl_config": "stuff:1"}, "callbacks": [runs]}
    chain.invoke({"input": "a?"}, config)
    chain.batch([{"input": "b?"}, {"input": "c?"}], config)
    list(chain.stream({"input": "d?"}, config))
    asyncio.run(chain.ainvoke({"input": "e?"}, config))
    chain.close()
    assert len(runs.chains) == 5 and sorted(map(str, runs.retriever_parents)) == sorted(
        map(str, runs.chains)
    )


async def test_a_chain_built_on_a_running_loop_calls_home_from_other_threads() -> None:
    chain = fake_chain([doc("Denver won Super Bowl 50.", id="a")], owns_engine=True)
    fixed = {"configurable": {"ragctl_config": "stuff:1"}}
    with pytest.raises(InvalidRequest, match="ainvoke"):
        chain.invoke({"input": "Who won?"}, fixed)
    out = await asyncio.to_thread(chain.invoke, {"input": "Who won?"}, fixed)
    assert out["answer"] == "Denver"
    assert (await chain.ainvoke({"input": "Who won?"}, fixed))["answer"] == "Denver"
    assert set(chain.engine.loops) == {asyncio.get_running_loop()}
    with pytest.raises(InvalidRequest, match="aclose"):
        chain.close()
    await chain.aclose()
    assert chain.engine.closed
