"""The outcome grid and policy replay over the fake engine of test_controller: the grid's
configurations, its key, resuming a build, failed cells, the frontier, the profile cache, and
that replay's choices are the controller's own. tests/integration/test_eval.py builds and
replays a grid on the real engine."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from ragctl.errors import InvalidRequest
from ragctl.evaluation.grid import (
    CELLS_FILE,
    CellSummary,
    GridKey,
    GridStore,
    build,
    default_grid,
    frontier,
    frontier_delay_at,
    grid_observations,
    grid_sizes,
    parse_configs,
    summarize_cells,
    timing_noise,
    wide_grid,
)
from ragctl.evaluation.replay import (
    CachedProfiler,
    Replayer,
    ReplayStats,
    delay_check,
    outcome_from_dict,
)
from ragctl.evaluation.summaries import summarize
from ragctl.evaluation.systems import parse_systems
from ragctl.policy import planned_work
from ragctl.profiler import ProfileOutcome
from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.retrieval.collection import load_card
from ragctl.scheduler.cost import NO_LOAD, DelayModel
from ragctl.types import METHODS, Config, Query
from tests.unit.test_controller import FakeEngine, FakeProfiler, a_profile, controller

CARD = load_card("squad")
QUERIES = [
    Query(f"q{i}", f"Where was Super Bowl {i} played?", ("Santa Clara",), ("d0",)) for i in range(3)
]
SMALL = parse_configs("stuff:1,stuff:3,map_rerank:2,map_reduce:3:50")


class CountingEngine(FakeEngine):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls = 0

    async def generate(self, requests):
        self.calls += 1
        return await super().generate(requests)


def key(**changes) -> GridKey:
    base = dict(dataset="squad", model="m", collection="fp", templates={"stuff.answer": "v1"},
                answer_max_tokens=32, temperature=0.0, max_model_len=4096)  # fmt: skip
    return GridKey(**{**base, **changes})


# -- the grid's configurations and key ---------------------------------------------------------


def test_the_wide_grid_spans_every_method_cheap_to_expensive() -> None:
    grid = wide_grid()
    assert len(grid) == 20 and len({c.label for c in grid}) == 20
    assert {c.method for c in grid} == set(METHODS)
    stuff = [c.num_chunks for c in grid if c.method == "stuff"]
    assert stuff == [1, 2, 3, 4, 6, 9, 12]
    assert default_grid(CARD) == grid  # SQuAD's card names no grid of its own


def test_a_card_grid_replaces_the_default() -> None:
    qmsum = default_grid(load_card("qmsum"))
    assert qmsum != wide_grid() and len(qmsum) == 16
    assert max(c.num_chunks for c in qmsum if c.method == "stuff") == 6


def test_parse_configs_sorts_dedups_and_refuses_bad_labels() -> None:
    got = parse_configs("map_reduce:3:50, stuff:3,stuff:1,stuff:3")
    assert [c.label for c in got] == ["stuff:1", "stuff:3", "map_reduce:3:50"]
    for bad in ("stuff", "stuff:x", "map_reduce:3", "nope:3", "stuff:31", " , "):
        with pytest.raises(InvalidRequest):
            parse_configs(bad)


def test_the_key_changes_with_everything_that_changes_an_answer() -> None:
    assert key().digest == key().digest
    changed = [
        key(model="other"), key(collection="fp2"), key(templates={"stuff.answer": "v2"}),
        key(answer_max_tokens=64), key(temperature=0.7), key(max_model_len=2048),
    ]  # fmt: skip
    digests = {k.digest for k in changed}
    assert len(digests) == len(changed) and key().digest not in digests


def test_the_key_of_a_controller_reads_its_engine_and_synthesizer() -> None:
    k = GridKey.of(controller())
    assert k.model == "fake" and k.answer_max_tokens == 16 and k.max_model_len == 4096
    assert k.templates and all(isinstance(v, str) for v in k.templates.values())


# -- building ----------------------------------------------------------------------------------


async def test_a_build_resumes_and_never_answers_a_cell_twice(tmp_path: Path) -> None:
    engine = CountingEngine()
    ctl = controller(engine=engine)
    store = GridStore.open(tmp_path, key())
    assert await build(ctl, CARD, store, QUERIES[:2], SMALL) == 8
    calls = engine.calls
    cell = store.get("q0", Config("map_reduce", 3, 50))
    assert cell is not None and cell["error"] is None and cell["answer"] == "Denver"
    assert [s["name"] for s in cell["stages"]] == ["map", "reduce"]
    assert cell["tokens"]["calls"] == 4 and cell["delay_s"] >= 0
    assert 0 <= cell["ttft_s"] <= cell["delay_s"]
    assert cell["scores"]["evidence_recall"] == 1.0  # d0 is among the chunks used

    # Reopened from disk, with a torn last line (an interrupted write): that cell is rebuilt.
    path = store.folder / CELLS_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    again = GridStore.open(tmp_path, key())
    assert len(again.cells) == 7
    assert await build(ctl, CARD, again, QUERIES[:2], SMALL) == 1
    assert len(GridStore.open(tmp_path, key()).cells) == 8
    # A third query only adds its own cells; another key is another grid.
    assert await build(ctl, CARD, again, QUERIES, SMALL) == 4
    assert GridStore.open(tmp_path, key(model="other")).cells == {}
    assert engine.calls > calls
    assert json.loads((store.folder / "key.json").read_text())["model"] == "m"


async def test_cells_teach_the_delay_model_their_stages_under_no_load(tmp_path: Path) -> None:
    store = GridStore.open(tmp_path, key())
    ctl = controller()
    await build(ctl, CARD, store, QUERIES[:2], SMALL)
    seen = grid_observations(store, QUERIES[:1])
    cells = store.rows(["q0"])
    assert len(seen) == sum(len(c["stages"]) for c in cells) and seen
    for work, load, seconds, planned in seen:
        assert load == NO_LOAD and seconds >= 0 and work.calls >= 1 and planned is None
        assert work.decode_steps * work.calls >= work.output_tokens  # the mean per call
    mapped = [w for w, _, _, _ in seen if w.stage == "map"]
    assert mapped and all(w.calls == 3 for w in mapped)
    assert grid_observations(store, QUERIES[2:]) == []  # not built
    # With the controller's plan, each stage carries its planned work (output budgets).
    chunks = ctl.retriever.search(QUERIES[0].question, 9)
    sizer = ctl.synthesizer.sizer(QUERIES[0].question, chunks)
    both = grid_observations(store, QUERIES[:2], lambda q, c: planned_work(sizer, c))
    assert len(both) == 2 * len(seen)
    assert all(p is not None and p.stage == w.stage for w, _, _, p in both)
    model = DelayModel()
    for work, load, seconds, planned in both:
        # The fake engine's stages are instant (0 s once rounded): give them time to learn.
        model.observe(work, load, max(seconds, 0.01), budget=planned)
    assert model.observations == len(both)
    assert model.output_share("answer") < 1.0  # one word of a 16-token budget


async def test_each_cell_starts_from_an_empty_prefix_cache(tmp_path: Path) -> None:
    class Resettable(CountingEngine):
        resets: list[int] = []

        async def reset_prefix_cache(self) -> bool:
            self.resets.append(self.calls)  # engine calls made before this reset
            return True

    engine = Resettable()
    store = GridStore.open(tmp_path, key())
    assert await build(controller(engine=engine), CARD, store, QUERIES[:1], SMALL) == 4
    # One reset before every cell, each after the previous cell's calls.
    assert len(engine.resets) == 4 and engine.resets == sorted(set(engine.resets))
    assert all(c["cold_cache"] is True for c in store.rows())
    # An engine that cannot (the default) says so on its cells.
    other = GridStore.open(tmp_path / "other", key())
    await build(controller(), CARD, other, QUERIES[:1], SMALL)
    assert all(c["cold_cache"] is False for c in other.rows())


async def test_a_failed_cell_is_kept_and_scores_zero(tmp_path: Path) -> None:
    store = GridStore.open(tmp_path, key())
    await build(controller(engine=FakeEngine(fail_at=0)), CARD, store, QUERIES[:1],
                [Config("stuff", 1)])  # fmt: skip
    cell = store.get("q0", Config("stuff", 1))
    assert cell is not None and cell["error"].startswith("EngineError")
    assert await build(controller(), CARD, store, QUERIES[:1], [Config("stuff", 1)]) == 0
    [summary] = summarize_cells(store, ["q0"], [Config("stuff", 1)], "f1")
    assert summary.errors == 1 and summary.quality == 0.0 and summary.delay_s is None


# -- the frontier ------------------------------------------------------------------------------


def cs(name: str, quality: float, delay: float) -> CellSummary:
    return CellSummary(name, 10, 0, quality, None, delay, delay * 100)


def test_the_frontier_keeps_what_nothing_beats_on_both_axes() -> None:
    points = frontier([cs("a", 0.2, 1.0), cs("b", 0.1, 2.0), cs("c", 0.5, 3.0), cs("d", 0.5, 4.0)])
    assert [p.name for p in points] == ["a", "b", "c", "d"]  # cheapest first
    assert [p.on_frontier for p in points] == [True, False, True, False]
    assert frontier_delay_at(points, 0.3) == 3.0
    assert frontier_delay_at(points, 0.2) == 1.0
    assert frontier_delay_at(points, 0.6) is None


# -- replay ------------------------------------------------------------------------------------


async def test_replay_asks_the_controller_and_answers_missing_cells_live(tmp_path: Path) -> None:
    engine = CountingEngine()
    ctl = controller(engine=engine)
    store = GridStore.open(tmp_path, key())
    await build(ctl, CARD, store, QUERIES, SMALL)
    built = engine.calls
    proposal = await ctl.propose(QUERIES[0].question)
    assert engine.calls == built  # deciding makes no synthesis call
    assert proposal.plan.reason == "fit" and proposal.choice.profile_used
    answered = await ctl.aask(QUERIES[0].question)
    assert answered.decision.config == proposal.plan.config  # the same decision as live

    plan = parse_systems("ragctl,fixed,parrot,oracle", grid=SMALL)
    stats = ReplayStats()
    rows = await Replayer(ctl, CARD, store, stats).rows(QUERIES, plan, None)
    assert len(rows) == len(QUERIES) * len(plan.systems)
    rag = [r for r in rows if r["system"] == "ragctl"]
    assert {r["config"] for r in rag} == {proposal.plan.config.label}
    # ragctl's choice (the rules' largest) is not in the small grid: answered live once per
    # query, then found.
    assert proposal.plan.config not in SMALL and stats.live_cells >= len(QUERIES)
    assert store.get("q0", proposal.plan.config) is not None
    assert all(r["concurrency"] == 1 and r["rate"] is None and r["error"] is None for r in rows)
    fixed = next(r for r in rows if r["system"] == "fixed:stuff:3" and r["query_id"] == "q1")
    assert fixed["delay_s"] == store.get("q1", Config("stuff", 3))["delay_s"]
    evaluation = summarize(rows)
    [phase] = evaluation.phases.values()
    assert phase.oracle is not None and phase.oracle.n == len(QUERIES)
    assert phase.systems["ragctl"].delay_n == len(QUERIES)


async def test_replay_decides_once_per_objective_as_live_would(tmp_path: Path) -> None:
    ctl = controller()
    store = GridStore.open(tmp_path, key())
    await build(ctl, CARD, store, QUERIES[:1], SMALL)
    systems = "ragctl:quality,ragctl:latency,ragctl,parrot"
    stats = ReplayStats()
    rows = await Replayer(ctl, CARD, store, stats).rows(QUERIES[:1], parse_systems(systems), None)
    chosen = {r["system"]: r["config"] for r in rows}
    for objective in ("quality", "latency"):
        live = await ctl.propose(QUERIES[0].question, objective)
        assert chosen[f"ragctl:{objective}"] == live.plan.config.label
    # Four decisions for the query: quality, latency, the settings' (ragctl) and the
    # baselines' (Parrot*, asked for its profile whatever ragctl does).
    assert stats.decisions == 4
    assert chosen["ragctl:quality"] != chosen["ragctl:latency"]


async def test_a_profiled_row_adds_the_profile_time_beyond_retrieval_where_it_overlapped(
    tmp_path: Path,
) -> None:
    store = GridStore.open(tmp_path, key())
    ctl = controller()
    r = Replayer(ctl, CARD, store, ReplayStats())
    cell = {"delay_s": 2.0, "retrieve_s": 0.5, "scores": {}, "tokens": {}, "answer": "x"}
    q, c = QUERIES[0], Config("stuff", 1)
    beside = await ctl.propose(q.question, "quality")
    assert beside.profile_beside_retrieval  # quality asks the profiler beside retrieval
    after = replace(beside, profile_beside_retrieval=False)  # waited for the chunks
    assert r.row("fixed:stuff:1", q, c, cell, None, None, None)["delay_s"] == 2.0
    assert r.row("parrot", q, c, cell, 1.5, beside, None)["delay_s"] == 3.0
    assert r.row("parrot", q, c, cell, 0.2, beside, None)["delay_s"] == 2.0
    assert r.row("parrot", q, c, cell, 1.5, after, None)["delay_s"] == 3.5
    assert r.row("parrot", q, c, cell, 0.2, after, None)["delay_s"] == 2.2
    failed = r.row("ragctl", q, None, None, 1.0, None, "Waits: nothing fits the idle engine")
    assert failed["error"].startswith("Waits") and failed["delay_s"] is None


async def test_the_profile_cache_makes_a_second_replay_ask_nothing(tmp_path: Path) -> None:
    class Counting(FakeProfiler):
        asked = 0

        async def profile(self, *args, **kwargs):
            Counting.asked += 1
            return await super().profile(*args, **kwargs)

    path = tmp_path / "profiles.jsonl"
    first = CachedProfiler(Counting(), path, "m")
    got = await first.profile("q?", "meta", 100)
    assert Counting.asked == 1 and first.misses == 1
    second = CachedProfiler(Counting(), path, "m")
    again = await second.profile("q?", "meta", 100)
    assert Counting.asked == 1 and second.hits == 1 and again == got
    assert (await CachedProfiler(Counting(), path, "other").profile("q?", "meta", 100)) == got
    assert Counting.asked == 2  # another model is another key

    class Fitted(Counting):
        state = "a"

        def fingerprint(self, collection: str) -> str:
            return f"{collection}:{self.state}"

    fitted = CachedProfiler(Fitted(), path, "m")
    await fitted.profile("q?", "meta", 100, collection="c")
    await fitted.profile("q?", "meta", 100, collection="c")
    assert Counting.asked == 3  # a fitted profiler's state is part of the key
    Fitted.state = "b"  # retrained: its profiles are asked again
    await CachedProfiler(Fitted(), path, "m").profile("q?", "meta", 100, collection="c")
    assert Counting.asked == 4

    failing = CachedProfiler(FakeProfiler(ProfileOutcome(None, "timeout: 1s", "timeout", 1.0,
                                                         "v1")), path, "m")  # fmt: skip
    await failing.profile("x?", "meta", 100)
    await failing.profile("x?", "meta", 100)
    assert failing.misses == 2  # a failure is not cached
    garbage = CachedProfiler(FakeProfiler(ProfileOutcome(None, "garbage: pieces", "garbage",
                                                         0.3, "v1")), path, "m")  # fmt: skip
    await garbage.profile("y?", "meta", 100)
    await garbage.profile("y?", "meta", 100)
    assert garbage.misses == 1  # unusable output comes again: it is cached


def test_an_outcome_reads_back_from_its_dict() -> None:
    o = ProfileOutcome(a_profile(0.8), None, None, 1.25, "v1", raw="{}", prompt_tokens=10,
                       output_tokens=5)  # fmt: skip
    assert outcome_from_dict(json.loads(json.dumps(o.to_dict()))) == o
    e = ProfileOutcome(None, "garbage: x", "garbage", 0.5, "v1")
    assert outcome_from_dict(e.to_dict()) == e
    b = FieldBeliefs(0.3, 0.6, (0.5, 0.5) + (0.0,) * 7, (0.2, 0.3, 0.5))
    f = replace(o, beliefs=b, raw_beliefs=b, profiler="llm", learned_note="learned unsure 0.5")
    assert outcome_from_dict(json.loads(json.dumps(f.to_dict()))) == f


def test_agreement_counts_same_choices_and_answers_and_lists_the_rest() -> None:
    from ragctl.evaluation.replay import agreement

    def r(system, qid, config, answer, f1, error=None):
        return {"system": system, "query_id": qid, "config": config, "answer": answer,
                "scores": {"f1": f1}, "primary": "f1", "error": error}  # fmt: skip

    live = [r("ragctl", "q0", "stuff:3", "a", 1.0), r("ragctl", "q1", "stuff:3", "b", 0.0),
            r("ragctl", "q2", "stuff:3", "c", 0.0, error="EngineError: x"),
            r("parrot", "q0", "stuff:6", "a", 1.0)]  # fmt: skip
    replayed = [r("ragctl", "q0", "stuff:3", "a", 1.0), r("ragctl", "q1", "stuff:6", "z", 0.5),
                r("ragctl", "q2", "stuff:3", "c", 0.0),
                r("fixed:stuff:1", "q0", "stuff:1", "a", 1)]  # fmt: skip
    [a] = agreement(live, replayed)  # parrot and fixed:stuff:1 are on one side only
    assert (a.system, a.n, a.same_config, a.same_answer) == ("ragctl", 2, 1, 1)
    assert a.live_quality == 0.5 and a.replay_quality == 0.75
    [d] = a.disagreements
    assert (d["query_id"], d["live"], d["replay"], d["replay_score"]) == (
        "q1",
        "stuff:3",
        "stuff:6",
        0.5,
    )


def test_a_replayed_row_carries_the_cells_time_to_first_token(tmp_path: Path) -> None:
    r = Replayer(controller(), CARD, GridStore.open(tmp_path, key()), ReplayStats())
    cell = {"delay_s": 2.0, "retrieve_s": 0.5, "ttft_s": 1.5, "scores": {}, "answer": "x"}
    q, c = QUERIES[0], Config("stuff", 1)
    assert r.row("fixed:stuff:1", q, c, cell, None, None, None)["ttft_s"] == 1.5
    assert r.row("parrot", q, c, cell, 1.5, None, None)["ttft_s"] == 3.0  # all of it serial
    old = {k: v for k, v in cell.items() if k != "ttft_s"}  # built before streaming
    assert r.row("parrot", q, c, old, 1.5, None, None)["ttft_s"] is None


async def test_baselines_read_a_profile_where_ragctl_leaves_it_unasked(tmp_path: Path) -> None:
    from tests.unit.test_controller_cost import indifferent_labels

    slow = ProfileOutcome(a_profile(0.95), None, None, 0.5, "v1")
    ctl = controller(profiler=FakeProfiler(slow))
    indifferent_labels(ctl.quality)
    store = GridStore.open(tmp_path, key())
    plan = parse_systems("ragctl,parrot,adaptiverag,static", grid=SMALL)
    table = {"high-joint": "stuff:3", "*": "stuff:1", "static": "map_rerank:2"}
    rows = await Replayer(ctl, CARD, store, ReplayStats()).rows(QUERIES[:1], plan, table)
    by = {r["system"]: r for r in rows}
    assert by["ragctl"]["decision"]["profile"]["profiler"] == "unasked"
    assert by["ragctl"]["profile_s"] == 0.0
    for name in ("parrot", "adaptiverag"):
        assert by[name]["profile_s"] == 0.5 and by[name]["decision"]["profile_used"]
    assert by["adaptiverag"]["config"] == "stuff:3"  # its class from the profile, not "*"
    # Static*: the table's one configuration, no profile asked or paid for, no decision.
    s = by["static"]
    assert s["config"] == "map_rerank:2" and s["profile_s"] is None and s["decision"] is None
    assert s["error"] is None and s["delay_s"] is not None


async def test_replay_warms_each_objectives_trust_and_baselines_leave_it(tmp_path: Path) -> None:
    import dataclasses

    from tests.unit.test_controller import NO_GOLDEN

    untrusted = ProfileOutcome(a_profile(0.5), None, None, 0.5, "v1")
    ctl = controller(
        profiler=FakeProfiler(untrusted),
        policy=dataclasses.replace(NO_GOLDEN, untrusted_window=3),
    )
    replayer = Replayer(ctl, CARD, GridStore.open(tmp_path, key()), ReplayStats())
    plan = parse_systems("ragctl:balanced,parrot,adaptiverag", grid=SMALL)
    # The calibration split's profiles, as a deployment would have asked them first.
    await replayer.warm_trust(QUERIES, plan)
    assert list(ctl.trust_for("balanced").recent) == [False] * 3
    assert ("squad", "latency") not in ctl.trust  # no such objective replayed
    table = {"*": "stuff:1"}
    rows = await replayer.rows(QUERIES[:2], plan, table)
    by = {(r["system"], r["query_id"]): r for r in rows}
    for q in QUERIES[:2]:
        assert by[("ragctl:balanced", q.id)]["decision"]["profile"]["profiler"] == "unasked"
        for name in ("parrot", "adaptiverag"):  # they read (and pay for) a profile
            assert by[(name, q.id)]["profile_s"] == 0.5
    # Only ragctl's own decisions count in its record: two queries left unasked.
    assert ctl.trust_for("balanced").skipped == 2
    assert list(ctl.trust_for("balanced").recent) == [False] * 3


class TimedEngine(FakeEngine):
    """A fake engine whose stages take time, so that its cells' stages teach a delay model."""

    async def generate(self, requests):
        await asyncio.sleep(0.005)
        return await super().generate(requests)


async def test_replay_learns_from_ragctls_chosen_cells_after_deciding(tmp_path: Path) -> None:
    ctl = controller(engine=TimedEngine())
    store = GridStore.open(tmp_path, key())
    # What ragctl:latency and ragctl:quality choose for these queries, and one config neither does.
    grid = parse_configs("stuff:1,stuff:3,map_reduce:9:120")
    await build(ctl, CARD, store, QUERIES, grid)
    warmed = ctl.slo.delay
    before = warmed.observations  # the build answered live: the model learned as it ran
    at_decision: list[tuple[str, object, object, int]] = []
    propose = ctl.propose

    async def recording(question, objective=None, *args, **kw):
        delay = ctl.slo.delay
        at_decision.append((question, objective, delay, delay.observations))
        return await propose(question, objective, *args, **kw)

    ctl.propose = recording  # type: ignore[method-assign]
    plan = parse_systems("ragctl:latency,ragctl:quality,fixed:stuff:1", grid=grid)
    stats = ReplayStats()
    rows = await Replayer(ctl, CARD, store, stats).rows(QUERIES, plan, None)
    assert stats.live_cells == 0  # every choice is in the grid
    assert ctl.slo.delay is warmed and warmed.observations == before  # the warmed one, untouched
    stages: dict[tuple[str, str], int] = {}
    for q in QUERIES:
        chosen = {r["system"]: r["config"] for r in rows if r["query_id"] == q.id}
        assert len({chosen["ragctl:latency"], chosen["ragctl:quality"], "stuff:1"}) == 3
        for objective in ("latency", "quality"):
            cell = store.get(q.id, Config.parse(chosen[f"ragctl:{objective}"]))
            stages[objective, q.id] = len(cell["stages"])
    # Each objective's chosen cells once, into its own model; the fixed system's never.
    assert stats.learned == sum(stages.values()) > 0
    # Prequential, per objective: a query's decision saw every earlier query's cell that this
    # objective chose, none of its own, and nothing another objective chose.
    for objective in ("latency", "quality"):
        mine = [(question, d, n) for question, o, d, n in at_decision if o == objective]
        [model] = {id(d) for _, d, _ in mine}
        assert model != id(warmed)
        seen = before
        for q in QUERIES:
            assert [n for question, _, n in mine if question == q.question] == [seen]
            seen += stages[objective, q.id]


async def test_a_cell_answered_live_in_replay_is_not_learned_twice(tmp_path: Path) -> None:
    ctl = controller(engine=TimedEngine())
    store = GridStore.open(tmp_path, key())
    await build(ctl, CARD, store, QUERIES, SMALL)
    stats = ReplayStats()
    before = ctl.slo.delay.observations
    replayer = Replayer(ctl, CARD, store, stats)
    await replayer.rows(QUERIES, parse_systems("ragctl"), None)
    # ragctl's choice is outside the small grid: answered live, which taught its objective's
    # model as it ran (the warmed model it was copied from stays as it was).
    assert stats.live_cells == len(QUERIES) and stats.learned == 0
    assert replayer._models[None].observations > before == ctl.slo.delay.observations


def test_the_delay_check_compares_predictions_with_the_grids_solo_delays(tmp_path: Path) -> None:
    store = GridStore.open(tmp_path, key())
    solo = {("q0", "stuff:1"): 2.0, ("q0", "map_rerank:1"): 3.0, ("q0", "stuff:6"): 8.0,
            ("q1", "stuff:1"): 2.0, ("q1", "map_rerank:1"): 4.0}  # fmt: skip
    for (q, c), s in solo.items():
        store.add({"query_id": q, "config": c, "delay_s": s, "error": None})

    def row(q: str, chosen: str, candidates: list[tuple[str, float, float]]) -> dict:
        cands = [{"config": c, "delay_s": d, "quality": p} for c, d, p in candidates]
        return {"system": "ragctl:balanced", "query_id": q, "config": chosen,
                "decision": {"choice": {"candidates": cands}}}  # fmt: skip

    rows = [
        # Right: stuff:1 is the fastest of the two predicted alike; stuff:6 is predicted better.
        row(
            "q0",
            "stuff:1",
            [("stuff:1", 2.0, 0.5), ("map_rerank:1", 2.5, 0.5), ("stuff:6", 4.0, 0.6)],
        ),
        # Wrong: map_rerank:1 was predicted faster, stuff:1 ran in half its time.
        row("q1", "map_rerank:1", [("map_rerank:1", 1.0, 0.5), ("stuff:1", 2.0, 0.5)]),
        {"system": "fixed:stuff:1", "query_id": "q0", "config": "stuff:1", "decision": None},
    ]
    [check] = delay_check(rows, store)
    assert check.system == "ragctl:balanced" and check.pairs == 5
    # |pred / solo - 1|: 0, 1/6, 1/2 (q0); 3/4, 0 (q1)
    assert check.median_error == pytest.approx(1 / 6)
    assert (check.queries, check.chose_fastest) == (2, 1)
    assert check.regret == pytest.approx((1.0 + 2.0) / 2)


def test_timing_noise_pairs_only_cells_of_one_query_that_did_the_same_work(
    tmp_path: Path,
) -> None:
    store = GridStore.open(tmp_path, key())

    def add(q: str, config: str, delay: float, *stages: tuple[int, int, int], error=None) -> None:
        names = ["answer"] if config.startswith("stuff") else ["map"]
        store.add({"query_id": q, "config": config, "delay_s": delay, "error": error,
                   "stages": [{"name": names[0], "calls": c, "prompt_tokens": p,
                               "output_tokens": o} for c, p, o in stages]})  # fmt: skip

    add("q0", "stuff:1", 2.0, (1, 300, 40))
    add("q0", "map_rerank:1", 2.2, (1, 312, 40))  # same work: 12 prompt tokens apart
    add("q0", "stuff:2", 2.6, (1, 600, 40))  # twice the prompt: other work
    add("q0", "stuff:3", 9.0, (1, 303, 40), error="boom")  # failed: never paired
    add("q1", "stuff:1", 3.0, (1, 300, 40))
    add("q1", "map_rerank:1", 3.0, (1, 310, 41))  # one more output token: other work
    add("q2", "stuff:1", 4.0, (1, 300, 40))  # alone in its query: nothing to pair with q0's
    noise = timing_noise(store, ["q0", "q1", "q2"])
    assert noise.pairs == 1 and noise.median_gap == pytest.approx(0.1)
    assert timing_noise(store, ["q1", "q2"]).to_dict() == {"pairs": 0, "median_gap": None}


def test_grid_sizes_count_each_grid_and_the_queries_it_is_complete_for(tmp_path: Path) -> None:
    assert grid_sizes(tmp_path, "squad", SMALL) == []
    store = GridStore.open(tmp_path, key())
    for c in SMALL:
        store.add({"query_id": "q0", "config": c.label})
    store.add({"query_id": "q1", "config": "stuff:1"})
    store.add({"query_id": "q1", "config": "stuff:1"})  # a cell built twice counts once
    GridStore.open(tmp_path, key(model="other")).add({"query_id": "q0", "config": "stuff:1"})
    big, small = grid_sizes(tmp_path, "squad", SMALL)
    assert (big.model, big.queries, big.cells, big.complete) == ("m", 2, len(SMALL) + 1, 1)
    assert (small.model, small.queries, small.cells, small.complete) == ("other", 1, 1, 0)
