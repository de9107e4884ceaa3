"""Cost-aware best-fit and the delay model in the controller (fake engine): every synthesis stage
reaches the engine's delay model with its tokens and the load when it started, the Decision
carries the candidates, the objective changes the choice, and the SLO tracker predicts with the
model and reports the error of model, averages and baseline."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ragctl.profiler import ProfileOutcome
from ragctl.scheduler.cost import LABEL_SPACE_MIN, DelayModel, Load, StageWork, prior_from_rates
from ragctl.scheduler.slo import Mitigation, SLOTracker
from ragctl.types import AnswerOptions, CollectionInfo, Config, ConfigSpace
from tests.unit.test_controller import NO_GOLDEN, FakeEngine, FakeProfiler, controller

Q = "Where was Super Bowl 50 played?"


class SpyModel(DelayModel):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: list[tuple[StageWork, Load, float, StageWork | None]] = []

    def observe(self, work, load, seconds, *, budget=None):
        self.seen.append((work, load, seconds, budget))
        return super().observe(work, load, seconds, budget=budget)


async def test_every_stage_reaches_the_delay_model_and_the_decision_has_candidates() -> None:
    spy = SpyModel()
    ctl = controller(slo=SLOTracker(delay=spy))
    answer = await ctl.aask(Q)
    assert [w.stage for w, *_ in spy.seen] == [s.name for s in answer.stages]
    for (work, load, seconds, budget), stage in zip(spy.seen, answer.stages, strict=True):
        assert (work.calls, work.prompt_tokens, work.output_tokens) == (
            stage.calls, stage.prompt_tokens, stage.output_tokens,
        )  # fmt: skip
        assert seconds == stage.seconds and load == Load()  # alone on the engine
        assert budget is not None and budget.output_tokens >= work.output_tokens
    assert spy.observations == len(answer.stages)
    assert ctl.slo.load.now() == Load()  # nothing left in flight

    d = answer.decision
    assert d.choice is not None and d.choice.objective == "balanced"  # the default
    first = d.choice.candidates[0]
    assert first.config == d.config and first.need_blocks == d.need_blocks
    assert first.delay_s is not None and first.delay_s > 0 and 0 < first.quality < 1
    assert d.choice.fitting >= len(d.choice.candidates) > 1
    out = d.to_dict()["choice"]
    assert out["objective"] == "balanced" and out["candidates"][0]["config"] == d.config.label
    assert out["delay_source"] == "prior"


async def test_controllers_of_two_collections_on_one_engine_teach_it_their_own_shares() -> None:
    spy = SpyModel()
    slo = SLOTracker(delay=spy)
    engine = FakeEngine()
    for name in ("squad", "finsec"):
        ctl = controller(engine, slo=slo, collection=CollectionInfo(name, "a collection", 256))
        answer = await ctl.aask(Q, Config("stuff", 2))
        assert answer.stages[0].name == "answer"
    budgets = [budget for *_, budget in spy.seen]
    assert [b.collection for b in budgets] == ["squad", "finsec"]
    assert {c for c, _ in spy.draw_shares()} == {"squad", "finsec"}
    assert set(spy.to_dict()["output_share"]) == {"squad/answer", "finsec/answer"}


async def test_concurrent_requests_see_each_other_as_load() -> None:
    spy = SpyModel()
    engine = FakeEngine()
    engine.hold = asyncio.Event()
    ctl = controller(engine, slo=SLOTracker(delay=spy))
    first = asyncio.ensure_future(ctl.aask(Q, Config("map_rerank", 3)))
    async with asyncio.timeout(5):
        while ctl.slo.load.seqs < 3:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(ctl.aask(Q, Config("stuff", 2)))
        while ctl.slo.load.seqs < 4:
            await asyncio.sleep(0.01)
        engine.hold.set()
        await asyncio.gather(first, second)
    loads = {w.stage: load for w, load, *_ in spy.seen}
    assert loads["rerank"] == Load()
    assert loads["answer"].seqs == 3 and loads["answer"].tokens > 0
    assert ctl.slo.load.now() == Load()


async def test_the_objective_changes_the_choice_and_quality_keeps_todays() -> None:
    # A measured, compute-bound prior: time grows with every token.
    model = DelayModel(prior_from_rates(200.0, 10.0, batch_growth=1.0), prior_measured=True)
    base = controller(
        slo=SLOTracker(delay=model), policy=dataclasses.replace(NO_GOLDEN, objective="quality")
    )
    quality = (await base.aask(Q)).decision
    fast = controller(
        slo=SLOTracker(delay=model.fresh()),
        policy=dataclasses.replace(NO_GOLDEN, objective="latency"),
    )
    latency = (await fast.aask(Q)).decision
    assert latency.choice.objective == "latency" and latency.choice.delay_source == "measured"
    delays = {c.config: c.delay_s for c in latency.choice.candidates}
    assert delays[latency.config] == min(delays.values())
    q_delays = {c.config: c.delay_s for c in quality.choice.candidates}
    assert latency.config != quality.config
    assert delays[latency.config] < q_delays[quality.config]
    assert quality.need_blocks == max(c.need_blocks for c in quality.choice.candidates)
    # The same choice per request, on the quality controller: the request's objective wins.
    asked = (await base.aask(Q, options=AnswerOptions(objective="latency"))).decision
    assert asked.choice.objective == "latency" and asked.config == latency.config


def near_tied_model(seed: int = 0) -> DelayModel:
    """A measured model whose answer and rerank stages use near-equal, noisy shares of their
    output budgets (one call of one chunk costs about the same either way)."""
    model = DelayModel(prior_from_rates(200.0, 10.0), prior_measured=True, seed=seed)
    for i in range(20):
        for stage, out in (("answer", 40 + 7 * (i % 5)), ("rerank", 42 + 7 * (i % 4))):
            budget = StageWork(stage, 1, 300, 80, 80)
            model.observe(StageWork(stage, 1, 300, out, out), Load(), 1.0, budget=budget)
    return model


async def test_exploring_draws_shares_per_decision_and_quality_never_draws() -> None:
    # Which near-tied stage wins a draw is `DelayModel.draw_shares`' test; here: one draw per
    # decision of the delay-reading objectives, said in the Decision.
    for objective in ("latency", "balanced"):
        model = near_tied_model()
        ctl = controller(
            slo=SLOTracker(delay=model),
            policy=dataclasses.replace(NO_GOLDEN, objective=objective, explore_delay=True),
        )
        states = [model.rng.bit_generator.state]
        for _ in range(3):
            d = (await ctl.propose(Q)).plan
            assert d.choice.delay_source == "fitted (sampled shares)"
            states.append(model.rng.bit_generator.state)
        assert len({str(s) for s in states}) == 4
        twin = near_tied_model()
        twin.draw_shares()
        assert str(twin.rng.bit_generator.state) == str(states[1])  # exactly one draw each
    model = near_tied_model()
    ctl = controller(
        slo=SLOTracker(delay=model),
        policy=dataclasses.replace(NO_GOLDEN, objective="quality", explore_delay=True),
    )
    before = model.rng.bit_generator.state
    plain = controller(
        slo=SLOTracker(delay=near_tied_model()),
        policy=dataclasses.replace(NO_GOLDEN, objective="quality"),
    )
    d, e = (await ctl.aask(Q)).decision, (await plain.aask(Q)).decision
    assert model.rng.bit_generator.state == before  # quality never reads a delay
    assert d.config == e.config and d.choice.delay_source == "fitted"
    # The draws' seed reaches a new engine's delay model (replays and runs are reproducible).
    seeded = dataclasses.replace(NO_GOLDEN, explore_seed=5).tracker().delay
    assert seeded.seed == 5 and seeded.draw_shares() == {}
    assert controller(policy=dataclasses.replace(NO_GOLDEN, explore_seed=5)).slo.delay.seed == 5


async def test_the_slo_tracker_predicts_with_the_model_and_reports_all_three_errors() -> None:
    model = DelayModel(prior_from_rates(1000.0, 50.0), prior_measured=True)
    ctl = controller(slo=SLOTracker(Mitigation.parse("off"), delay=model))
    for _ in range(3):
        await ctl.aask(Q, Config("stuff", 2), slo_ms=60_000)
    pred = ctl.slo.snapshot()["prediction"]
    assert pred["model_n"] == 3 and pred["model_mape"] is not None
    assert pred["averages_n"] == 2  # the first run had no average yet
    assert pred["paired_n"] == 2 and pred["paired_model_mape"] is not None
    assert ctl.slo.snapshot()["predictor"] == "model"


def test_tracker_predictor_choice_and_the_remaining_time_without_its_own_calls() -> None:
    now = [100.0]
    work = (StageWork("map", 3, 900, 50, 150), StageWork("reduce", 1, 300, 20, 20))
    config = Config("map_reduce", 3, 50)
    model = DelayModel(prior_from_rates(300.0, 10.0, batch_growth=1.0), prior_measured=True)
    tracker = SLOTracker(clock=lambda: now[0], delay=model)
    tracker.stats.observe("map", config.label, 1.0)
    tracker.stats.observe("reduce", config.label, 1.0)
    t = tracker.start(60_000)
    tracker.planned(t, config, work=work)
    assert t.predicted_s == pytest.approx(model.predict(work)) and t.averages_s == 2.0
    # In its map stage, 2 s in, with its own 3 calls in flight: only the others are load.
    tracker.enter(t, "map")
    now[0] += 2.0
    with tracker.load.running(3, 1050):
        left = tracker.remaining(t, now[0])
    assert left == pytest.approx(
        max(model.predict_stage(work[0]) - 2.0, 0) + model.predict_stage(work[1])
    )
    old = SLOTracker(clock=lambda: now[0], delay=model, predictor="averages")
    old.stats = tracker.stats
    u = old.start(60_000)
    old.planned(u, config, work=work)
    assert u.predicted_s == 2.0 and u.model_s == pytest.approx(model.predict(work))
    with pytest.raises(Exception, match="unknown SLO predictor"):
        SLOTracker(predictor="oracle")  # type: ignore[arg-type]


# -- the profiler left unasked where no answer could buy anything ------------------------------


def indifferent_labels(model, n: int = 12) -> None:
    """`n` labels over which stuff:1 and stuff:3 agree alike (a difference within sampling)."""
    one, three = Config("stuff", 1), Config("stuff", 3)
    for i in range(n):
        model.add_label(one, {one: i % 3 == 0, three: i % 3 == 1})


def test_the_profiler_is_left_unasked_only_where_labels_show_no_difference() -> None:
    from ragctl.policy import UNASKED, unasked_profile
    from ragctl.scheduler.cost import QualityModel

    model = QualityModel()
    assert unasked_profile(model, "balanced") is None  # no labels: ask
    indifferent_labels(model, LABEL_SPACE_MIN - 1)
    assert model.indifferent() and unasked_profile(model, "balanced") is None  # no label space
    indifferent_labels(model, 1)
    out = unasked_profile(model, "balanced")
    assert out is not None and out.profiler == UNASKED and out.profile is None
    assert out.seconds == 0.0 and "not asked" in out.llm_note
    assert unasked_profile(model, "latency") is not None
    assert unasked_profile(model, "quality") is None  # METIS's rule reads the profile's space
    # A real difference (stuff:3 answers every query, stuff:1 none) asks again.
    real = QualityModel()
    one, three = Config("stuff", 1), Config("stuff", 3)
    for _ in range(LABEL_SPACE_MIN):
        real.add_label(three, {one: False, three: True})
    assert not real.indifferent() and unasked_profile(real, "balanced") is None


def test_the_profiler_is_left_unasked_where_no_profile_space_holds_a_better_choice() -> None:
    from ragctl.policy import UNASKED, no_better_profile
    from ragctl.rules import fast_corner
    from ragctl.scheduler.cost import QualityModel
    from tests.unit.test_controller import RULES

    model = QualityModel()
    corner = fast_corner(RULES)  # map_rerank:1, stuff:1, map_reduce:1:30
    fallback = ConfigSpace(("map_rerank", "stuff"), (1, 9), (), "default+labels")
    stuff_only = ConfigSpace(("stuff",), (1, 9), (), "x")
    work = {"map_rerank": 1.0, "stuff": 1.2, "map_reduce": 3.0}

    def delay(c: Config) -> float:  # grows with chunks and with the summary budget
        return work[c.method] * c.num_chunks + (c.intermediate_length or 0) / 100

    def unasked(objective="balanced", space=fallback, chunks=10, quality=model):
        return no_better_profile(quality, objective, space, corner, chunks, delay, 0.1)

    # `latency` reads no quality: the fallback holds the fastest anything could be.
    out = unasked("latency")
    assert out is not None and out.profiler == UNASKED and out.seconds == 0.0
    assert "map_rerank:1" in out.llm_note and "latency" in out.llm_note
    assert unasked("latency", stuff_only) is None  # a profile's space could hold map_rerank:1
    assert unasked("balanced") is None  # no outcomes: quality would read the space
    assert unasked("quality") is None  # METIS's rule reads the profile's space
    assert unasked("latency", chunks=0) is None
    indifferent_labels(model, 3)  # far under LABEL_SPACE_MIN
    assert unasked("balanced") is not None and unasked("balanced", stuff_only) is None
    work["stuff"] = 0.9  # unless stuff is the faster method on this engine
    assert unasked("balanced", stuff_only) is not None and unasked("latency", stuff_only)
    # Chunks above those retrieved are clipped alike: a fallback from 3 chunks, 2 retrieved.
    from_three = ConfigSpace(("stuff",), (3, 9), (), "x")
    assert unasked("latency", from_three, chunks=2) is None
    assert unasked("latency", from_three, chunks=1) is not None
    # Measured differences: the fallback's best against the best each method could do.
    work["stuff"] = 1.2
    real = QualityModel()
    rerank, one, three = Config("map_rerank", 1), Config("stuff", 1), Config("stuff", 3)
    for i in range(12):
        real.add_label(three, {rerank: i < 11, one: i < 2, three: i < 3})
    assert not real.indifferent()
    out = unasked("balanced", quality=real)  # map_rerank:1: best measured, and fastest
    assert out is not None and "map_rerank:1" in out.llm_note
    # Without map_rerank in the fallback, stuff is its best; a profile could add map_rerank.
    assert unasked("balanced", stuff_only, quality=real) is None
    # A method's best rate at its corner's delay: stuff:3 answers most, a profile could
    # offer stuff at stuff:1's delay, so the fallback's best (map_rerank:1) may be beaten.
    fav = QualityModel()
    for i in range(12):
        fav.add_label(three, {rerank: i < 4, one: i < 4, three: i < 11})
    assert not fav.indifferent()
    assert unasked("balanced", ConfigSpace(("map_rerank",), (1, 9), (), "x"), quality=fav) is None


async def test_under_the_label_minimum_a_profile_that_cannot_buy_a_faster_choice_is_not_asked():
    calls: list[str] = []
    ctl = controller(profiler=Counting(calls))
    one, stuff1 = Config("map_rerank", 1), Config("stuff", 1)
    for i in range(LABEL_SPACE_MIN - 1):  # indifferent; the fallback gains map_rerank:1 and stuff:1
        ctl.quality.add_label(one if i % 2 else stuff1, {one: i % 3 == 0, stuff1: i % 3 == 1})
    d = (await ctl.aask("Who won Super Bowl 50?")).decision
    assert calls == [] and d.profiler == "unasked" and "predicted better" in d.profile_note
    assert d.space.source == "default+labels" and d.config.num_chunks == 1
    assert ctl.counters["profile_unasked"] == 1
    # The profiler bench asks anyway (it measures the profiler); the trust record ignores it.
    forced = await ctl.aask("Who won?", options=AnswerOptions(ask_profiler=True))
    assert calls == ["Who won?"] and forced.decision.profiler != "unasked"
    assert not ctl.trust_for().recent
    calls.clear()
    # Labels that never needed fewer than three chunks leave the fallback without a
    # one-chunk configuration: a profile's space could hold one, so the profiler is asked.
    asked = controller(profiler=Counting(calls))
    three, six = Config("stuff", 3), Config("stuff", 6)
    for i in range(LABEL_SPACE_MIN - 1):
        asked.quality.add_label(three, {three: i % 3 == 0, six: i % 3 == 1})
    assert asked.quality.indifferent()
    d = (await asked.aask("Who won Super Bowl 50?")).decision
    assert calls == ["Who won Super Bowl 50?"] and d.profiler != "unasked"
    # Asked after retrieval (the chunks decided it), so none of its time overlapped retrieval;
    # asked for a baseline, it runs beside retrieval.
    assert not (await asked.propose("Who won Super Bowl 50?")).profile_beside_retrieval
    assert (await asked.propose("Who won Super Bowl 50?", ask=True)).profile_beside_retrieval


class Counting(FakeProfiler):
    """A FakeProfiler that appends each question it is asked to `calls`."""

    def __init__(self, calls: list[str], outcome: ProfileOutcome | None = None) -> None:
        super().__init__(outcome)
        self.calls = calls

    async def profile(self, question, metadata, chunk_tokens, *, collection=None):
        self.calls.append(question)
        return self.outcome


async def test_an_unasked_profile_saves_the_call_and_the_baselines_still_get_one() -> None:
    calls: list[str] = []
    ctl = controller(profiler=Counting(calls))
    indifferent_labels(ctl.quality)
    answer = await ctl.aask("Who won Super Bowl 50?")
    d = answer.decision
    assert calls == [] and d.profiler == "unasked" and not d.profile_used
    assert "not asked" in d.profile_note and d.space.source == "labels"
    assert ctl.counters["profile_unasked"] == 1
    asked = await ctl.propose("Who won Super Bowl 50?", ask=True)
    assert calls == ["Who won Super Bowl 50?"] and asked.outcome.profile is not None
    quality = await ctl.aask("Who won?", options=AnswerOptions(objective="quality"))
    assert len(calls) == 2 and quality.decision.profile_used


async def test_a_profiler_untrusted_on_a_whole_window_is_asked_one_query_in_that_window() -> None:
    from tests.unit.test_controller import a_profile

    calls: list[str] = []
    untrusted = ProfileOutcome(a_profile(0.5), None, None, 0.2, "v1")
    profiler = Counting(calls, untrusted)
    ctl = controller(profiler=profiler, policy=dataclasses.replace(NO_GOLDEN, untrusted_window=3))
    asked = []
    for i in range(10):
        d = (await ctl.aask(f"q{i}")).decision
        asked.append(d.profiler != "unasked")
        assert not d.profile_used and d.space.source == "default"  # the same space either way
    # Three untrusted profiles, then one ask (a probe) every three queries.
    assert asked == [True, True, True, False, False, True, False, False, True, False]
    assert len(calls) == 5 and ctl.counters["profile_unasked"] == 5
    await ctl.propose("q", ask=True)  # a baseline's profile is not this objective's record
    assert (await ctl.propose("next")).outcome.profiler == "unasked"
    # A trusted probe resumes asking on every query.
    profiler.outcome = FakeProfiler().outcome
    await ctl.aask("probe")
    assert profiler.outcome.profile.confidence >= 0.9 and len(calls) == 7
    for i in range(3):
        await ctl.aask(f"again {i}")
    assert len(calls) == 10
    # METIS's quality rule reads every profile: asked every time, even with a window of one.
    fresh = controller(
        profiler=Counting([], untrusted), policy=dataclasses.replace(NO_GOLDEN, untrusted_window=1)
    )
    for i in range(3):
        await fresh.aask(f"m{i}", options=AnswerOptions(objective="quality"))
    assert fresh.counters["profile_unasked"] == 0
    off = controller(
        profiler=Counting([], untrusted), policy=dataclasses.replace(NO_GOLDEN, untrusted_window=0)
    )
    for i in range(4):
        assert (await off.aask(f"o{i}")).decision.profiler != "unasked"
