"""SLO mitigation `hold` (on in `admission`): a planned request waits before its first engine
call while its prefill would push a request in flight past a deadline that request is projected
to meet; it is refused once its own prediction misses. The tracker's rule on a fake clock, then
through the controller over the fake engine (the real engine: tests/integration/test_slo.py)."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ragctl.errors import SLOUnmeetable
from ragctl.scheduler.cost import DelayModel, StageWork, prior_from_rates
from ragctl.scheduler.slo import MIN_RATIOS, Mitigation, SLOTracker, Tracked
from ragctl.server.metrics import SLOCollector
from ragctl.types import Config
from tests.unit.test_controller import FakeEngine, controller
from tests.unit.test_slo import Clock

STUFF1 = Config("stuff", 1)
QUESTION = "Where was Super Bowl 50 played?"


def prefill_bound() -> DelayModel:
    """An engine whose time is its prefill: 100 prompt tokens a second, decoding free."""
    return DelayModel(prior_from_rates(100.0, 1e9), prior_measured=True)


def tracker(mode: str = "admission") -> tuple[SLOTracker, Clock]:
    clock = Clock()
    return SLOTracker(Mitigation.parse(mode), clock=clock, delay=prefill_bound()), clock


def planned(t: SLOTracker, slo_ms: float | None, prompt: int) -> Tracked:
    k = t.start(slo_ms)
    t.planned(k, STUFF1, work=(StageWork("answer", 1, prompt, 1, 1),))
    return k


def started(t: SLOTracker, slo_ms: float | None, prompt: int, engine: str = "") -> Tracked:
    k = planned(t, slo_ms, prompt)
    k.engine = engine  # what `hold` records
    t.enter(k, "answer")
    return k


def test_modes_and_the_union_syntax() -> None:
    assert Mitigation.parse("admission").hold and not Mitigation.parse("adaptive").hold
    old = Mitigation.parse("adaptive+shed")  # admission as it was before holding
    assert old == Mitigation(shed=True) and old.label == "priority,pause,config,triage,shed"
    assert Mitigation.parse("adaptive+shed+hold").label == "admission"
    assert Mitigation.parse("off,hold") == Mitigation(
        priority=False, pause=False, config=False, triage=False, hold=True
    )


def test_each_prefill_started_beside_a_request_is_added_to_its_projection() -> None:
    t, clock = tracker()
    k = started(t, 2500, 100)  # projected 1 s from 100: ends at 101, deadline 102.5
    assert k.projected_s == pytest.approx(1.0, abs=1e-3) and k.stalls_s == 0
    # A 100-token prefill would end it at 102: in time, so a newcomer may start ...
    first = planned(t, None, 100)
    assert not t.threatened(first, t.delay.prefill_s(first.work[0]))
    t.enter(first, "answer")
    assert k.stalls_s == pytest.approx(1.0)  # ... and its prefill is on k's projection now
    # The next 100-token prefill would end k at 103, past 102.5; a 40-token one at 102.4.
    assert t.threatened(planned(t, None, 100), 1.0)
    assert not t.threatened(planned(t, None, 40), 0.4)
    # A request projected to miss anyway (or past its deadline) is not protected.
    late = started(t, 500, 100)  # projected to end at 101 with its deadline at 100.5
    assert late.projected_s is not None and late.stalls_s == 0
    clock.now = 102.6  # k is past its deadline now: nothing left to protect
    assert not t.threatened(planned(t, None, 100), 1.0)
    record = t.finish(k, ok=True)  # what holding projected, on the request's record
    assert record is not None and not record.met
    assert record.projected_ms == pytest.approx(1000, abs=1) and record.stalls_ms > 1000


def test_in_a_pool_a_prefill_stalls_and_threatens_its_own_engine_only() -> None:
    t, _ = tracker()
    a = started(t, 2500, 100, engine="a")  # ends at 101, deadline 102.5
    b = started(t, 2500, 100, engine="b")
    assert a.stalls_s == b.stalls_s == 0
    newcomer = planned(t, None, 200)  # a 2 s prefill would push either past
    newcomer.engine = "b"
    assert t.threatened(newcomer, 2.0)
    t.enter(newcomer, "answer")
    assert a.stalls_s == 0 and b.stalls_s == pytest.approx(2.0)
    newcomer.engine = "c"
    assert not t.threatened(newcomer, 2.0)


def test_projections_are_read_at_the_records_quantile() -> None:
    t, clock = tracker()
    assert t.hold_scale() == 1.0
    for _ in range(MIN_RATIOS):
        k = started(t, None, 100)  # projected 1 s
        clock.now += 2.0  # took twice that
        t.finish(k, ok=True)
    assert t.hold_scale() == pytest.approx(2.0, rel=1e-3)
    k = started(t, 3500, 100)  # projected 2 s at that scale: ends 2 s from now
    assert t.threatened(planned(t, None, 200), 2.0)  # 4 s would miss 3.5 s
    assert not t.threatened(planned(t, None, 100), 1.0)  # 3 s would not
    assert t.snapshot()["hold_scale"] == pytest.approx(2.0, rel=1e-3)
    assert k.deadline is not None


async def test_a_held_request_goes_when_the_one_it_protects_finishes() -> None:
    t, clock = tracker()
    k = started(t, 1500, 100)
    j = planned(t, 10_000, 100)
    held = asyncio.create_task(t.hold(j))
    await asyncio.sleep(0.05)
    assert not held.done() and t.counters["held_requests"] == 1
    clock.now += 0.5
    t.finish(k, ok=True)
    assert await held is True
    assert j.held_s == pytest.approx(0.5) and t.held_s == pytest.approx(0.5)
    assert t.counters["held_shed"] == 0
    # Its record says what it was released on: its own 1 s (the last check, 0.5 s earlier).
    record = t.finish(j, ok=True)
    assert record is not None and record.hold_own_ms == pytest.approx(1000)
    assert k.hold_own is None  # never held


async def test_a_held_request_whose_own_deadline_goes_is_refused_or_goes_without_shedding() -> None:
    for mode, expected in (("admission", False), ("adaptive+hold", True)):
        t, clock = tracker(mode)
        started(t, 1500, 100)
        j = planned(t, 1800, 100)  # needs 1 s of its 1.8 s
        held = asyncio.create_task(t.hold(j))
        await asyncio.sleep(0.05)
        assert not held.done()
        clock.now += 0.9  # 1 s from now misses its deadline: waiting longer cannot help it
        assert await held is expected
        assert t.counters["held_shed"] == (0 if expected else 1)
        # What the check read when it gave up: 1 s of its own against 0.9 s left.
        assert j.hold_own == pytest.approx((1.0, 0.9))
        assert t.counters["shed"] == t.counters["held_shed"]


async def test_without_an_slo_a_newcomer_waits_at_most_max_pause_s() -> None:
    t, clock = tracker()
    started(t, 2500, 100)  # ends at 101 or later, deadline 102.5
    j = planned(t, None, 300)  # its 3 s prefill would push it past, for the next 2 s too
    held = asyncio.create_task(t.hold(j))
    await asyncio.sleep(0.05)
    assert not held.done()
    clock.now += t.mitigation.max_pause_s
    assert await held is True


async def test_without_hold_nothing_is_held() -> None:
    t, _ = tracker("adaptive+shed")
    started(t, 1500, 100)
    j = planned(t, None, 100)
    assert t.threatened(j, 1.0) and await t.hold(j) is True
    assert t.counters["held_requests"] == 0


async def test_through_the_controller_a_held_request_is_refused_before_any_engine_call() -> None:
    engine = FakeEngine()
    clock = Clock()
    slo = SLOTracker(Mitigation.parse("admission"), clock=clock, delay=prefill_bound())
    ctl = controller(engine, slo=slo)
    probe = await ctl.aask(QUESTION, STUFF1, slo_ms=600_000)
    assert probe.decision.slo is not None and probe.decision.slo.predicted_ms is not None
    predicted_ms = probe.decision.slo.predicted_ms
    assert predicted_ms > 100  # a prefill-bound prediction the fake clock can step through
    engine.hold = asyncio.Event()
    first = asyncio.create_task(ctl.aask(QUESTION, STUFF1, slo_ms=1.5 * predicted_ms))
    while len(engine.tags) < 2:  # the probe's call, then the first's
        await asyncio.sleep(0.01)
    second = asyncio.create_task(ctl.aask(QUESTION, STUFF1, slo_ms=1.5 * predicted_ms))
    await asyncio.sleep(0.1)
    assert not second.done() and slo.counters["held_requests"] == 1
    assert len(engine.tags) == 2  # the probe's call and the first's: nothing of the second
    clock.now += 0.6 * predicted_ms / 1000  # its own prediction from now misses its SLO
    with pytest.raises(SLOUnmeetable, match="held while its prefill") as refused:
        await second
    # It says in figures why: its own prediction against the seconds left, and its wait.
    assert re.search(r"predicted \d+\.\d\d s with -?\d+\.\d\d s left after \d+\.\d\d s held",
                     str(refused.value))  # fmt: skip
    assert ctl.counters["shed"] == 1 and len(engine.tags) == 2
    engine.hold.set()
    answer = await first
    assert answer.decision.slo is not None and answer.decision.slo.met
    assert ctl.admission.ledger.reserved == 0 and not slo.inflight
    # Released in time instead: held, then answered, its wait on its record.
    engine.hold = asyncio.Event()
    first = asyncio.create_task(ctl.aask(QUESTION, STUFF1, slo_ms=1.5 * predicted_ms))
    while len(engine.tags) < 3:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(ctl.aask(QUESTION, STUFF1, slo_ms=1.5 * predicted_ms))
    await asyncio.sleep(0.1)
    assert not second.done()
    clock.now += 0.1 * predicted_ms / 1000
    engine.hold.set()
    await first
    answer = await second
    assert answer.decision.slo is not None
    assert answer.decision.slo.held_ms == pytest.approx(0.1 * predicted_ms, rel=1e-6)
    # The server's /metrics reads the tracker's totals: two held, one of them refused.
    collector = SLOCollector()
    collector.snapshot = slo.snapshot()
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert "ragctl_slo_held_requests_total 2.0" in text
    assert 'ragctl_slo_plan_actions_total{action="shed"} 1.0' in text
