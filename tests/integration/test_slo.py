"""The SLO loop on the real engine: stage times learned from real requests, a request planned
within its deadline, flagged requests' calls sent with a better vLLM priority, new requests
paused while a flagged one can still make it, every mechanism switched off, shedding, and a
newcomer held while its prefill would push a request in flight past its deadline, its cost
read off the engine's own steps."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from ragctl.controller import Controller
from ragctl.engine.pool import label_of
from ragctl.policy import AdaptivePolicy, planned_work
from ragctl.retrieval.index import open_retriever
from ragctl.scheduler.slo import Mitigation, SLOTracker
from ragctl.types import Config

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

LONG = Config("map_reduce", 4, 40)
SHORT = Config("stuff", 1)


def make_controller(engine, settings, mitigation: str) -> Controller:
    retriever = open_retriever(settings, "squad", engine.tokenizer)
    policy = AdaptivePolicy(golden_every=0, mitigation=Mitigation.parse(mitigation))
    return Controller(engine, retriever, answer_max_tokens=16, policy=policy)


@pytest_asyncio.fixture(loop_scope="session")
async def learned(local_engine, small_squad) -> Controller:
    """A controller whose tracker has seen real stage times of two configurations."""
    settings, queries = small_squad
    ctl = make_controller(local_engine, settings, "adaptive")
    # The engine's first calls are slow (warm-up); keep them out of the averages.
    warm = ctl.synthesizer.plan(
        SHORT, queries[0].question, ctl.retriever.search(queries[0].question, 1)
    )
    await ctl.run_synthesis(warm)
    for q in queries[:2]:
        for config in (SHORT, LONG):
            await ctl.aask(q.question, config)
    return ctl


async def test_answers_carry_their_slo_record_and_stage_times_are_learned(
    learned, small_squad
) -> None:
    stats = learned.slo.stats
    assert stats.mean("answer", SHORT.label) > 0
    assert stats.mean("map", LONG.label) > 0 and stats.mean("reduce", LONG.label) > 0
    assert learned.slo.stats.predict_synthesis(LONG) > learned.slo.stats.predict_synthesis(SHORT)
    before = dict(learned.slo.counters)
    answer = await learned.aask(small_squad[1][2].question, SHORT, slo_ms=600_000)
    rec = answer.decision.slo
    assert rec is not None and rec.met and rec.slo_ms == 600_000 and rec.mitigation == "adaptive"
    assert rec.plan_action == "none" and not rec.flagged and rec.boosted_calls == 0
    assert rec.predicted_ms is not None and rec.predicted_ms > 0
    assert answer.to_dict()["decision"]["slo"]["met"] is True
    assert learned.slo.counters["met"] == before["met"] + 1
    # Without an SLO there is no record.
    assert (await learned.aask(small_squad[1][2].question, SHORT)).decision.slo is None
    # The predictor's error is measured against the baseline as requests finish.
    assert learned.slo.errors.n >= 3


async def test_an_unmeetable_slo_gets_the_fastest_plan_and_yields_its_calls(
    learned, small_squad
) -> None:
    answer = await learned.aask(small_squad[1][3].question, slo_ms=1)
    d = answer.decision
    rec = d.slo
    assert rec.plan_action == "unmeetable" and "slo-unmeetable" in d.flags
    # The fastest configuration the predictor knew of that fitted: far cheaper than the
    # rules' default space's largest, which the same query gets without an SLO.
    assert d.config.num_chunks <= 2
    # Triage: hopeless from its plan, its calls go behind everyone who can still make it.
    assert rec.flagged and rec.demoted_calls >= 1 and rec.boosted_calls == 0  # vLLM took +1
    assert rec.met is False
    unhurried = await learned.aask(small_squad[1][3].question)
    assert unhurried.decision.config.num_chunks > d.config.num_chunks


async def test_new_requests_pause_while_a_flagged_request_can_still_make_it(
    learned, small_squad
) -> None:
    q = [x.question for x in small_squad[1]]
    predicted_ms = learned.slo.stats.predict_synthesis(LONG) * 1000
    # Half the predicted time: flagged at once, yet its deadline is still ahead.
    slow = asyncio.ensure_future(learned.aask(q[4], LONG, slo_ms=predicted_ms / 2))
    async with asyncio.timeout(120):  # a test that never sees the flag fails, not hangs
        while not any(t.flagged for t in learned.slo.inflight.values()):
            await asyncio.sleep(0.01)
    newcomer = await learned.aask(q[5], SHORT, slo_ms=600_000)
    slow_answer = await slow
    assert slow_answer.decision.slo.flagged
    assert newcomer.decision.slo.paused_ms > 0
    assert learned.slo.paused_s > 0 and learned.slo.counters["paused_requests"] >= 1


async def test_mitigation_off_flags_but_changes_nothing(local_engine, small_squad) -> None:
    settings, queries = small_squad
    ctl = make_controller(local_engine, settings, "off")
    await ctl.aask(queries[0].question, SHORT)
    answer = await ctl.aask(queries[1].question, slo_ms=1)
    rec = answer.decision.slo
    assert rec.mitigation == "off" and rec.plan_action == "none"
    assert rec.flagged and rec.boosted_calls == 0 and rec.paused_ms == 0
    assert isinstance(ctl.slo, SLOTracker) and ctl.slo.counters["violated"] == 1


async def test_admission_sheds_a_request_that_cannot_make_it_before_any_engine_call(
    local_engine, small_squad
) -> None:
    from ragctl.errors import SLOUnmeetable

    settings, queries = small_squad
    ctl = make_controller(local_engine, settings, "admission")
    await ctl.aask(queries[0].question, SHORT)  # the engine has run a stage of this controller
    reserved = ctl.admission.ledger.reserved
    with pytest.raises(SLOUnmeetable, match="predicted to miss"):
        await ctl.aask(queries[1].question, slo_ms=1)
    assert ctl.admission.ledger.reserved == reserved == 0
    assert ctl.counters["shed"] == 1 and ctl.slo.counters["shed"] == 1
    assert ctl.slo.counters["violated"] == 1 and not ctl.slo.inflight
    # A request with time to spare is answered by the same controller.
    answer = await ctl.aask(queries[1].question, slo_ms=600_000)
    assert answer.decision.slo.met and answer.decision.slo.mitigation == "admission"


async def test_hold_keeps_a_newcomers_prefill_off_a_request_it_would_push_past_its_deadline(
    learned, small_squad
) -> None:
    """`hold` alone: a request in flight projected to end just inside its deadline, and a
    newcomer whose prefill (by the engine's step costs) would push it past: the newcomer waits,
    planned, until the first is done (or past saving), and is answered after."""
    settings, queries = small_squad
    ctl = make_controller(learned.engine, settings, "hold")
    ctl.slo.delay, ctl.slo.stats = learned.slo.delay, learned.slo.stats  # what it learned
    q_long, q_new = queries[4].question, queries[5].question

    def work(q: str, config: Config):
        chunks = ctl.retriever.search(q, config.num_chunks)
        return planned_work(ctl.synthesizer.sizer(q, chunks), config)

    projected = ctl.slo.predict(LONG, work(q_long, LONG))
    # What holding weighs: the engine's own step costs (its steps were logged all session).
    stall = ctl.slo.prefill_s(work(q_new, SHORT)[0], label_of(ctl.engine))
    assert projected is not None and stall > 0
    # Its deadline lies between its projected end and that end plus the newcomer's prefill.
    slow = asyncio.ensure_future(ctl.aask(q_long, LONG, slo_ms=(projected + 0.75 * stall) * 1000))
    async with asyncio.timeout(120):
        while not any(t.synthesis_start is not None for t in ctl.slo.inflight.values()):
            await asyncio.sleep(0.01)
    newcomer = await ctl.aask(q_new, SHORT, slo_ms=600_000)
    first = await slow
    assert newcomer.decision.slo.held_ms > 0 and newcomer.decision.slo.met
    assert first.decision.slo.held_ms == 0 and first.text
    assert ctl.slo.counters["held_requests"] == 1 and ctl.slo.counters["held_shed"] == 0
    assert first.decision.slo.mitigation == "hold" and not ctl.slo.inflight


async def test_the_engine_logs_its_steps_and_a_prefills_cost_is_fitted_from_them(
    learned, small_squad
) -> None:
    """The in-process engine's stat logger fills its step log; with requests arriving while
    others decode, the tracker fits the engine's step costs from it, and they explain the
    logged steps."""
    _, queries = small_squad
    steps = learned.engine.steps
    assert steps is not None and steps.count > 0
    assert all(s.seconds > 0 and s.decode_tokens >= 0 for s in steps.steps)

    async def staggered(i: int, q: str):
        await asyncio.sleep(0.2 * i)
        return await learned.aask(q, SHORT)

    await asyncio.gather(*(staggered(i, q.question) for i, q in enumerate(queries[:12])))
    costs = learned.slo.step_costs(label_of(learned.engine))
    assert costs is not None and costs.prefill_token_s > 0 and costs.steps >= 50
    logged = list(steps.steps)
    predicted = [
        costs.base_s
        + costs.prefill_token_s * s.prefill_tokens
        + costs.decode_token_s * s.decode_tokens
        for s in logged
    ]
    misses = sorted(abs(p - s.seconds) / s.seconds for p, s in zip(predicted, logged, strict=True))
    assert misses[len(misses) // 2] < 0.3
    prefill = [s.seconds for s in logged if s.prefill_tokens > 0]
    decode = [s.seconds for s in logged if s.prefill_tokens == 0]
    assert sum(prefill) / len(prefill) > sum(decode) / len(decode)
    assert learned.slo.snapshot()["step_costs"][label_of(learned.engine)]["steps"] == costs.steps
