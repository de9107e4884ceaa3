"""The evaluation's pure policy: system names, the AdaptiveRAG* calibration table, Parrot*'s
median, the test/calibration split, interleaving, Poisson arrivals, `--rate` and resume
bookkeeping."""

from __future__ import annotations

import json
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ragctl.errors import InvalidRequest
from ragctl.evaluation.run import check_out_dir, parse_rates, save_meta
from ragctl.evaluation.runner import done_keys, interleave, poisson_arrivals
from ragctl.evaluation.systems import (
    DEFAULT_GRID,
    STATIC,
    adaptiverag_config,
    calibrate,
    complexity_class,
    median_config,
    parse_systems,
    split,
    static_config,
)
from ragctl.types import Config, ConfigSpace, Profile, Query


def test_parse_systems_expands_the_grid_and_derives_the_oracle() -> None:
    plan = parse_systems("ragctl,fixed,adaptiverag,parrot,oracle")
    names = [s.name for s in plan.systems]
    assert names[0] == "ragctl" and names[-2:] == ["adaptiverag", "parrot"]
    assert plan.grid == DEFAULT_GRID and plan.oracle and plan.needs_calibration
    assert {c.method for c in plan.grid} == {"map_rerank", "stuff", "map_reduce"}
    one = parse_systems("fixed:stuff:5, fixed:stuff:5,ragctl")
    assert [s.name for s in one.systems] == ["fixed:stuff:5", "ragctl"]
    assert not one.needs_calibration and not one.oracle


@pytest.mark.parametrize(
    ("text", "message"),
    [("ragctl,gpt4", "unknown system 'gpt4'"), ("", "no systems"),
     ("fixed:stuff", "system 'fixed:stuff'"), ("ragctl,oracle", "oracle picks among")],
)  # fmt: skip
def test_parse_systems_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_systems(text)


def profile(complexity: str = "low", joint: bool = False) -> Profile:
    return Profile(complexity, joint, 1, (30, 60), 0.95)  # type: ignore[arg-type]


def test_complexity_class() -> None:
    assert complexity_class(None) == "unknown"
    assert complexity_class(profile("high", True)) == "high-joint"


def row(system: str, qid: str, f1: float | None, delay: float, error: str | None = None) -> dict:
    return {"system": system, "query_id": qid, "primary": "f1", "scores": {"f1": f1},
            "delay_s": delay, "error": error}  # fmt: skip


def test_calibrate_picks_the_best_config_per_class_ties_to_the_faster() -> None:
    rows = [
        row("fixed:stuff:3", "a", 0.5, 1.0), row("fixed:map_reduce:9:100", "a", 0.9, 8.0),
        row("fixed:stuff:3", "b", 1.0, 1.0), row("fixed:map_reduce:9:100", "b", 1.0, 8.0),
        row("fixed:stuff:3", "c", 0.0, 1.0),
        row("fixed:map_reduce:9:100", "c", None, 8.0, error="EngineTimeout: x"),
        row("fixed:stuff:9", "c", 1.0, 3.0, error="EngineTimeout: x"), row("ragctl", "a", 1, 1),
    ]  # fmt: skip
    classes = {"a": "high-joint", "b": "low-single", "c": "low-single"}
    table = calibrate(rows, classes)
    assert table["high-joint"] == "map_reduce:9:100"
    # low-single: stuff:3 (1 + 0) / 2 ties map_reduce (1 + failed 0) / 2: the faster wins.
    assert table["low-single"] == "stuff:3"
    assert table["*"] == "map_reduce:9:100"  # mean (0.9 + 1 + 0) / 3 vs stuff:3's 0.5
    assert adaptiverag_config(table, profile("high", True)) == Config("map_reduce", 9, 100)
    assert adaptiverag_config(table, None) == Config("map_reduce", 9, 100)  # unseen: overall
    # Static*: one configuration for all, by `balanced`'s utility on the measured means:
    # stuff:3 0.5 - 0.1 x 1/1 beats map_reduce's 0.63 - 0.1 x 8/1 and stuff:9's 0 - 0.1 x 3/1.
    assert table[STATIC] == "stuff:3" and static_config(table) == Config("stuff", 3)
    assert calibrate(rows, classes, delay_weight=0.0)[STATIC] == "map_reduce:9:100"
    assert calibrate(rows, classes, delay_weight=0.01)[STATIC] == "map_reduce:9:100"
    with pytest.raises(InvalidRequest, match="static needs a calibration table"):
        static_config({"*": "stuff:3"})  # a table made before Static* existed
    with pytest.raises(InvalidRequest, match="no scored answers"):
        calibrate([row("fixed:stuff:3", "a", None, 1.0)], classes)  # no references
    plan = parse_systems("ragctl,static")
    assert [s.kind for s in plan.systems] == ["ragctl", "static"] and plan.needs_calibration
    assert not parse_systems("ragctl,parrot").needs_calibration


def test_median_config() -> None:
    default = ConfigSpace(("stuff", "map_reduce"), (3, 9), (50, 75, 100), "default")
    assert median_config(default) == Config("stuff", 6)
    mr = ConfigSpace(("map_reduce",), (2, 6), (50, 75, 100), "rule")
    assert median_config(mr) == Config("map_reduce", 4, 75)
    three = ConfigSpace(("map_reduce", "map_rerank", "stuff"), (1, 1), (50,), "rule")
    assert median_config(three) == Config("stuff", 1)


@given(st.integers(1, 30), st.integers(0, 20), st.integers(0, 5))
def test_split_never_overlaps_and_grows_by_prefix(limit: int, calibration: int, seed: int) -> None:
    items = list(range(60))
    if limit + calibration > 60:
        with pytest.raises(InvalidRequest):
            split(items, limit, calibration, seed)
        return
    test, calib = split(items, limit, calibration, seed)
    assert len(test) == limit and len(calib) == calibration and not set(test) & set(calib)
    if limit + 1 + calibration <= 60:
        bigger, calib2 = split(items, limit + 1, calibration, seed)
        assert bigger[:limit] == test and calib2 == calib


def test_interleave_rotates_systems() -> None:
    systems = parse_systems("ragctl,fixed:stuff:1,parrot").systems
    queries = [Query(str(i), f"q{i}", ()) for i in range(3)]
    jobs = interleave(queries, systems)
    assert len(jobs) == 9 and len({j.key for j in jobs}) == 9
    firsts = [jobs[i * 3].system.name for i in range(3)]
    assert firsts == ["ragctl", "fixed:stuff:1", "parrot"]
    assert [j.query.id for j in jobs] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3


def test_poisson_arrivals_are_seeded_and_at_the_rate() -> None:
    a = poisson_arrivals(4000, 2.0, seed=1)
    assert a == poisson_arrivals(4000, 2.0, seed=1) != poisson_arrivals(4000, 2.0, seed=2)
    assert all(x < y for x, y in zip(a, a[1:], strict=False))
    gaps = [y - x for x, y in zip([0.0, *a], a, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(InvalidRequest):
        poisson_arrivals(3, 0, seed=0)


def test_done_keys_per_phase_and_torn_lines(tmp_path) -> None:
    path = tmp_path / "samples.jsonl"
    rows = [
        {"system": "ragctl", "query_id": "a", "rate": 0.1},
        {"system": "ragctl", "query_id": "b", "rate": 0.2},
        {"system": "parrot", "query_id": "a", "rate": 0.1, "error": "QueueFull: x"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"system": "rag')
    assert done_keys(path, 0.1) == {("ragctl", "a"), ("parrot", "a")}
    assert done_keys(path, 0.2) == {("ragctl", "b")}
    assert done_keys(tmp_path / "none.jsonl", None) == set()


def test_parse_rates() -> None:
    assert parse_rates(None) == [] and parse_rates("") == []
    assert parse_rates("0.02, 0.05,") == [0.02, 0.05]
    with pytest.raises(InvalidRequest, match="numbers separated by commas"):
        parse_rates("0.1,fast")
    with pytest.raises(InvalidRequest, match="must be positive"):
        parse_rates("0.1,0")


def test_check_out_dir_resume_rules(tmp_path) -> None:
    meta = {"dataset": "squad", "systems": "ragctl", "limit": 4, "seed": 0}
    assert check_out_dir(tmp_path, meta, resume=False) == {}
    with pytest.raises(InvalidRequest, match="nothing to resume"):
        check_out_dir(tmp_path, meta, resume=True)
    save_meta(tmp_path, {**meta, "started_at": "then"})
    with pytest.raises(InvalidRequest, match="already holds a run"):
        check_out_dir(tmp_path, meta, resume=False)
    assert check_out_dir(tmp_path, meta, resume=True)["started_at"] == "then"
    with pytest.raises(InvalidRequest, match=r"same run as before \(limit=4\)"):
        check_out_dir(tmp_path, {**meta, "limit": 5}, resume=True)
    # a samples.jsonl without run.json is a run too
    other = tmp_path / "other"
    other.mkdir()
    (other / "samples.jsonl").write_text("")
    with pytest.raises(InvalidRequest, match="already holds a run"):
        check_out_dir(other, meta, resume=False)


def test_ragctl_objective_systems() -> None:
    from ragctl.evaluation.systems import parse_systems, system_order
    from ragctl.types import AnswerOptions

    plan = parse_systems("ragctl,ragctl:balanced,ragctl:latency,fixed:stuff:3")
    by_name = {s.name: s for s in plan.systems}
    assert by_name["ragctl:balanced"].kind == "ragctl"
    assert by_name["ragctl:balanced"].objective == "balanced"
    assert by_name["ragctl"].objective is None
    assert sorted(by_name, key=system_order)[:3] == ["ragctl", "ragctl:balanced", "ragctl:latency"]
    with pytest.raises(InvalidRequest, match="objective must be one of"):
        parse_systems("ragctl:fastest")
    with pytest.raises(ValueError, match="objective"):
        AnswerOptions(objective="fastest")  # type: ignore[arg-type]
