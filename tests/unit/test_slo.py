"""The SLO loop's policy: mitigation switches, the stage-time predictor (against the baseline),
planning within a deadline, and the tracker's flags, priorities and gate (fake clock)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from ragctl.errors import InvalidRequest
from ragctl.scheduler.slo import (
    CHANGE_QUANTILE,
    FLAGGED_PRIORITY,
    HOPELESS_PRIORITY,
    MIN_RATIOS,
    OPTIMISM_QUANTILE,
    PRE_STAGE,
    SHED_QUANTILE,
    BaselineEstimator,
    Mitigation,
    SLOTracker,
    StageStats,
    choose_within_slo,
    remaining_s,
)
from ragctl.types import Config, ConfigSpace, KVState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- mitigation switches ------------------------------------------------------------------------


def test_mitigation_modes_and_lists() -> None:
    off = Mitigation(priority=False, pause=False, config=False, triage=False)
    assert Mitigation.parse("off") == off
    assert Mitigation.parse("patchwork") == Mitigation(config=False, triage=False)
    assert Mitigation.parse("ADAPTIVE") == Mitigation()
    assert Mitigation.parse("pause, config, triage") == Mitigation(priority=False)
    assert Mitigation.parse("triage") == Mitigation(priority=False, pause=False, config=False)
    assert Mitigation.parse("priority,pause").label == "patchwork"
    assert Mitigation.parse("config").label == "config"
    for bad in ("fast", "priority,teleport", ""):
        with pytest.raises(InvalidRequest, match="unknown SLO mitigation"):
            Mitigation.parse(bad)
    # Shedding: off unless asked for; `admission` is adaptive + shed + hold; shed needs `config`.
    assert not Mitigation().shed and not Mitigation.parse("adaptive").shed
    admission = Mitigation.parse("admission")
    assert admission == Mitigation(shed=True, hold=True) and admission.label == "admission"
    assert Mitigation.parse("config,shed").label == "config,shed"
    with pytest.raises(InvalidRequest, match="'shed' needs 'config'"):
        Mitigation.parse("triage,shed")


# -- predictor ----------------------------------------------------------------------------------


def test_running_mean_starts_at_first_value_then_moves_by_alpha() -> None:
    stats = StageStats(alpha=0.5)
    assert stats.mean("answer", "stuff:3") is None
    stats.observe("answer", "stuff:3", 2.0)
    assert stats.mean("answer", "stuff:3") == 2.0
    stats.observe("answer", "stuff:3", 4.0)
    assert stats.mean("answer", "stuff:3") == 3.0
    with pytest.raises(ValueError):
        StageStats(alpha=0)


def test_unseen_configuration_is_interpolated_within_its_family() -> None:
    stats = StageStats()
    stats.observe("answer", "stuff:2", 1.0)
    # One point: proportional to the chunk count.
    assert stats.stage_mean("answer", Config("stuff", 6)) == pytest.approx(3.0)
    stats.observe("answer", "stuff:4", 1.5)
    # Two points: the line through them (0.25 s per chunk + 0.5 s).
    assert stats.stage_mean("answer", Config("stuff", 8)) == pytest.approx(2.5)
    # Another method or summary budget is not comparable.
    assert stats.stage_mean("answer", Config("map_rerank", 4)) is None
    stats.observe("map", "map_reduce:4:50", 2.0)
    assert stats.stage_mean("map", Config("map_reduce", 4, 100)) is None
    assert stats.predict_synthesis(Config("map_reduce", 4, 50)) is None  # reduce unseen
    stats.observe("reduce", "map_reduce:4:50", 1.0)
    assert stats.predict_synthesis(Config("map_reduce", 4, 50)) == pytest.approx(3.0)


def test_line_never_predicts_below_half_the_fastest_seen() -> None:
    stats = StageStats()
    stats.observe("answer", "stuff:5", 1.0)
    stats.observe("answer", "stuff:6", 3.0)  # steep line: k=1 would be -7 s
    assert stats.stage_mean("answer", Config("stuff", 1)) == pytest.approx(0.5)


def test_remaining_time_of_an_in_flight_request() -> None:
    stats, base = StageStats(), BaselineEstimator()
    mr = Config("map_reduce", 4, 50)
    assert remaining_s(stats, base, "pre", None, 0.0) is None  # nothing seen yet
    stats.observe("pre", "*", 1.0)
    base.observe(5.0)
    assert remaining_s(stats, base, "pre", None, 0.4) == pytest.approx(0.6 + 5.0)
    stats.observe("map", mr.label, 3.0)
    stats.observe("reduce", mr.label, 2.0)
    assert remaining_s(stats, base, "queue", mr, 10.0) == pytest.approx(5.0)
    assert remaining_s(stats, base, "map", mr, 1.0) == pytest.approx(2.0 + 2.0)
    assert remaining_s(stats, base, "map", mr, 9.0) == pytest.approx(0.0 + 2.0)  # overran
    assert remaining_s(stats, base, "reduce", mr, 0.5) == pytest.approx(1.5)


def test_predictor_beats_the_configuration_blind_baseline_on_a_mixed_workload() -> None:
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("off"), clock=clock)
    small, large = Config("stuff", 2), Config("stuff", 8)
    for i in range(20):
        config, seconds = (small, 1.0) if i % 2 else (large, 4.0)
        t = tracker.start(None)
        tracker.enter(t, "queue")
        tracker.planned(t, config)
        tracker.enter(t, "answer")
        clock.now += seconds
        assert tracker.finish(t, ok=True) is None  # no SLO, no record
    errors = tracker.errors.to_dict()
    assert errors["n"] >= 15
    assert errors["predictor_mae_s"] < 0.01  # each configuration's own mean is exact here
    assert errors["baseline_mae_s"] > 1.0  # one mean for both is off by ~1.5 s
    assert tracker.counters["requests"] == 0


# -- planning within a deadline -----------------------------------------------------------------

SPACE = ConfigSpace(("stuff",), (4, 8), source="test")
KV = KVState(total_blocks=1000, free_blocks=1000, block_size=16)


def need(c: Config) -> int:
    return 10 * c.num_chunks


def predict(c: Config) -> float | None:
    return {"stuff": 0.5, "map_rerank": 0.2}[c.method] * c.num_chunks


def plan(budget: float, kv: KVState = KV, joint: bool = True, space: ConfigSpace = SPACE):
    return choose_within_slo(
        space, kv, 0, need, joint_reasoning=joint, max_chunks=10, predict=predict, budget_s=budget
    )


def test_plan_keeps_best_fit_when_it_meets_the_deadline() -> None:
    p = plan(10.0)
    assert (p.config, p.reason, p.slo_action) == (Config("stuff", 8), "fit", "")


def test_plan_takes_the_largest_configuration_of_the_space_that_meets_it() -> None:
    p = plan(3.0)  # stuff:8 takes 4 s; stuff:6 takes 3 s
    assert (p.config, p.reason, p.slo_action) == (Config("stuff", 6), "fit", "cheaper-config")
    assert p.need_blocks == 60


def test_plan_goes_below_the_profile_only_when_the_space_cannot_meet_it() -> None:
    p = plan(1.6)  # the space's smallest (stuff:4) takes 2 s; stuff:3 outside it takes 1.5 s
    assert (p.config, p.reason, p.slo_action) == (Config("stuff", 3), "fallback", "below-profile")


def test_unmeetable_deadline_gets_the_fastest_configuration_that_fits() -> None:
    p = plan(0.1)
    assert (p.config, p.slo_action) == (Config("stuff", 1), "unmeetable")
    # Memory still rules: with 25 free blocks the space's stuff:8 cannot fit, but stuff:2 can.
    p = plan(0.1, kv=KVState(1000, 25, 16))
    assert p.config == Config("stuff", 1)


def test_a_miss_is_certain_only_beyond_the_predictors_own_luck() -> None:
    # stuff:1, the fastest, is predicted at 0.5 s against a 0.4 s budget.
    args = (SPACE, KV, 0, need)
    kw = {"joint_reasoning": True, "max_chunks": 10, "predict": predict, "budget_s": 0.4}
    assert choose_within_slo(*args, **kw).slo_action == "unmeetable"
    # Requests have run as fast as 0.7x their prediction: 0.35 s is possible, save it.
    p = choose_within_slo(*args, optimism=0.7, **kw)
    assert (p.config, p.reason, p.slo_action) == (Config("stuff", 1), "fit", "below-profile")
    assert choose_within_slo(*args, optimism=0.9, **kw).slo_action == "unmeetable"
    assert choose_within_slo(*args, optimism=5.0, **kw).slo_action == "unmeetable"  # at most 1


def test_shedding_reads_predictions_at_the_median_error_and_refuses_a_certain_miss() -> None:
    args = (SPACE, KV, 0, need)
    kw = {"joint_reasoning": True, "max_chunks": 10, "predict": predict}
    # stuff:8 is predicted at 4 s against 5 s: kept, unless requests have run 1.5x their
    # predictions; then stuff:6 (3 s, read as 4.5 s) is the largest that meets it.
    assert choose_within_slo(*args, budget_s=5.0, calibration=1.5, **kw).config == Config(
        "stuff", 8
    )  # without `shed`, the calibration is not read
    p = choose_within_slo(*args, budget_s=5.0, calibration=1.5, shed=True, **kw)
    assert (p.config, p.slo_action) == (Config("stuff", 6), "cheaper-config")
    # Even stuff:1 (0.5 s, read as 0.75 s) misses 0.6 s: shed. At face value it would meet.
    p = choose_within_slo(*args, budget_s=0.6, calibration=1.5, shed=True, **kw)
    assert (p.config, p.slo_action) == (Config("stuff", 1), "shed")
    assert choose_within_slo(*args, budget_s=0.6, shed=True, **kw).slo_action == "below-profile"
    # Requests that ran faster than predicted save what a face value would shed.
    p = choose_within_slo(*args, budget_s=0.4, calibration=0.7, shed=True, **kw)
    assert (p.config, p.slo_action) == (Config("stuff", 1), "below-profile")
    # Without shedding, the same request is given up by triage instead of refused.
    assert choose_within_slo(*args, budget_s=0.1, **kw).slo_action == "unmeetable"
    # No time left and nothing predicted: shed (with shedding), else best-fit's own plan.
    blind = {**kw, "predict": lambda c: None}
    assert choose_within_slo(*args, budget_s=-0.1, shed=True, **blind).slo_action == "shed"
    assert choose_within_slo(*args, budget_s=-0.1, **blind).slo_action == ""
    assert choose_within_slo(*args, budget_s=0.1, shed=True, **blind).slo_action == ""
    # A wait stays a wait: nothing is refused for memory.
    p = choose_within_slo(SPACE, KVState(1000, 5, 16), 0, need, budget_s=0.1, shed=True, **kw)
    assert p.reason == "wait" and p.slo_action == ""


def test_a_cheaper_configuration_must_meet_at_the_margin() -> None:
    args = (SPACE, KV, 0, need)
    kw = {"joint_reasoning": True, "max_chunks": 10, "predict": predict, "budget_s": 3.0}
    # stuff:8 (4 s) misses 3 s; stuff:6 (3 s) meets at face value, but requests have run up to
    # 1.5x their predictions: stuff:4 (2 s, read as 3 s) is the largest that meets then.
    assert choose_within_slo(*args, **kw).config == Config("stuff", 6)
    p = choose_within_slo(*args, margin=1.5, **kw)
    assert (p.config, p.slo_action) == (Config("stuff", 4), "cheaper-config")
    # The chosen plan itself is read at face value: stuff:8 meets 4 s, whatever the margin.
    assert choose_within_slo(*args, margin=1.5, **{**kw, "budget_s": 4.0}).slo_action == ""
    # Nothing in the space meets at 2x: stuff:3, outside it, does (1.5 s, read as 3 s).
    p = choose_within_slo(*args, margin=2.0, **kw)
    assert (p.config, p.slo_action) == (Config("stuff", 3), "below-profile")
    # With shedding, a cheaper one is read at the margin, not at the median error.
    p = choose_within_slo(*args, margin=2.0, calibration=1.2, shed=True, **kw)
    assert (p.config, p.slo_action) == (Config("stuff", 3), "below-profile")
    # On an idle engine predictions are read at face value: stuff:6 meets.
    assert choose_within_slo(*args, margin=1.5, engine_idle=True, **kw).config == Config("stuff", 6)


def run_with_ratios(
    tracker: SLOTracker, clock: Clock, predicted: float, actual: list[float]
) -> None:
    """One answered stuff:1 request per `actual` synthesis seconds, each predicted at
    `predicted`: the tracker's actual / predicted ratios."""
    for seconds in actual:
        t = tracker.start(10_000)
        tracker.enter(t, "queue")
        tracker.planned(t, Config("stuff", 1))
        t.predicted_s = predicted
        tracker.enter(t, "answer")
        clock.now += seconds
        tracker.finish(t, ok=True)


def test_calibration_is_the_median_of_actual_over_predicted() -> None:
    clock = Clock()
    tracker = SLOTracker(clock=clock)
    assert tracker.calibration() == 1.0 and tracker.ratio_quantile(0.5) is None
    run_with_ratios(tracker, clock, 1.0, [1.0 + 0.2 * i for i in range(MIN_RATIOS)])  # 1x-2.8x
    assert tracker.calibration() == pytest.approx(np.median([1.0 + 0.2 * i for i in range(10)]))
    assert tracker.calibration() == pytest.approx(tracker.ratio_quantile(SHED_QUANTILE))
    assert tracker.snapshot()["calibration"] == tracker.calibration()
    assert tracker.optimism() == 1.0  # capped: luck never makes a prediction slower
    assert tracker.margin() == pytest.approx(np.quantile([1.0 + 0.2 * i for i in range(10)],
                                                         CHANGE_QUANTILE))  # fmt: skip
    assert tracker.snapshot()["margin"] == tracker.margin() > tracker.calibration()


@pytest.mark.parametrize(
    ("ratio", "predicted", "idle_action"),
    [(4.0, 2.0, ""), (1.0, 4.0, "unmeetable")],
    ids=["stale record", "stale averages"],
)
def test_shedding_never_refuses_on_an_idle_engine(
    ratio: float, predicted: float, idle_action: str
) -> None:
    """A burst taught the record 4x, or the running averages (from a few requests under load,
    before the delay model was ready) read every configuration above the budget; refusing
    would leave the engine idle and nothing would ever refresh them. With nothing of ragctl's
    running, a prediction refuses nothing and the request runs; under load it is shed."""
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("admission"), clock=clock)
    run_with_ratios(tracker, clock, 1.0, [ratio] * MIN_RATIOS)

    def planned(budget_s: float = 3.0) -> str:
        return choose_within_slo(
            SPACE, KV, 0, need, joint_reasoning=True, max_chunks=10,
            predict=lambda c: predicted, budget_s=budget_s, shed=True,
            calibration=tracker.calibration(), engine_idle=tracker.engine_idle(),
        ).slo_action  # fmt: skip

    assert tracker.engine_idle()
    # It runs: 2 s of 3 s as best-fit chose; 4 s at face value, given up by triage, not refused.
    assert planned() == idle_action
    assert planned(budget_s=0.0) == "shed"  # no time left at all: certain, whatever runs
    with tracker.load.running(1, 300):  # one running: 2 s read at 4x, or 4 s, misses 3 s
        assert not tracker.engine_idle()
        assert planned() == "shed"


def test_optimism_is_a_low_quantile_of_actual_over_predicted() -> None:
    clock = Clock()
    tracker = SLOTracker(clock=clock)
    assert tracker.optimism() == 1.0  # nothing seen: predictions as they are
    run_with_ratios(tracker, clock, 2.0, [1.0 + 0.1 * i for i in range(MIN_RATIOS)])  # 0.5x-0.95x
    assert len(tracker.ratios) == MIN_RATIOS
    assert tracker.optimism() == pytest.approx(np.quantile([0.5 + 0.05 * i for i in range(10)],
                                                           OPTIMISM_QUANTILE))  # fmt: skip
    tracker.reset()
    assert tracker.optimism() == 1.0


def test_wait_stays_a_wait_and_unknown_predictions_change_nothing() -> None:
    p = plan(0.1, kv=KVState(1000, 5, 16))
    assert p.reason == "wait" and p.config is None
    unknown = choose_within_slo(
        SPACE, KV, 0, need, joint_reasoning=True, max_chunks=10,
        predict=lambda c: None, budget_s=0.0,
    )  # fmt: skip
    assert (unknown.config, unknown.slo_action) == (Config("stuff", 8), "")


def test_past_the_deadline_an_unknown_best_fit_gives_way_to_the_fastest_known() -> None:
    known = {Config("stuff", 2): 1.0, Config("stuff", 3): 1.5}
    p = choose_within_slo(
        SPACE, KV, 0, need, joint_reasoning=True, max_chunks=10,
        predict=known.get, budget_s=-0.5,
    )  # fmt: skip
    assert (p.config, p.slo_action) == (Config("stuff", 2), "unmeetable")
    # With time left, an unknown prediction changes nothing.
    p = choose_within_slo(
        SPACE, KV, 0, need, joint_reasoning=True, max_chunks=10,
        predict=known.get, budget_s=0.5,
    )  # fmt: skip
    assert (p.config, p.slo_action) == (Config("stuff", 8), "")


# -- the tracker --------------------------------------------------------------------------------


def warm(tracker: SLOTracker, clock: Clock, config: Config, seconds: float, n: int = 3) -> None:
    """Teach the tracker's averages: `n` requests of `config`, 0.1 s before synthesis."""
    for _ in range(n):
        t = tracker.start(None)
        clock.now += 0.1
        tracker.enter(t, "queue")
        tracker.planned(t, config)
        tracker.enter(t, "answer")
        clock.now += seconds
        tracker.finish(t, ok=True)


def test_met_and_violated_requests_are_counted_with_their_record() -> None:
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("off"), clock=clock)
    t = tracker.start(1000)
    clock.now += 0.5
    rec = tracker.finish(t, ok=True)
    assert rec is not None and rec.met and rec.delay_ms == pytest.approx(500)
    assert rec.mitigation == "off"
    t = tracker.start(1000)
    clock.now += 1.5
    assert tracker.finish(t, ok=True).met is False
    t = tracker.start(1000)
    assert tracker.finish(t, ok=False).met is False  # a failure is a violation
    snap = tracker.snapshot()
    assert (snap["requests"], snap["met"], snap["violated"]) == (3, 1, 2)
    assert snap["attainment"] == pytest.approx(1 / 3)
    assert not tracker.inflight


def test_a_request_predicted_to_miss_is_flagged_and_its_calls_boosted() -> None:
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("patchwork"), clock=clock)
    stuff = Config("stuff", 4)
    warm(tracker, clock, stuff, 2.0)
    ok = tracker.start(5000)
    late = tracker.start(1500)
    for t in (ok, late):
        tracker.enter(t, "queue")
        tracker.planned(t, stuff)
    # 2 s of synthesis left: fits 5 s, not 1.5 s.
    assert tracker.priority(ok, 1) == 0
    assert tracker.priority(late, 3) == FLAGGED_PRIORITY
    assert late.flagged and not ok.flagged and late.boosted_calls == 3
    assert tracker.counters["flagged"] == 1
    rec = tracker.finish(late, ok=True)
    assert rec.flagged and rec.boosted_calls == 3


def test_triage_sends_hopeless_requests_behind_the_ones_that_can_still_make_it() -> None:
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("adaptive"), clock=clock)
    stuff = Config("stuff", 4)
    warm(tracker, clock, stuff, 2.0)
    savable, unmeetable, late = (tracker.start(ms) for ms in (1500, 1500, 5000))
    for t, action in ((savable, "cheaper-config"), (unmeetable, "unmeetable"), (late, "none")):
        tracker.enter(t, "queue")
        tracker.planned(t, stuff, action)
    assert tracker.priority(savable, 2) == FLAGGED_PRIORITY  # predicted to miss, can make it
    assert tracker.priority(unmeetable, 3) == HOPELESS_PRIORITY  # planned to miss whatever
    assert tracker.priority(late, 1) == 0
    clock.now += 6.0  # now past every deadline
    assert tracker.priority(late, 1) == HOPELESS_PRIORITY
    assert (savable.boosted_calls, unmeetable.boosted_calls, late.boosted_calls) == (2, 0, 0)
    assert (unmeetable.demoted_calls, late.demoted_calls) == (3, 1)
    assert unmeetable.flagged  # still flagged and counted: triage only changes what it gets
    assert tracker.finish(unmeetable, ok=True).demoted_calls == 3


def test_without_triage_a_flagged_request_is_boosted_even_past_its_deadline() -> None:
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("patchwork"), clock=clock)
    t = tracker.start(100)
    tracker.planned(t, Config("stuff", 1), "unmeetable")
    clock.now += 1
    assert tracker.priority(t, 2) == FLAGGED_PRIORITY and t.demoted_calls == 0


async def test_gate_does_not_pause_for_an_unmeetable_request_under_triage() -> None:
    for mitigation, pauses in (("patchwork", True), ("adaptive", False)):
        tracker = SLOTracker(dataclasses.replace(Mitigation.parse(mitigation), max_pause_s=0.1))
        tracker.stats.observe("answer", "stuff:1", 60.0)
        hopeless = tracker.start(30_000)
        tracker.enter(hopeless, "queue")
        tracker.planned(hopeless, Config("stuff", 1), "unmeetable")
        assert tracker.check() == 1
        newcomer = tracker.start(None)
        await tracker.gate(newcomer)
        assert (newcomer.paused_s > 0) is pauses, mitigation


def test_priority_mechanism_off_flags_but_does_not_boost() -> None:
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("pause,config"), clock=clock)
    t = tracker.start(100)  # (without triage: a hopeless request keeps its priority too)
    clock.now += 1  # past its deadline: certainly a miss
    assert tracker.priority(t, 2) == 0 and t.flagged and t.boosted_calls == 0


async def test_gate_pauses_new_requests_while_a_flagged_request_can_be_saved() -> None:
    # A bound far above the test's waits: only the release may end the pause, even when a busy
    # machine stalls the event loop for a second or two.
    tracker = SLOTracker(dataclasses.replace(Mitigation.parse("patchwork"), max_pause_s=60.0))
    stuff = Config("stuff", 4)
    tracker.stats.observe("answer", stuff.label, 60.0)  # a long stage: predicted to miss
    slow = tracker.start(30_000)
    tracker.enter(slow, "queue")
    tracker.planned(slow, stuff)
    tracker.enter(slow, "answer")
    assert tracker.check() == 1
    newcomer = tracker.start(None)
    gate = asyncio.create_task(tracker.gate(newcomer))
    await asyncio.sleep(0.1)
    assert not gate.done()  # paused
    tracker.finish(slow, ok=True)
    await asyncio.wait_for(gate, 10.0)
    assert 0.05 < newcomer.paused_s < 60.0  # released by the finish, not by the bound
    assert tracker.counters["paused_requests"] == 1 and tracker.paused_s == newcomer.paused_s


async def test_gate_does_not_pause_for_lost_requests_and_is_bounded() -> None:
    tracker = SLOTracker(Mitigation(config=False, max_pause_s=0.1))
    lost = tracker.start(1)  # 1 ms SLO: already past its deadline below
    time.sleep(0.01)
    assert tracker.check() == 1
    t = tracker.start(None)
    await tracker.gate(t)
    assert t.paused_s == 0.0  # the pause cannot save it
    tracker.finish(lost, ok=True)
    tracker.stats.observe("answer", "stuff:4", 60.0)
    slow = tracker.start(30_000)
    tracker.enter(slow, "queue")
    tracker.planned(slow, Config("stuff", 4))
    start = time.monotonic()
    await tracker.gate(tracker.start(None))
    assert 0.09 < time.monotonic() - start < 10.0  # max_pause_s (the slow one runs 30 s)


async def test_a_newcomer_waits_no_longer_than_its_own_slack() -> None:
    tracker = SLOTracker(
        dataclasses.replace(Mitigation.parse("patchwork"), max_pause_s=60.0),
        stats=StageStats(alpha=1.0),
    )
    tracker.stats.observe("answer", "stuff:4", 60.0)  # a long stage: the slow request will miss
    slow = tracker.start(30_000)
    tracker.enter(slow, "queue")
    tracker.planned(slow, Config("stuff", 4))
    tracker.baseline.observe(1.0)  # a request's synthesis takes about 1 s
    tracker.stats.observe(PRE_STAGE, "*", 0.2)  # and 0.2 s before it (alpha 1: the last)
    # 1.3 s of SLO against 1.2 s of expected work: at most 0.1 s of waiting to spare.
    tight = tracker.start(1300)
    assert tracker.slack_s(tight) == pytest.approx(0.1, abs=0.02)
    start = time.monotonic()
    await tracker.gate(tight)
    assert time.monotonic() - start < 10.0 and tight.paused_s < 10.0  # its slack, not 60 s
    # No slack at all: no pause.
    none = tracker.start(1000)
    await asyncio.wait_for(tracker.gate(none), 0.05)
    assert none.paused_s == 0.0
    # Without an SLO the newcomer waits as before (up to max_pause_s, here until released).
    free = tracker.start(None)
    assert tracker.slack_s(free) is None
    gate = asyncio.create_task(tracker.gate(free))
    await asyncio.sleep(0.3)
    assert not gate.done()
    tracker.finish(slow, ok=True)
    await asyncio.wait_for(gate, 10.0)


async def test_gate_off_without_the_pause_mechanism() -> None:
    tracker = SLOTracker(Mitigation.parse("priority"))
    tracker.stats.observe("answer", "stuff:4", 60.0)
    slow = tracker.start(30_000)
    tracker.enter(slow, "queue")
    tracker.planned(slow, Config("stuff", 4))
    t = tracker.start(None)
    await asyncio.wait_for(tracker.gate(t), 0.05)
    assert t.paused_s == 0.0
    assert tracker.check() == 1  # flagged all the same (its calls would be boosted)


def test_reset_forgets_averages_and_counters_but_not_requests_in_flight() -> None:
    clock = Clock()
    tracker = SLOTracker(clock=clock)
    warm(tracker, clock, Config("stuff", 2), 1.0)
    t = tracker.start(1000)
    tracker.finish(tracker.start(1000), ok=True)
    tracker.reset()
    assert tracker.stats.predict_synthesis(Config("stuff", 2)) is None
    assert tracker.counters["requests"] == 0 and tracker.errors.n == 0
    assert tracker.inflight == {t.id: t}


def test_a_reset_that_keeps_what_was_learned_forgets_only_what_is_reported() -> None:
    clock = Clock()
    tracker = SLOTracker(Mitigation.parse("admission"), clock=clock)
    warm(tracker, clock, Config("stuff", 2), 1.0)
    run_with_ratios(tracker, clock, 2.0, [4.0] * MIN_RATIOS)
    tracker.counters["shed"] = 3
    tracker.held_s = 1.5
    delay = tracker.delay
    tracker.reset(learned=False)
    assert tracker.counters["requests"] == 0 and tracker.counters["shed"] == 0
    assert tracker.errors.n == 0 and tracker.held_s == 0.0
    # What a warm-up taught stays: the averages, the delay model, the record of actual/predicted.
    assert tracker.stats.predict_synthesis(Config("stuff", 2)) is not None
    assert tracker.delay is delay and tracker.calibration() == pytest.approx(2.0)
    tracker.reset()
    assert tracker.delay is not delay and tracker.calibration() == 1.0
