"""The whole fixed-configuration path — retrieve, plan, run on the engine, record — with every
method, on the real in-process engine and on a real vLLM server, over a small real collection
(SQuAD paragraphs, the gold ones of the chosen questions among them)."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from ragctl.controller import Controller
from ragctl.engine.remote import RemoteEngine
from ragctl.retrieval.index import open_retriever
from ragctl.settings import Settings
from ragctl.types import Answer, Config, Query

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

CONFIGS = [Config("map_rerank", 4), Config("stuff", 4), Config("map_reduce", 4, 32)]
STAGES = {"map_rerank": ["rerank"], "stuff": ["answer"], "map_reduce": ["map", "reduce"]}
ANSWER_TOKENS = 24


def make_controller(engine, settings: Settings) -> Controller:
    retriever = open_retriever(settings, "squad", engine.tokenizer)
    return Controller(engine, retriever, answer_max_tokens=ANSWER_TOKENS)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def local_controller(local_engine, small_squad) -> Controller:
    return make_controller(local_engine, small_squad[0])


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def remote_controller(vllm_server, small_squad):
    engine = await RemoteEngine.connect(vllm_server.url, timeout_s=300)
    yield make_controller(engine, small_squad[0])
    await engine.aclose()


def check(answer: Answer, config: Config, controller: Controller, query: Query) -> None:
    assert answer.decision.config == config and answer.decision.reason == "fixed"
    assert answer.decision.templates == {
        "map_rerank": "v1",
        "stuff": "v1",
        "map": "v1",
        "reduce": "v1",
    }
    kv = answer.decision.kv
    assert kv is not None and kv.total_blocks > 0 and 0 <= kv.free_blocks <= kv.total_blocks
    assert isinstance(answer.text, str)
    assert len(answer.chunks) == 4  # four short paragraphs always fit
    # Retrieval found the gold paragraph for these questions.
    assert set(query.gold_doc_ids) & {c.doc_id for c in answer.chunks}

    assert [s.name for s in answer.stages] == STAGES[config.method]
    calls = {s.name: s for s in answer.stages}
    # Token accounting: what the planner predicted is what the engine reports.
    est = controller.synthesizer.estimate_calls(config, answer.question, list(answer.chunks))
    for stage in ("rerank", "answer", "map"):
        if stage in calls:
            expected = [e for e in est if e.stage == stage]
            assert calls[stage].calls == len(expected)
            assert calls[stage].prompt_tokens == sum(e.prompt_tokens for e in expected)
            assert 0 < calls[stage].output_tokens <= sum(e.max_tokens for e in expected)
    if "reduce" in calls:
        assert calls["reduce"].calls == 1
        assert calls["reduce"].prompt_tokens <= est[-1].prompt_tokens
        assert len(answer.synthesis.intermediate) == 4
    if config.method == "map_rerank":
        assert answer.synthesis.source_chunk_id in answer.chunk_ids
        assert 0 < answer.synthesis.confidence <= 1
    assert answer.tokens["calls"] == sum(s.calls for s in answer.stages)
    t = answer.timings
    assert 0 < t["retrieve"] < t["total"] and 0 < t["synthesis"] <= t["total"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
async def test_each_method_on_the_in_process_engine(local_controller, small_squad, config) -> None:
    query = small_squad[1][0]
    answer = await local_controller.aask(query.question, config)
    check(answer, config, local_controller, query)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
async def test_each_method_on_a_vllm_server(remote_controller, small_squad, config) -> None:
    query = small_squad[1][1]
    answer = await remote_controller.aask(query.question, config)
    check(answer, config, remote_controller, query)


async def test_concurrent_questions_share_the_engine(local_controller, small_squad) -> None:
    queries = small_squad[1][:4]
    config = Config("stuff", 3)
    engine = local_controller.engine
    task = asyncio.create_task(local_controller.abatch([q.question for q in queries], config))
    used = []
    while not task.done():
        used.append((await engine.kv_state()).used_blocks)
        await asyncio.sleep(0.02)
    answers = await task
    assert [a.question for a in answers] == [q.question for q in queries]
    assert all(a.tokens["calls"] == 1 and a.tokens["output"] > 0 for a in answers)
    # They ran in the engine together: at some step it held more KV blocks than the largest
    # single request can occupy (prompt + answer budget).
    block = (await engine.kv_state()).block_size
    one = max(-(-(a.tokens["prompt"] + ANSWER_TOKENS) // block) for a in answers)
    assert max(used) > one


async def test_a_question_that_cannot_fit_is_refused_before_any_call(local_controller) -> None:
    from ragctl.errors import InvalidRequest, PromptTooLong

    with pytest.raises(PromptTooLong):
        await local_controller.aask("why " * 5000, Config("stuff", 2))
    with pytest.raises(InvalidRequest):
        await local_controller.aask("   ", Config("stuff", 2))
    # The engine was not left with work: all of its KV cache is free again.
    await asyncio.sleep(0)
    kv = await local_controller.engine.kv_state()
    assert kv.free_blocks == kv.total_blocks
