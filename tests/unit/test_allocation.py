"""The offline allocation: piecewise-linear fits, the throughput MILP on synthetic curves whose
optimum is worked out by hand (in the comments), and the plan file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ragctl.allocation import (
    CpuComponent,
    Curve,
    EngineComponent,
    Problem,
    fit_piecewise_linear,
    load_plan,
    problem_from_curves,
    solve,
    write_plan,
)
from ragctl.allocation.plan import batch_wait_ms, plan_concurrency, query_latency_s
from ragctl.errors import DataNotFound, InvalidRequest, InvalidSetting
from ragctl.settings import Settings

# -- fits ----------------------------------------------------------------------------------------


def test_fit_recovers_a_two_segment_curve_exactly() -> None:
    # 10 ms + 1 ms per item up to 8, then 4 ms per item: the break is at a measured x.
    def f(x: float) -> float:
        return 0.011 + 0.001 * (x - 1) if x <= 8 else 0.018 + 0.004 * (x - 8)

    xs = [1, 2, 4, 8, 16, 32]
    fit = fit_piecewise_linear(xs, [f(x) for x in xs])
    assert len(fit.segments) == 2
    assert [k[0] for k in fit.knots] == [1, 8, 32]
    for (_, y), want in zip(fit.knots, (f(1), f(8), f(32)), strict=True):
        assert y == pytest.approx(want, rel=1e-9)
    assert fit.segments[0].slope == pytest.approx(0.001)
    assert fit.segments[1].slope == pytest.approx(0.004)
    assert fit(64) == pytest.approx(f(64))  # extrapolates along the last segment
    curve = Curve.fitted("embed", 1, {x: f(x) for x in xs})
    assert curve.max_rel_error == pytest.approx(0, abs=1e-9)
    assert curve.predict(12) == pytest.approx(f(12))


def test_fit_prefers_a_single_line_when_it_is_as_good() -> None:
    xs = [1, 2, 4, 8]
    fit = fit_piecewise_linear(xs, [0.5 + 0.25 * x for x in xs])
    assert len(fit.segments) == 1
    assert fit.segments[0].slope == pytest.approx(0.25)
    assert fit.segments[0].intercept == pytest.approx(0.5)
    # One distinct x: a constant; two: a line through both.
    assert fit_piecewise_linear([4, 4], [1.0, 3.0])(100) == 2.0
    assert len(fit_piecewise_linear([1, 2], [1.0, 3.0]).segments) == 1
    with pytest.raises(ValueError):
        fit_piecewise_linear([], [])


def test_curve_round_trips_through_a_dict() -> None:
    c = Curve.fitted("map", None, {1: 1.0, 2: 1.2, 4: 1.5, 8: 2.5}, repeats=1)
    back = Curve.from_dict(c.to_dict())
    assert back == c
    assert back.label == "map" and Curve.fitted("embed", 2, {1: 0.1}).label == "embed@2t"


# -- MILP ----------------------------------------------------------------------------------------


def test_bigger_batch_wins() -> None:
    # embed: batch 1 in 10 ms -> 100 q/s; batch 4 in 20 ms -> 200 q/s.
    # map (2 calls/query): 1 call 1.0 s, 2 in 1.2 s, 4 in 2.0 s -> 1.0, 0.6, 0.5 s per call;
    # at b=4 the engine is busy 2 * T * 0.5 = T, so T = 1 q/s with map the bottleneck.
    embed = CpuComponent("embed", 1, {(1, 1): 0.010, (4, 1): 0.020})
    assert solve(Problem(cpu=(embed,), cpu_threads=1)).cpu["embed"].batch == 4
    assert solve(Problem(cpu=(embed,), cpu_threads=1)).throughput_qps == pytest.approx(200)
    mapper = EngineComponent("map", 2, {1: 1.0, 2: 1.2, 4: 2.0})
    sol = solve(Problem(cpu=(embed,), engine=(mapper,), cpu_threads=1))
    assert sol.throughput_qps == pytest.approx(1.0)
    assert sol.engines[0].max_num_seqs == 4
    assert sol.bottleneck == "map" and sol.bottleneck_resource == "engine0"
    assert sol.engines[0].busy == pytest.approx(1.0)
    # Not the bottleneck: embed keeps the shortest batch (second solve).
    assert sol.cpu["embed"].batch == 1
    assert sol.status == "optimal"


def test_the_thread_budget_forces_a_trade_off() -> None:
    # A: 1 thread 10 q/s, 2 threads 20 q/s. B: 1 thread 20 q/s, 2 threads 25 q/s.
    # Budget 3: A2+B1 -> min(20, 20) = 20 beats A1+B2 -> min(10, 25) = 10.
    a = CpuComponent("a", 1, {(1, 1): 0.10, (1, 2): 0.05})
    b = CpuComponent("b", 1, {(1, 1): 0.05, (1, 2): 0.04})
    sol = solve(Problem(cpu=(a, b), cpu_threads=3))
    assert sol.throughput_qps == pytest.approx(20)
    assert (sol.cpu["a"].threads, sol.cpu["b"].threads) == (2, 1)
    assert sol.cpu_threads_used == 3
    # Budget 2: one thread each, A binds at 10 q/s.
    sol = solve(Problem(cpu=(a, b), cpu_threads=2))
    assert sol.throughput_qps == pytest.approx(10)
    assert sol.bottleneck == "a" and sol.utilisation["cpu:a"] == pytest.approx(1)
    # Budget 4 but one shared thread count: 2 each (A binds at 20).
    sol = solve(Problem(cpu=(a, b), cpu_threads=4, same_threads=(("a", "b"),)))
    assert (sol.cpu["a"].threads, sol.cpu["b"].threads) == (2, 2)
    # Budget 3 with one shared thread count: 1 each, 10 q/s.
    sol = solve(Problem(cpu=(a, b), cpu_threads=3, same_threads=(("a", "b"),)))
    assert sol.throughput_qps == pytest.approx(10)


def _engine_mix() -> tuple[EngineComponent, ...]:
    # Per call at b=4: profile 0.8/4 = 0.2 s, map 1.6/4 = 0.4 s, reduce 0.4 s.
    return (
        EngineComponent("profile", 1, {1: 0.5, 2: 0.6, 4: 0.8}),
        EngineComponent("map", 3, {1: 1.0, 2: 1.2, 4: 1.6}),
        EngineComponent("reduce", 1, {1: 1.0, 2: 1.2, 4: 1.6}),
    )


def test_two_engines_give_profiling_its_own_engine() -> None:
    # One engine: busy T * (0.2 + 3 * 0.4 + 0.4) = 1.8 T -> T = 1 / 1.8.
    # Two engines: profile alone (0.2 T), synthesis together (1.6 T) -> T = 1 / 1.6.
    group = (("map", "reduce"),)
    one = solve(Problem(engine=_engine_mix(), engines=1, same_engine=group))
    assert one.throughput_qps == pytest.approx(1 / 1.8)
    two = solve(Problem(engine=_engine_mix(), engines=2, same_engine=group))
    assert two.throughput_qps == pytest.approx(1 / 1.6)
    a = two.assignment
    assert a["map"] == a["reduce"] != a["profile"]
    synth, prof = two.engines[a["map"]], two.engines[a["profile"]]
    assert synth.max_num_seqs == 4 and synth.busy == pytest.approx(1.0)
    # The profiling engine has slack: it keeps the lowest-latency batch.
    assert prof.max_num_seqs == 1 and prof.busy < 1
    assert two.bottleneck == "map"


def test_latency_cap_limits_the_batch_and_an_impossible_cap_says_why() -> None:
    mapper = EngineComponent("map", 1, {1: 1.0, 2: 1.2, 4: 1.6})
    # Cap 1.3 s: b=4 (1.6 s) is out, b=2 serves 2 / 1.2 calls/s.
    sol = solve(Problem(engine=(mapper,), latency_cap_s=1.3))
    assert sol.engines[0].max_num_seqs == 2
    assert sol.throughput_qps == pytest.approx(2 / 1.2)
    with pytest.raises(InvalidRequest, match=r"latency cap 300\.0 ms is infeasible: map"):
        solve(Problem(engine=(mapper,), latency_cap_s=0.3))
    embed = CpuComponent("embed", 1, {(1, 1): 0.010})
    with pytest.raises(InvalidRequest, match="embed takes at least 10.0 ms"):
        solve(Problem(cpu=(embed,), latency_cap_s=0.005))


def test_components_without_visits_are_left_out_and_bad_input_is_refused() -> None:
    unused = EngineComponent("rerank", 0, {1: 100.0})
    mapper = EngineComponent("map", 1, {1: 1.0})
    sol = solve(Problem(engine=(mapper, unused)))
    assert sol.throughput_qps == pytest.approx(1.0) and "rerank" not in sol.assignment
    with pytest.raises(InvalidRequest, match="nothing to allocate"):
        solve(Problem(engine=(unused,)))
    with pytest.raises(InvalidRequest, match="unique"):
        solve(Problem(engine=(mapper, mapper)))
    a, b = CpuComponent("a", 1, {(1, 1): 0.1}), CpuComponent("b", 1, {(1, 1): 0.1})
    with pytest.raises(InvalidRequest, match="need a thread each; the CPU thread budget is 1"):
        solve(Problem(cpu=(a, b), cpu_threads=1))


def test_problem_from_curves() -> None:
    curves = [
        Curve.fitted("embed", 1, {1: 0.010, 2: 0.012, 4: 0.016}),
        Curve.fitted("embed", 2, {1: 0.008, 2: 0.009, 4: 0.011}),
        Curve.fitted("search", 1, {1: 0.001, 2: 0.0015, 4: 0.0025}),
        Curve.fitted("search", 2, {1: 0.001, 2: 0.0012, 4: 0.0018}),
        Curve.fitted("profile", None, {1: 0.5, 2: 0.6, 4: 0.8}),
        Curve.fitted("map", None, {1: 1.0, 2: 1.2, 4: 1.6}),
        Curve.fitted("stuff", None, {1: 1.0, 2: 1.2, 4: 1.6}),
    ]
    visits = {"embed": 1, "search": 1, "profile": 1, "map": 3, "stuff": 0}
    problem = problem_from_curves(curves, visits, cpu_threads=2)
    assert [c.name for c in problem.engine] == ["profile", "map"]  # stuff: no visits
    assert problem.same_threads == (("embed", "search"),)
    assert problem.engine_batch_sizes == (1, 2, 4)
    sol = solve(problem)
    # Two CPUs and one shared thread count: one thread each. Engine: (0.2 + 3 * 0.4) T <= 1.
    assert sol.cpu["embed"].threads == sol.cpu["search"].threads == 1
    assert sol.throughput_qps == pytest.approx(1 / 1.4)


# -- plan file -----------------------------------------------------------------------------------


def test_batch_wait_is_the_time_to_fill_the_batch_capped() -> None:
    assert batch_wait_ms(1, 1, 10) == 0
    assert batch_wait_ms(4, 1, 1000) == 3.0  # 3 more arrivals, 1 ms apart
    assert batch_wait_ms(4, 1, 100) == 20.0  # 30 ms, capped
    assert batch_wait_ms(4, 2, 1000) == 1.5


def _solved() -> tuple[object, list[Curve], dict[str, float], dict[str, float]]:
    curves = [
        Curve.fitted("embed", 1, {1: 0.010, 4: 0.016}),
        Curve.fitted("search", 1, {1: 0.001, 4: 0.002}),
        Curve.fitted("profile", None, {1: 0.5, 4: 0.8}),
        Curve.fitted("map", None, {1: 1.0, 4: 1.6}),
        Curve.fitted("reduce", None, {1: 1.0, 4: 1.6}),
    ]
    visits = {"embed": 1.0, "search": 1.0, "profile": 1.0, "map": 3.0, "reduce": 1.0}
    presence = {"embed": 1.0, "search": 1.0, "profile": 1.0, "map": 1.0, "reduce": 1.0}
    return solve(problem_from_curves(curves, visits, cpu_threads=2)), curves, visits, presence


def test_plan_round_trip(tmp_path: Path) -> None:
    sol, curves, visits, presence = _solved()
    path = tmp_path / "plan.yaml"
    doc = write_plan(
        path, solution=sol, curves=curves, visits=visits, presence=presence,  # type: ignore[arg-type]
        machine={"cpu_count": 2, "dataset": "squad"},
    )  # fmt: skip
    plan = load_plan(path)
    # T = 1 / 1.8 (engine-bound); embed and search keep batch 1, so no waits.
    assert plan.predicted_throughput_qps == pytest.approx(1 / 1.8, rel=1e-5)
    assert plan.settings_overrides() == {
        "embed_batch_size": 1, "embed_batch_wait_ms": 0.0, "search_batch_size": 1,
        "search_batch_wait_ms": 0.0, "retrieval_threads": 1, "max_num_seqs": 4,
    }  # fmt: skip
    # Latency: max(10 + 1 ms, 0.8 s profile) + 1.6 map + 1.6 reduce = 4.0 s; 4.0 / 1.8 -> 3.
    assert query_latency_s(sol, visits, presence) == pytest.approx(4.0)  # type: ignore[arg-type]
    assert plan.concurrency == plan_concurrency(sol, visits, presence) == 3  # type: ignore[arg-type]
    # 8 mappers per query at max_num_seqs 4: two rounds of the map batch.
    eight = {**visits, "map": 8.0}
    assert query_latency_s(sol, eight, presence) == pytest.approx(0.8 + 2 * 1.6 + 1.6)  # type: ignore[arg-type]
    assert plan.bottleneck == "map" and doc["curves"][0]["component"] == "embed"
    applied = plan.apply(Settings(data_dir=tmp_path))
    assert applied.max_num_seqs == 4 and applied.data_dir == tmp_path
    assert plan.warnings(cpu_count=8, dataset="squad") == [
        f"{path} was planned for 2 CPUs; this machine has 8"
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("settings: {max_num_seqs: 0}", r"settings\.max_num_seqs: Input should be greater"),
        ("settings: {embed_batch_size: many}", r"settings\.embed_batch_size: .*valid integer"),
        ("settings: {batch: 4}", r"settings\.batch is not a ragctl setting"),
        ("settings: {}\nsurprise: 1", "unknown key 'surprise'"),
        ("settings: [1, 2]", "must be a mapping"),
        ("- a list", "a plan is a YAML mapping"),
        ("settings: {max_num_seqs: 4}\nconcurrency: 0", "concurrency must be an integer >= 1"),
        ("settings: {a: [}", r"plan\.yaml:1:.*not YAML"),
    ],
)
def test_plan_validation_errors_name_the_key(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=error):
        load_plan(path)


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="not found"):
        load_plan(tmp_path / "nope.yaml")


def test_a_hand_written_plan_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"settings": {"max_num_seqs": 8}, "concurrency": 5}))
    plan = load_plan(path)
    assert plan.settings_overrides() == {"max_num_seqs": 8} and plan.concurrency == 5


def test_a_two_engine_plan_is_carried_out_engine_by_engine(tmp_path: Path) -> None:
    """`--engines 2`: each engine's sequences, the profiler's engine and the synthesis engines
    become settings the pool applies (engine i of the plan is engine i of the pool)."""
    from ragctl.allocation.plan import plan_settings
    from ragctl.controller import admission_for
    from ragctl.engine.pool import EnginePool
    from tests.unit.test_engine_pool import PoolFake

    group = (("map", "reduce"),)
    two = solve(Problem(engine=_engine_mix(), engines=2, same_engine=group))
    out = plan_settings(two, {"profile": 1.0, "map": 3.0, "reduce": 1.0})
    prof, synth = two.assignment["profile"], two.assignment["map"]
    seqs = [e.max_num_seqs for e in two.engines]
    assert out["engine_max_num_seqs"] == ",".join(map(str, seqs))
    assert out["profiler_engine"] == prof and out["synthesis_engines"] == str(synth)
    settings = Settings(data_dir=tmp_path).model_copy(update=out)
    assert Settings.int_list(settings.engine_max_num_seqs) == seqs
    pool = EnginePool.of([(PoolFake(), "http://e0"), (PoolFake(), "http://e1")])
    queue = admission_for(pool, 8, synthesis_engines=Settings.int_list(settings.synthesis_engines))
    assert [s.name for s in queue.slots] == [f"http://e{synth}"]  # profiling engine left out
    with pytest.raises(InvalidSetting, match="synthesis_engines names engine 5"):
        admission_for(pool, 8, synthesis_engines=[5])


async def test_the_profiler_runs_on_the_planned_engine_of_the_pool(tmp_path: Path) -> None:
    from ragctl.engine.pool import EnginePool
    from ragctl.service import open_profiler
    from tests.unit.test_engine_pool import PoolFake

    pool = EnginePool.of([(PoolFake(), "http://e0"), (PoolFake(), "http://e1")])
    settings = Settings(profiler="json", profiler_engine=1, cache_dir=tmp_path)
    profiler = await open_profiler(settings, pool)
    assert profiler.engine is pool.members[1]
    with pytest.raises(InvalidSetting, match="profiler_engine is 2"):
        await open_profiler(settings.model_copy(update={"profiler_engine": 2}), pool)


async def test_engine_max_num_seqs_must_name_every_engine_of_the_pool() -> None:
    from ragctl.engine import open_engine

    with pytest.raises(InvalidSetting, match="names 2 engines; the pool has 1"):
        await open_engine(Settings(engine_url="http://127.0.0.1:9", engine_max_num_seqs="4,2"))
    with pytest.raises(InvalidSetting, match="comma-separated whole numbers"):
        Settings().with_overrides(engine_max_num_seqs="4,x")
