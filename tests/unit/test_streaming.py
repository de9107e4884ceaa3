"""Streaming the final stage, the answer options and time to first token, over a fake engine
that streams word by word and can be held mid-answer: the controller (aask, astream, stream
share one path), the server's SSE (real deltas, error events, several prompts), LangChain's
astream and the engine ABC's default. The real-engine proofs (the openai client's first delta
before the engine finished, a disconnect freeing the KV cache) are in
tests/integration/test_streaming.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ragctl.controller import AnswerStream
from ragctl.engine.base import StreamEvent
from ragctl.errors import EngineUnavailable
from ragctl.server.app import ServerOptions, create_app
from ragctl.service import Service
from ragctl.settings import Settings
from ragctl.types import (
    Answer,
    AnswerOptions,
    Config,
    Generation,
    GenerationRequest,
)
from tests.unit.test_controller import RULES, FakeEngine, FakeProfiler, controller

ANSWER = " Denver Broncos won Super Bowl 50 . "


class StreamingEngine(FakeEngine):
    """`stream` sends ANSWER word by word (its edges' whitespace too); after the first word
    it waits for `release` (when set). Records the streamed requests, and the streams that
    finished and that were closed before their end."""

    def __init__(self, fail_mid_stream: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.release: asyncio.Event | None = None
        self.first_sent = asyncio.Event()
        self.streamed: list[GenerationRequest] = []
        self.finished_streams = 0
        self.aborted_streams = 0
        self.fail_mid_stream = fail_mid_stream

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.streamed.append(request)
        words = ANSWER.split(" ")
        done, held = False, False
        try:
            for i, w in enumerate(words):
                yield w + (" " if i < len(words) - 1 else "")
                if w and not held:  # after the first real word
                    held = True
                    self.first_sent.set()
                    if self.release is not None:
                        await self.release.wait()
                    if self.fail_mid_stream:
                        raise EngineUnavailable("the engine died mid-answer")
            finish = "length" if request.ignore_eos else "stop"
            yield Generation(ANSWER, 100, len(words), finish, (-0.1,) * len(words))
            done = True
            self.finished_streams += 1
        finally:
            if not done:
                self.aborted_streams += 1


# -- the answer's deltas -------------------------------------------------------------------


@given(st.lists(st.text(alphabet=" \nab.", max_size=6), max_size=8))
def test_deltas_join_to_the_stripped_answer(deltas: list[str]) -> None:
    sent: list[str] = []
    sink = AnswerStream(sent.append)
    for d in deltas:
        sink.feed(d)
    assert "".join(sent) == "".join(deltas).strip()
    assert all(sent)  # never an empty delta
    assert (sink.first_at is None) == (not sent)


def test_a_non_streamed_answer_is_sent_whole() -> None:
    sent: list[str] = []
    sink = AnswerStream(sent.append)
    sink.complete("Denver")
    sink.complete("again")  # once only
    assert sent == ["Denver"]


# -- the controller ------------------------------------------------------------------------


@pytest.mark.parametrize("config", [Config("stuff", 3), Config("map_reduce", 3, 20), None])
async def test_astream_yields_tokens_before_the_engine_has_finished(config) -> None:
    engine = StreamingEngine()
    engine.release = asyncio.Event()
    ctl = controller(engine)
    stream = ctl.astream("Who won Super Bowl 50?", config)
    async with asyncio.timeout(5):
        first = await anext(stream)
    assert first == "Denver" and engine.finished_streams == 0  # still held mid-answer
    engine.release.set()
    rest = [item async for item in stream]
    answer = rest[-1]
    assert isinstance(answer, Answer)
    assert first + "".join(rest[:-1]) == answer.text == ANSWER.strip()
    assert 0 < answer.timings["ttft"] <= answer.timings["total"]
    assert len(engine.streamed) == 1 and engine.streamed[0].tag == "answer"
    # aask is the same path: the same answer, and the final stage streamed there too.
    again = await ctl.aask("Who won Super Bowl 50?", config)
    assert again.text == answer.text and len(engine.streamed) == 2
    assert "ttft" in again.timings and again.finish_reason == "stop"


async def test_map_rerank_yields_its_chosen_answer_once_ranked() -> None:
    engine = StreamingEngine()
    ctl = controller(engine)
    items = [i async for i in ctl.astream("Who won?", Config("map_rerank", 3))]
    assert items[:-1] == ["Denver"] and isinstance(items[-1], Answer)
    assert engine.streamed == []  # selection, not a single answer call
    assert items[-1].timings["ttft"] == pytest.approx(items[-1].timings["total"], abs=0.05)


async def test_closing_the_stream_aborts_the_engine_call_and_frees_the_reservation() -> None:
    engine = StreamingEngine()
    engine.release = asyncio.Event()  # never set: the answer would hang
    ctl = controller(engine)
    stream = ctl.astream("Who won?", Config("stuff", 3))
    async with asyncio.timeout(5):
        assert await anext(stream) == "Denver"
        assert ctl.admission.ledger.reserved > 0
        await stream.aclose()
    assert engine.aborted_streams == 1 and engine.finished_streams == 0
    assert ctl.admission.ledger.reserved == 0


async def test_an_engine_failure_mid_stream_raises_from_astream() -> None:
    ctl = controller(StreamingEngine(fail_mid_stream=True))
    got: list[object] = []
    with pytest.raises(EngineUnavailable, match="mid-answer"):
        async for item in ctl.astream("Who won?", Config("stuff", 3)):
            got.append(item)
    assert got == ["Denver"] and ctl.admission.ledger.reserved == 0


def test_blocking_stream_on_the_private_loop() -> None:
    ctl = controller(StreamingEngine())
    try:
        items = list(ctl.stream("Who won?", Config("stuff", 3)))
        assert "".join(items[:-1]) == items[-1].text == ANSWER.strip()
        # Closing early cancels it.
        it = ctl.stream("Who won?", Config("stuff", 3))
        assert next(it) == "Denver"
        it.close()
    finally:
        ctl.close()


async def test_engines_that_cannot_stream_yield_the_text_once() -> None:
    engine = FakeEngine()
    request = GenerationRequest(prompt="x", max_tokens=4)
    events = [e async for e in engine.stream(request)]
    assert events[0] == "Denver" and isinstance(events[1], Generation)


# -- answer options ------------------------------------------------------------------------


async def test_options_reach_the_final_stage_only_and_max_tokens_sizes_the_plan() -> None:
    engine = StreamingEngine()
    ctl = controller(engine)  # answer budget 16
    base = await ctl.aask("Who won?", Config("map_reduce", 3, 20))
    opts = AnswerOptions(max_tokens=4, temperature=0.7, top_p=0.9, stop=("\n",), seed=3,
                         ignore_eos=True)  # fmt: skip
    answer = await ctl.aask("Who won?", Config("map_reduce", 3, 20), options=opts)
    reducer = engine.streamed[-1]
    assert (reducer.max_tokens, reducer.temperature, reducer.top_p) == (4, 0.7, 0.9)
    assert (reducer.stop, reducer.seed, reducer.ignore_eos) == (("\n",), 3, True)
    assert answer.max_tokens == 4 and base.max_tokens == 16
    assert answer.finish_reason == "length"  # the fake's ignore_eos answer
    assert answer.decision.need_blocks <= base.decision.need_blocks
    # The mappers keep the server's settings.
    mapper_tags = [t for t in engine.tags if t == "map"]
    assert mapper_tags
    # Above the collection's budget: clamped to it.
    big = await ctl.aask("Who won?", Config("stuff", 3), options=AnswerOptions(max_tokens=999))
    assert big.max_tokens == 16 and engine.streamed[-1].max_tokens == 16


async def test_map_rerank_answers_take_the_options() -> None:
    seen: list[GenerationRequest] = []

    class Recording(StreamingEngine):
        async def generate(self, requests):
            seen.extend(requests)
            return await super().generate(requests)

    ctl = controller(Recording())
    await ctl.aask("Who won?", Config("map_rerank", 2), options=AnswerOptions(3, 0.5))
    assert [(r.max_tokens, r.temperature) for r in seen] == [(3, 0.5), (3, 0.5)]


async def test_max_tokens_smaller_budget_needs_fewer_blocks() -> None:
    ctl = controller(StreamingEngine())
    ctl.synthesizer.answer_max_tokens = 400
    big = await ctl.aask("Who won?", Config("stuff", 3))
    small = await ctl.aask("Who won?", Config("stuff", 3), options=AnswerOptions(max_tokens=8))
    assert small.decision.need_blocks < big.decision.need_blocks


# -- the server ----------------------------------------------------------------------------


def server(engine: StreamingEngine, **options):
    ctl = controller(engine)
    service = Service(Settings(), engine, FakeProfiler(), RULES)  # type: ignore[arg-type]
    service.controllers["squad"] = ctl
    app = create_app(service, ServerOptions("squad", **options))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return client, ctl, app


def events_of(body: str) -> list[object]:
    out: list[object] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_chat_stream_sends_the_engine_deltas_then_done() -> None:
    engine = StreamingEngine()
    client, ctl, app = server(engine)
    body = {"model": "ragctl/stuff", "messages": [{"role": "user", "content": "Who won?"}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8}  # fmt: skip
    async with client:
        resp = await client.post("/v1/chat/completions", json=body)
        metrics = (await client.get("/metrics")).text
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = events_of(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == ANSWER.strip()
    deltas = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(deltas) == len(ANSWER.split())  # token-sized, as the engine sent them
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["ragctl"]["max_tokens"] == 8 and "ttft" in final["ragctl"]["timings"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert engine.streamed[-1].max_tokens == 8
    assert "ragctl_time_to_first_token_seconds_count" in metrics
    assert ctl.admission.ledger.reserved == 0


async def test_an_error_after_the_first_token_ends_the_stream_with_an_error_event() -> None:
    engine = StreamingEngine(fail_mid_stream=True)
    client, ctl, _ = server(engine)
    body = {"model": "ragctl/stuff", "messages": [{"role": "user", "content": "Who won?"}],
            "stream": True}  # fmt: skip
    async with client, asyncio.timeout(5):
        resp = await client.post("/v1/chat/completions", json=body)
        metrics = (await client.get("/metrics")).text
    assert resp.status_code == 200
    events = events_of(resp.text)
    assert events[-1] == "[DONE]"
    err = events[-2]
    assert isinstance(err, dict) and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "server_error" and "mid-answer" in err["error"]["message"]
    assert 'outcome="error"' in metrics and ctl.admission.ledger.reserved == 0


async def test_an_error_before_the_first_token_is_an_http_error() -> None:
    engine = StreamingEngine(fail_at=0)
    client, _, _ = server(engine)
    body = {"model": "ragctl/map_reduce", "messages": [{"role": "user", "content": "Who?"}],
            "stream": True}  # fmt: skip
    async with client:
        resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "engine_error"
    async with server(StreamingEngine())[0] as client2:
        bad = await client2.post("/v1/chat/completions", json={**body, "n": 2})
    assert bad.status_code == 400


async def test_completions_stream_several_prompts_by_index() -> None:
    client, _, _ = server(StreamingEngine())
    body = {"model": "ragctl/stuff", "prompt": ["Who won?", "Where?"], "stream": True}
    async with client:
        resp = await client.post("/v1/completions", json=body)
    events = events_of(resp.text)
    assert events[-1] == "[DONE]"
    by_index: dict[int, str] = {0: "", 1: ""}
    finals = set()
    for e in events[:-1]:
        assert isinstance(e, dict)
        choice = e["choices"][0]
        by_index[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finals.add(choice["index"])
    assert by_index == {0: ANSWER.strip(), 1: ANSWER.strip()} and finals == {0, 1}


async def test_non_streamed_responses_carry_the_real_finish_reason() -> None:
    client, _, _ = server(StreamingEngine())
    body = {"model": "ragctl/stuff", "messages": [{"role": "user", "content": "Who won?"}],
            "max_tokens": 5, "ignore_eos": True}  # fmt: skip
    async with client:
        resp = await client.post("/v1/chat/completions", json=body)
    data = resp.json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["message"]["content"] == ANSWER.strip()
    assert data["ragctl"]["max_tokens"] == 5


# -- LangChain -----------------------------------------------------------------------------


async def test_langchain_astream_yields_answer_tokens_as_they_come() -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    from ragctl.integrations.langchain import RagctlRetrievalChain

    class Docs(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager=None):
            return [Document(page_content=f"Super Bowl 50 fact {i}.", id=str(i)) for i in range(4)]

    engine = StreamingEngine()
    engine.release = asyncio.Event()
    chain = RagctlRetrievalChain.from_engine(Docs(), engine, profiler=FakeProfiler())
    fixed = {"configurable": {"ragctl_config": "stuff:2"}}
    stream = chain.astream({"input": "Who won?"}, fixed)
    async with asyncio.timeout(5):
        assert list(await anext(stream)) == ["input"]
        assert await anext(stream) == {"answer": "Denver"}
    assert engine.finished_streams == 0  # the engine is still mid-answer
    engine.release.set()
    rest = [c async for c in stream]
    total = {"answer": "Denver"}
    for c in rest:
        for k, v in c.items():
            total[k] = total.get(k, "") + v if k == "answer" else v
    assert total["answer"] == ANSWER.strip()
    assert len(total["context"]) == 2 and total["decision"].config == Config("stuff", 2)
    await chain.aclose()


# -- TTFT in bench load and eval summaries -------------------------------------------------


def test_load_results_report_time_to_first_token() -> None:
    from ragctl.loadtest import LoadResult

    r = LoadResult(3, 1, 3.0, latencies_s=[1.0, 2.0, 3.0], ttfts_s=[0.1, 0.2, 0.3], stream=True)
    d = r.to_dict()
    assert d["stream"] is True and d["ttft_p50_s"] == pytest.approx(0.2)
    assert d["ttft_mean_s"] == pytest.approx(0.2) and d["ttft_p95_s"] == pytest.approx(0.29)
    assert LoadResult(1, 1, 0.0).to_dict()["ttft_p50_s"] is None


def test_eval_summaries_give_ttft_mean_and_percentiles() -> None:
    from ragctl.evaluation.summaries import system_summary

    rows = [
        {"system": "ragctl", "query_id": str(i), "delay_s": 2.0 + i, "ttft_s": 0.5 + i / 10,
         "arrival_s": i, "end_s": i + 2, "error": None, "scores": {}}
        for i in range(5)
    ]  # fmt: skip
    s = system_summary(rows, None)
    assert s.ttft_n == 5 and s.ttft_mean_s == pytest.approx(0.7)
    assert s.ttft_p50_s == pytest.approx(0.7) and s.ttft_p95_s == pytest.approx(0.88)
    assert s.ttft_mean_s_ci is not None
    old = system_summary([{k: v for k, v in r.items() if k != "ttft_s"} for r in rows], None)
    assert old.ttft_n is None and old.ttft_p50_s is None


def test_alternating_runs_pair_each_question_and_balance_who_goes_first() -> None:
    from ragctl.loadtest import LoadResult, alternating

    plan = [alternating(i) for i in range(8)]
    assert [q for q, _ in plan] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s for _, s in plan] == [True, False, False, True, True, False, False, True]
    r = LoadResult(6, 1, 6.0, alternate=True)
    for q, streamed, ttft, lat in [(0, True, 0.5, 2.0), (0, False, 2.0, 2.0),
                                   (1, False, 3.0, 3.0), (1, True, 1.0, 3.2),
                                   (2, True, 0.4, 1.0)]:  # fmt: skip
        r.samples.append({"question": q, "stream": streamed, "ttft_s": ttft, "latency_s": lat})
    pairs = r.pairs()
    assert [(a["question"], a["stream"], b["stream"]) for a, b in pairs] == [
        (0, True, False), (1, True, False)]  # question 2 has no whole answer: unpaired
    modes = r.to_dict()["by_mode"]
    assert modes["streamed"]["n"] == 3 and modes["whole"]["n"] == 2
    assert modes["whole"]["ttft_mean_s"] == 2.5
