"""The adaptive path end to end on the real engine: profile -> rules -> best-fit -> synthesis,
the low-confidence and profiler-failure fallbacks, golden feedback, and a run under KV-memory
pressure where configurations shrink and requests queue but none is lost."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import pytest_asyncio

from ragctl.controller import Controller
from ragctl.policy import AdaptivePolicy
from ragctl.profiler import Profiler
from ragctl.retrieval.index import open_retriever
from ragctl.types import Config

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

ANSWER_TOKENS = 24


def make_controller(engine, settings, **kw) -> Controller:
    retriever = open_retriever(settings, "squad", engine.tokenizer)
    kw.setdefault("policy", AdaptivePolicy(golden_every=0))
    return Controller(engine, retriever, answer_max_tokens=ANSWER_TOKENS, **kw)


@pytest_asyncio.fixture(loop_scope="session")
async def controller(local_engine, small_squad) -> Controller:
    return make_controller(local_engine, small_squad[0])


def check_decision(answer, *, kv_total: int, reasons: tuple[str, ...] = ("fit",)) -> None:
    """`reasons`: what best-fit may have answered; on an idle engine the space fits."""
    d = answer.decision
    assert d.reason in reasons
    assert d.space is not None and d.need_blocks is not None and d.kv is not None
    assert d.kv.total_blocks == kv_total
    # Best-fit never chose more than was free minus what others had reserved.
    assert d.need_blocks <= d.kv.free_blocks - d.reserved_blocks
    if d.reason == "fit":
        assert d.config in d.space.configs()
    assert d.templates["profiler.profile"].startswith("v")
    assert {"retrieve", "profile", "queue", "synthesis", "total"} <= set(answer.timings)
    assert answer.text is not None and answer.chunks
    assert 0 < answer.timings["profile"] < answer.timings["total"]


async def test_adaptive_answer_carries_its_decision(controller, small_squad) -> None:
    kv = await controller.engine.kv_state()
    query = small_squad[1][0]
    answer = await controller.aask(query.question)
    check_decision(answer, kv_total=kv.total_blocks)
    d = answer.decision
    if d.profile_used:
        assert d.profile is not None and d.profile.confidence >= 0.9
        assert d.space.source not in ("history", "default")
    else:
        assert d.profile_note and d.space.source == "default"  # no history yet
    assert controller.counters["profiled"] == 1
    # Profiling alone (`ragctl profile`'s question) records nothing.
    outcome, choice = await controller.profile(query.question)
    assert outcome.template == "v1" and choice.space.methods
    assert controller.counters["profiled"] == 1
    # The record is JSON-ready for the CLI and the server.
    view = answer.to_dict()["decision"]
    assert view["space"]["methods"] and view["need_blocks"] == d.need_blocks


async def test_low_confidence_uses_recent_confident_spaces(controller, small_squad) -> None:
    questions = [q.question for q in small_squad[1][:3]]
    # Trust every profile: each space is recorded as history.
    controller.policy = replace(controller.policy, confidence_threshold=0.0)
    trusted = [await controller.aask(q) for q in questions[:2]]
    assert all(a.decision.profile_used for a in trusted)
    assert len(controller.history["squad"]) == 2
    # Trust none: the space now comes from that history, not from this query's profile.
    controller.policy = replace(controller.policy, confidence_threshold=1.01)
    answer = await controller.aask(questions[2])
    d = answer.decision
    assert not d.profile_used and d.profile_note.startswith("low-confidence")
    assert d.space.source == "history" and "low-confidence" in d.flags
    methods = {m for a in trusted for m in a.decision.space.methods}
    assert set(d.space.methods) == methods


async def test_profiler_failure_never_fails_the_request(local_engine, small_squad) -> None:
    # A profiler that cannot answer in time: the query falls back and is counted.
    controller = make_controller(
        local_engine, small_squad[0], profiler=Profiler(local_engine, timeout_s=0.001)
    )
    answer = await controller.aask(small_squad[1][1].question)
    d = answer.decision
    assert d.profile is None and d.profile_note.startswith("profiler error")
    assert "profiler-error" in d.flags and d.space.source == "default"
    assert controller.counters["profiler_errors"] == 1
    assert answer.text is not None and answer.chunks


async def test_golden_feedback_runs_in_the_background(local_engine, small_squad) -> None:
    policy = AdaptivePolicy(golden_every=2, golden_config=Config("map_reduce", 3, 30))
    controller = make_controller(local_engine, small_squad[0], policy=policy)
    for q in small_squad[1][:2]:
        await controller.aask(q.question)
    # The second query started one golden run; it finishes after the user's answer.
    assert len(controller._background) == 1
    await asyncio.gather(*controller._background)
    assert controller.counters["golden_runs"] == 1
    ok = controller.counters["golden_runs"] - controller.counters["golden_errors"]
    assert len(controller.profiler.examples.get("squad")) == ok
    kv = await local_engine.kv_state()
    assert controller.admission.ledger.reserved == 0 and kv.free_blocks == kv.total_blocks


async def test_fixed_configuration_still_reserves_and_releases(controller, small_squad) -> None:
    answer = await controller.aask(small_squad[1][0].question, Config("stuff", 3))
    assert answer.decision.reason == "fixed" and answer.decision.need_blocks >= 1
    assert controller.admission.ledger.reserved == 0


async def test_memory_pressure_shrinks_configurations_and_loses_nothing(
    model_path, small_squad
) -> None:
    """A KV cache of a few thousand tokens, 10 queries at once: later decisions see less free
    memory, choose smaller configurations or queue, and every query is answered."""
    from ragctl.engine.local import LocalEngine

    engine = LocalEngine.start(model_path, kv_cache_gib=1, kv_cache_blocks=24, max_model_len=2048)
    try:
        kv = await engine.kv_state()
        # Trust every profile so each query's own space is used.
        controller = make_controller(
            engine, small_squad[0], policy=AdaptivePolicy(golden_every=0, confidence_threshold=0)
        )
        questions = [q.question.strip() for q in small_squad[1]] * 2  # 12 concurrent queries
        answers = await asyncio.gather(*(controller.aask(q) for q in questions))
        assert [a.question for a in answers] == questions  # none lost, in order
        for a in answers:
            # Under pressure a query may get a cheaper configuration outside its space.
            check_decision(a, kv_total=kv.total_blocks, reasons=("fit", "fallback"))
        decisions = [a.decision for a in answers]
        # 12 plans of >= 3 blocks each cannot all fit 23 blocks at once: some had to take a
        # cheaper configuration or wait for memory, and they saw others' reservations.
        seen = [(d.config.label, d.reason, d.queued, d.need_blocks, d.kv.free_blocks,
                 d.reserved_blocks) for d in decisions]  # fmt: skip
        assert any(d.queued or d.reason == "fallback" for d in decisions), seen
        assert any(d.reserved_blocks > 0 or d.kv.free_blocks < kv.total_blocks for d in decisions)
        assert controller.admission.ledger.reserved == 0
        assert len(controller.admission) == 0
    finally:
        await engine.aclose()
