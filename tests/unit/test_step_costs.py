"""What a prefill costs the sequences beside it, measured on the engine's own steps: the step
log an engine fills (`engine.base.StepLog`), the fit (`scheduler.cost.fit_step_costs`), and the
SLO tracker reading it for holding (`SLOTracker.prefill_s`), with the delay model as fallback.
The real engine's log: tests/integration/test_slo.py."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ragctl.engine.base import StepLog
from ragctl.engine.pool import EnginePool, label_of
from ragctl.errors import InvalidRequest
from ragctl.scheduler.cost import MIN_PREFILL_STEPS, MIN_STEPS, StageWork, fit_step_costs
from ragctl.scheduler.slo import REFIT_STEPS, Mitigation, SLOTracker
from ragctl.server.metrics import SLOCollector
from tests.unit.test_controller import FakeEngine, controller
from tests.unit.test_slo import Clock
from tests.unit.test_slo_hold import planned, prefill_bound, started

BASE, PREFILL, DECODE = 0.03, 0.0008, 0.0005
"""A made-up engine: 30 ms a step, 0.8 ms per prompt token, 0.5 ms per sequence decoding."""


def run_engine(log: StepLog, steps: int, seed: int = 0, prefill_every: int = 10) -> None:
    """Log `steps` steps of the made-up engine (a prefill of 100-500 tokens every
    `prefill_every`, 1-8 sequences decoding, 1 ms of noise)."""
    rng = np.random.default_rng(seed)
    for i in range(steps):
        prefill = int(rng.integers(100, 500)) if i % prefill_every == 0 else 0
        decode = int(rng.integers(1, 9))
        seconds = BASE + PREFILL * prefill + DECODE * decode + rng.normal(0, 0.001)
        log.observe(seconds, prefill, decode)


def test_the_log_is_bounded_and_keeps_only_timed_steps() -> None:
    log = StepLog(maxlen=3)
    log.observe(0.2, 300, 2)
    log.observe(0.0, 0, 1)  # nothing timed it (no sequence decoded through it)
    log.observe(float("nan"), 0, 1)
    assert [(s.seconds, s.prefill_tokens, s.decode_tokens) for s in log.steps] == [(0.2, 300, 2)]
    for _ in range(5):
        log.observe(0.03, 0, 2)
    assert len(log.steps) == 3 and log.count == 6  # bounded; the count goes on


def test_the_fit_recovers_the_engines_costs_and_waits_for_enough_steps() -> None:
    log = StepLog()
    run_engine(log, MIN_STEPS - 1)
    assert fit_step_costs(log.steps) is None  # too few steps
    few = StepLog()
    # Too few prefills in 200 steps: their cost cannot be told apart yet.
    run_engine(few, 200, prefill_every=200 // (MIN_PREFILL_STEPS - 1) + 1)
    assert fit_step_costs(few.steps) is None
    run_engine(log, 400, seed=1)
    fit = fit_step_costs(log.steps)
    assert fit is not None and fit.steps == len(log.steps)
    assert fit.prefill_token_s == pytest.approx(PREFILL, rel=0.05)
    assert fit.decode_token_s == pytest.approx(DECODE, rel=0.2)
    assert fit.base_s == pytest.approx(BASE, rel=0.1)
    assert fit.to_dict()["prefill_token_ms"] == pytest.approx(PREFILL * 1e3, rel=0.05)


def test_pauses_of_the_process_do_not_count_as_work() -> None:
    log = StepLog()
    run_engine(log, 400)
    for i in range(8):  # eight steps stretched by a 2 s pause (a collection, another program)
        prefill = 0 if i % 2 else 300
        log.observe(2.0 + BASE + PREFILL * prefill + DECODE * 4, prefill, 4)
    run_engine(log, 100, seed=2)
    fit = fit_step_costs(log.steps)
    assert fit is not None and fit.steps == len(log.steps) - 8
    assert fit.prefill_token_s == pytest.approx(PREFILL, rel=0.05)


def test_holding_reads_the_engines_step_costs_when_it_reports_them() -> None:
    # The delay model says 10 ms per prompt token; the engine's steps say 0.8 ms.
    clock = Clock()
    t = SLOTracker(Mitigation.parse("admission"), clock=clock, delay=prefill_bound())
    work = StageWork("answer", 1, 100, 1, 1)
    assert t.prefill_s(work, "in-process") == pytest.approx(1.0)  # no log: the delay model
    log = StepLog()
    t.watch_steps("in-process", log)
    run_engine(log, MIN_STEPS // 2)
    assert t.prefill_s(work, "in-process") == pytest.approx(1.0)  # too few steps yet
    run_engine(log, REFIT_STEPS, seed=1)
    assert t.prefill_s(work, "in-process") == pytest.approx(100 * PREFILL, rel=0.1)
    assert t.prefill_s(work, "http://other:8000") == pytest.approx(1.0)  # another engine
    snapshot = t.snapshot()
    assert snapshot["prefill_cost"] == "steps"
    assert snapshot["step_costs"]["in-process"]["prefill_token_ms"] == pytest.approx(0.8, 0.1)
    collector = SLOCollector()  # the server's /metrics
    collector.snapshot = snapshot
    registry = CollectorRegistry()
    registry.register(collector)
    [sample] = [
        s for m in registry.collect() for s in m.samples
        if s.name == "ragctl_engine_prefill_token_seconds"
    ]  # fmt: skip
    assert sample.labels == {"engine": "in-process"}
    assert sample.value == pytest.approx(PREFILL, rel=0.1)
    # The projection of a request in flight adds the step costs' stall, and holding weighs it:
    # k ends at 101 with its deadline at 101.5; a 100-token prefill costs it 80 ms by the
    # engine's steps (1 s by the delay model, which would hold the newcomer).
    k = started(t, 1500, 100, engine="in-process")
    newcomer = planned(t, None, 100)
    newcomer.engine = "in-process"
    assert not t.threatened(newcomer, t.prefill_s(newcomer.work[0], "in-process"))
    t.enter(newcomer, "answer")
    assert k.stalls_s == pytest.approx(100 * PREFILL, rel=0.1)


def test_the_fit_is_refreshed_as_the_engine_runs_and_can_be_switched_off() -> None:
    t = SLOTracker(Mitigation.parse("admission"), clock=Clock(), delay=prefill_bound())
    log = StepLog(maxlen=MIN_STEPS * 4)
    t.watch_steps("in-process", log)
    run_engine(log, MIN_STEPS * 4)
    first = t.step_costs("in-process")
    assert first is not None and t.step_costs("in-process") is first  # not refitted per call
    for _ in range(REFIT_STEPS):  # the engine got twice as slow per prompt token
        log.observe(BASE + 2 * PREFILL * 300 + DECODE * 2, 300, 2)
    again = t.step_costs("in-process")
    assert again is not None and again.prefill_token_s > first.prefill_token_s * 1.2
    model = SLOTracker(clock=Clock(), delay=prefill_bound(), prefill_cost="model")
    model.watch_steps("in-process", log)
    assert model.prefill_s(StageWork("answer", 1, 100, 1, 1), "in-process") == pytest.approx(1)
    with pytest.raises(InvalidRequest, match="unknown prefill cost 'tokens'"):
        SLOTracker(prefill_cost="tokens")  # type: ignore[arg-type]


class SteppedEngine(FakeEngine):
    """A fake engine that logs steps, as the in-process engine does."""

    def __init__(self, label: str = "") -> None:
        super().__init__()
        self.steps = StepLog()
        if label:
            self.url = label


def test_the_controller_watches_each_engine_that_logs_steps() -> None:
    engine = SteppedEngine()
    c = controller(engine)
    assert c.slo.step_logs == {label_of(engine): engine.steps}
    assert controller(FakeEngine()).slo.step_logs == {}  # a remote engine logs none
    a, b = SteppedEngine("http://a:8000"), SteppedEngine("http://b:8000")
    pool = EnginePool.of([(a, "http://a:8000"), (b, "http://b:8000")])
    logs = controller(pool).slo.step_logs
    assert logs == {"http://a:8000": a.steps, "http://b:8000": b.steps}
