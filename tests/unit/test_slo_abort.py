"""SLO mitigation `abort` (on in `deadline`): a request still running at its SLO is stopped
there, its engine calls aborted and its blocks released, counted as a violation and as
aborted; the server answers it with OpenAI error JSON (504) that the official client does not
retry on its own. Over the fake engine; the real engine's abort-on-cancel is tested in
tests/integration."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import openai
import pytest

from ragctl.errors import DeadlineExceeded, SLODeadlineExceeded
from ragctl.evaluation.summaries import slo_summary
from ragctl.scheduler.slo import MITIGATION_MODES, Mitigation, SLOTracker
from ragctl.server.app import ServerOptions, create_app
from ragctl.service import Service
from ragctl.settings import Settings
from ragctl.types import Config
from tests.unit.test_controller import NO_GOLDEN, RULES, FakeEngine, FakeProfiler, controller

QUESTION = "Where was Super Bowl 50 played?"


def test_deadline_is_admission_plus_abort_and_abort_is_its_own_mechanism() -> None:
    deadline = Mitigation.parse("deadline")
    assert deadline.abort and deadline.shed and deadline.label == "deadline"
    assert not Mitigation.parse("admission").abort  # admission's behaviour is unchanged
    alone = Mitigation.parse("abort")
    assert alone.abort and not alone.shed and alone.label == "abort"
    assert MITIGATION_MODES["deadline"] == MITIGATION_MODES["admission"] | {"abort"}


async def test_a_request_running_at_its_slo_is_stopped_and_its_engine_call_aborted() -> None:
    engine = FakeEngine()
    engine.hold = asyncio.Event()  # never set: the call runs until it is cancelled
    ctl = controller(engine, slo=SLOTracker(Mitigation.parse("abort")))
    with pytest.raises(SLODeadlineExceeded, match="stopped by its SLO of 200 ms") as raised:
        await asyncio.wait_for(ctl.aask(QUESTION, Config("stuff", 1), slo_ms=200), 10)
    assert isinstance(raised.value, DeadlineExceeded) and raised.value.http_status == 504
    assert engine.started.is_set() and engine.cancelled.is_set()
    assert ctl.admission.ledger.reserved == 0 and not ctl.slo.inflight
    c = ctl.slo.counters
    assert (c["requests"], c["violated"], c["aborted"]) == (1, 1, 1)
    # Requests that make their SLO, and requests without one, are not touched.
    engine.hold.set()
    answer = await ctl.aask(QUESTION, Config("stuff", 1), slo_ms=600_000)
    assert answer.decision.slo is not None and answer.decision.slo.met
    assert (await ctl.aask(QUESTION, Config("stuff", 1))).decision.slo is None
    assert ctl.slo.counters["aborted"] == 1


async def test_without_abort_a_late_request_is_still_answered() -> None:
    engine = FakeEngine()
    engine.hold = asyncio.Event()
    ctl = controller(engine, slo=SLOTracker(Mitigation.parse("admission")))
    task = asyncio.ensure_future(ctl.aask(QUESTION, Config("stuff", 1), slo_ms=50))
    await asyncio.sleep(0.2)  # well past its SLO
    engine.hold.set()
    answer = await asyncio.wait_for(task, 10)
    assert answer.decision.slo is not None and not answer.decision.slo.met
    assert ctl.slo.counters["aborted"] == 0 and not engine.cancelled.is_set()


def test_an_aborted_request_leaves_a_lower_bound_in_the_record_shedding_reads() -> None:
    now = [0.0]
    tracker = SLOTracker(Mitigation.parse("deadline"), clock=lambda: now[0])
    t = tracker.start(slo_ms=1000)
    assert tracker.abort_in(t) == pytest.approx(1.0)
    t.synthesis_start, t.predicted_s = 0.2, 0.4  # planned at 0.4 s of synthesis
    now[0] = 1.0
    record = tracker.finish(t, ok=False, aborted=True)
    assert record is not None and not record.met
    # It ran 0.8 s of synthesis and was not done: at least twice its prediction.
    assert list(tracker.ratios) == [pytest.approx(2.0)]
    assert tracker.counters["aborted"] == 1
    # Without `abort` nothing is stopped.
    off = SLOTracker(Mitigation.parse("admission"), clock=lambda: now[0])
    assert off.abort_in(off.start(slo_ms=1000)) is None


def test_an_aborted_row_is_a_violation_and_counted_as_aborted() -> None:
    rows = [
        {"slo_ms": 1000, "delay_s": 0.5, "error": None,
         "decision": {"slo": {"plan_action": "none"}}},
        {"slo_ms": 1000, "delay_s": 1.0, "error": "SLODeadlineExceeded: stopped at its SLO"},
    ]  # fmt: skip
    s = slo_summary(rows)
    assert s is not None and (s.requests, s.met, s.violations) == (2, 1, 1)
    assert s.plan_actions == {"aborted": 1}


async def test_server_answers_504_slo_deadline_exceeded_and_the_client_does_not_retry() -> None:
    engine = FakeEngine()
    engine.hold = asyncio.Event()
    settings = Settings(slo_mitigation="priority,pause,triage,abort")
    service = Service(settings, engine, FakeProfiler(), RULES)  # type: ignore[arg-type]
    ctl = controller(engine, slo=service.slo)  # the tracker /metrics reads
    service.controllers["squad"] = ctl
    app = create_app(service, ServerOptions("squad"))
    transport = httpx.ASGITransport(app=app)
    messages = [{"role": "user", "content": QUESTION}]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        body = {"model": "ragctl/auto", "messages": messages, "slo_ms": 100}
        resp = await http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 504, resp.text
        err = resp.json()["error"]
        assert err["code"] == "slo_deadline_exceeded" and "stopped by its SLO" in err["message"]
        assert resp.headers["x-should-retry"] == "false"
        client = openai.AsyncOpenAI(
            base_url="http://t/v1", api_key="none", http_client=http, max_retries=2
        )
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(
                model="ragctl/auto", messages=messages, extra_body={"slo_ms": 100}
            )
        assert raised.value.status_code == 504
        metrics = (await http.get("/metrics")).text
    assert ctl.slo.counters["aborted"] == 2  # one per request: no retry reached the server
    assert 'ragctl_slo_plan_actions_total{action="aborted"} 2.0' in metrics
    assert 'outcome="timeout"' in metrics


async def test_an_infinite_slo_is_none_whatever_the_default() -> None:
    """What `eval run`'s warm-ups send: they are not measured, and must not be stopped."""
    engine = FakeEngine()
    tracker = SLOTracker(Mitigation.parse("deadline"))
    ctl = controller(engine, slo=tracker, policy=replace(NO_GOLDEN, slo_ms=1))  # a 1 ms default
    answer = await ctl.aask(QUESTION, Config("stuff", 1), slo_ms=float("inf"))
    assert answer.decision.slo is None and ctl.slo.counters["requests"] == 0
    with pytest.raises(SLODeadlineExceeded):  # the default applies without it
        engine.hold = asyncio.Event()
        await asyncio.wait_for(ctl.aask(QUESTION, Config("stuff", 1)), 10)


def test_a_request_doomed_even_at_the_predictors_best_luck_is_stopped_once() -> None:
    now = [0.0]
    tracker = SLOTracker(Mitigation.parse("deadline"), clock=lambda: now[0])
    tracker.stats.observe("answer", "stuff:1", 5.0)  # stuff:1's answer takes 5 s

    def request(slo_ms: float) -> tuple:
        t = tracker.start(slo_ms=slo_ms)
        stops: list[float] = []
        t.stop = lambda: stops.append(now[0])
        return t, stops

    doomed, doomed_stops = request(2000)
    fine, fine_stops = request(10_000)
    unplanned, unplanned_stops = request(2000)  # its time left is not predicted yet
    for t in (doomed, fine):
        tracker.planned(t, Config("stuff", 1))
        tracker.enter(t, "answer")
    tracker.check()
    assert doomed_stops == [0.0] and doomed.stopped and not fine_stops and not unplanned_stops
    now[0] = 1.0
    tracker.check()
    assert doomed_stops == [0.0]  # stopped once
    assert tracker.counters["stopped_early"] == 1
    # The same under a mitigation without `abort`: flagged, never stopped.
    off = SLOTracker(Mitigation.parse("admission"), clock=lambda: now[0])
    off.stats.observe("answer", "stuff:1", 5.0)
    t = off.start(slo_ms=2000)
    t.stop = lambda: pytest.fail("stopped without abort")
    off.planned(t, Config("stuff", 1))
    off.enter(t, "answer")
    assert off.check() == 1 and not t.stopped


async def test_the_controller_stops_a_doomed_request_before_its_deadline() -> None:
    engine = FakeEngine()
    engine.hold = asyncio.Event()
    ctl = controller(engine, slo=SLOTracker(Mitigation.parse("abort")))
    ctl.slo.stats.observe("answer", "stuff:1", 600.0)  # the record: ten minutes
    # An SLO of a minute: stopped as soon as its calls are about to go, not after a minute.
    with pytest.raises(SLODeadlineExceeded, match="stopped by its SLO of 60000 ms"):
        await asyncio.wait_for(ctl.aask(QUESTION, Config("stuff", 1), slo_ms=60_000), 10)
    assert ctl.slo.counters["stopped_early"] == 1 and ctl.slo.counters["aborted"] == 1
    assert ctl.admission.ledger.reserved == 0 and not ctl.slo.inflight
