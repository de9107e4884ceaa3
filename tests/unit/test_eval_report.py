"""Evaluation reports over hand-made `samples.jsonl` rows: summary numbers computed by hand, the
oracle's picks (ties, a query one fixed configuration lacks), every headline ratio (and the case
where no fixed configuration reaches ragctl's quality), error rows, a torn last line, the CSV's
columns, the plots and the rich rendering."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ragctl.errors import DataNotFound
from ragctl.evaluation.plots import write_plots
from ragctl.evaluation.ratios import Ratios, ratios
from ragctl.evaluation.render import render_report, slo_lines
from ragctl.evaluation.run import report_run
from ragctl.evaluation.summaries import Evaluation, Phase, oracle, phase_key, summarize
from ragctl.evaluation.systems import system_order
from ragctl.evaluation.writers import (
    SampleWriter,
    load_evaluation,
    load_samples,
    write_results,
    write_summary_csv,
)

STUFF5, STUFF9, MR = "fixed:stuff:5", "fixed:stuff:9", "fixed:map_reduce:9:100"
PNG = b"\x89PNG\r\n\x1a\n"


def row(
    system: str,
    qid: str,
    f1: float | None,
    delay: float,
    *,
    rate: float | None = 0.5,
    arrival: float = 0.0,
    config: str | None = None,
    profile: float | None = None,
    queue: float = 0.0,
    recall: float | None = 1.0,
    calls: int = 1,
    error: str | None = None,
    concurrency: int | None = None,
) -> dict[str, Any]:
    if config is None and system.startswith("fixed:"):
        config = system.removeprefix("fixed:")
    return {
        "dataset": "squad",
        "system": system,
        "query_id": qid,
        "rate": rate,
        "concurrency": concurrency,
        "arrival_s": arrival,
        "end_s": arrival + delay,
        "delay_s": delay,
        "queue_s": queue,
        "profile_s": profile,
        "config": config or "stuff:5",
        "tokens": {"calls": calls, "prompt": 100 * calls, "output": 10 * calls},
        "scores": {
            "f1": f1,
            "em": None if f1 is None else float(f1 == 1.0),
            "evidence_recall": recall,
            "evidence_hit": None if recall is None else float(recall > 0),
        },
        "primary": "f1",
        "answer": "x",
        "error": error,
        "decision": {},
    }


def rows_rate_half() -> list[dict[str, Any]]:
    return [
        # ragctl: f1 0.8/0.6/0.4 -> 0.6; delay 2/4/3 -> 3.0; one error row (q4)
        row("ragctl", "q1", 0.8, 2.0, arrival=0.0, config="stuff:5", profile=0.5, calls=1),
        row(
            "ragctl",
            "q2",
            0.6,
            4.0,
            arrival=1.0,
            config="map_reduce:9:100",
            profile=0.5,
            recall=0.5,
            calls=10,
        ),
        row("ragctl", "q3", 0.4, 3.0, arrival=2.0, config="stuff:5", recall=None, calls=1),
        row(
            "ragctl",
            "q4",
            0.0,
            5.0,
            arrival=3.0,
            config="stuff:9",
            profile=4.0,
            error="EngineTimeout: no answer in 5 s",
        ),
        # fixed stuff:5: f1 0.5667, delay 1.0
        row(STUFF5, "q1", 0.8, 1.0),
        row(STUFF5, "q2", 0.5, 1.0),
        row(STUFF5, "q3", 0.4, 1.0),
        # fixed stuff:9: f1 0.6333 (>= ragctl), delay 2.0
        row(STUFF9, "q1", 0.8, 2.0),
        row(STUFF9, "q2", 0.6, 2.0),
        row(STUFF9, "q3", 0.5, 2.0),
        # fixed map_reduce: q3 missing; f1 0.85, delay 3.5 (closest to ragctl's 3.0)
        row(MR, "q1", 0.8, 3.0, calls=10),
        row(MR, "q2", 0.9, 4.0, calls=10),
        # adaptiverag: f1 0.6, delay 5.0
        row("adaptiverag", "q1", 0.6, 4.0),
        row("adaptiverag", "q2", 0.6, 5.0),
        row("adaptiverag", "q3", 0.6, 6.0),
        # parrot: f1 0.5, delay 6.0
        row("parrot", "q1", 0.9, 6.0),
        row("parrot", "q2", 0.3, 6.0),
        row("parrot", "q3", 0.3, 6.0),
    ]


def rows_rate_one() -> list[dict[str, Any]]:
    # ragctl's 0.9 is above every fixed configuration's quality
    return [
        row("ragctl", "q1", 0.9, 2.0, rate=1.0, config="stuff:9", profile=0.2),
        row(STUFF5, "q1", 0.5, 1.0, rate=1.0),
        row(MR, "q1", 0.7, 4.0, rate=1.0),
    ]


INTERVAL_FIELDS = (
    "value_ci", "significant", "quality_diff_ci", "quality_diff_significant", "delay_ratio_ci",
    "delay_ratio_significant", "n", "left_out",
)  # fmt: skip


def without_intervals(r: Ratios) -> Ratios:
    """The ratios with every interval field None, as computed without per-query rows."""
    out = {}
    for f in fields(r):
        record = getattr(r, f.name)
        if f.name != "primary":
            names = {g.name for g in fields(record)}
            record = replace(record, **{k: None for k in INTERVAL_FIELDS if k in names})
        out[f.name] = record
    return replace(r, **out)


def subsequence(items: list[str], of: list[str]) -> bool:
    """Whether `items` appear in `of` in the same order (others may come between)."""
    rest = iter(of)
    return all(item in rest for item in items)


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return rows_rate_half() + rows_rate_one()


@pytest.fixture
def summary(rows: list[dict[str, Any]]) -> Evaluation:
    return summarize(rows)


# -- summaries ---------------------------------------------------------------------------------


def test_phases_and_order(summary: Evaluation) -> None:
    assert summary.dataset == "squad" and summary.primary == "f1"
    assert list(summary.phases) == ["0.5", "1"]
    half = summary.phases["0.5"]
    assert half.rate == 0.5 and half.concurrency is None
    assert list(half.systems) == ["ragctl", "adaptiverag", "parrot", MR, STUFF5, STUFF9]
    assert phase_key(None) == "closed" and phase_key(None, 4) == "closed:4"
    assert phase_key(2) == "2" == phase_key(2.0)


def test_system_summary_by_hand(summary: Evaluation) -> None:
    s = summary.phases["0.5"].systems["ragctl"]
    assert (s.n, s.answered, s.errors) == (4, 3, 1)
    assert s.error_kinds == {"EngineTimeout": 1}
    assert s.primary == "f1"
    assert s.primary_value == pytest.approx(0.6)
    assert s.quality["f1"] == pytest.approx(0.6)
    assert s.quality["em"] == 0.0
    assert s.quality["evidence_recall"] == pytest.approx(0.75)  # (1 + 0.5) / 2; None left out
    assert s.quality["evidence_hit"] == 1.0
    assert s.delay_mean_s == pytest.approx(3.0)
    assert s.delay_p50_s == pytest.approx(3.0)
    assert s.delay_p95_s == pytest.approx(3.9)  # 3 + 0.9 * (4 - 3)
    assert s.queue_mean_s == 0.0
    # answered 3 over the phase's span: first arrival 0.0, last end 8.0 (the error row's)
    assert s.throughput_qps == pytest.approx(3 / 8)
    # profile_s of answered rows (0.5 + 0.5 + none) over their delays (9); the error row's 4 s
    # of profiling is left out
    assert s.profiler_overhead == pytest.approx(1.0 / 9.0)
    assert s.configs == {"stuff:5": 2, "map_reduce:9:100": 1}
    assert s.top_config == "stuff:5"
    assert s.tokens == pytest.approx({"calls": 4.0, "prompt": 400.0, "output": 40.0})


def test_fixed_summary_and_no_profiler(summary: Evaluation) -> None:
    s = summary.phases["0.5"].systems[STUFF5]
    assert s.primary_value == pytest.approx((0.8 + 0.5 + 0.4) / 3)
    assert s.delay_mean_s == 1.0 and s.delay_p95_s == 1.0
    assert s.profiler_overhead is None
    assert s.throughput_qps == pytest.approx(3 / 1.0)  # all arrive at 0, end at 1
    assert s.configs == {"stuff:5": 3}


def test_errors_excluded_but_counted() -> None:
    rows = [
        row("ragctl", "q1", 1.0, 2.0),
        row("ragctl", "q2", 0.0, 100.0, error="EngineTimeout: late"),
        row("ragctl", "q3", 0.0, 100.0, error="RuntimeError"),
    ]
    s = summarize(rows).phases["0.5"].systems["ragctl"]
    assert (s.n, s.answered, s.errors) == (3, 1, 2)
    assert s.error_kinds == {"EngineTimeout": 1, "RuntimeError": 1}
    assert s.primary_value == 1.0 and s.quality["em"] == 1.0
    assert s.delay_mean_s == 2.0 and s.delay_p95_s == 2.0


def test_only_errors_gives_nones() -> None:
    s = summarize([row("ragctl", "q1", 0.0, 1.0, error="X: y")]).phases["0.5"]
    sys_ = s.systems["ragctl"]
    assert sys_.answered == 0 and sys_.primary_value is None
    assert sys_.delay_mean_s is None and sys_.throughput_qps == 0.0
    assert s.ratios.delay_ratio_vs_fixed_equal_quality.value is None
    assert "ragctl has no answered rows" in s.ratios.oracle_gap.reason


def test_slo_summary_and_lines() -> None:
    rows = []
    for i, (delay, error, action) in enumerate(
        [(0.5, None, "none"), (2.5, None, "pause"), (0.2, "EngineTimeout: x", "boost"),
         (0.9, None, "pause")]
    ):  # fmt: skip
        r = row("ragctl", f"q{i}", 0.5, delay, rate=None, concurrency=2, error=error)
        r["slo_ms"] = 1000
        slo = {"flagged": i % 2 == 0, "boosted_calls": i}
        slo |= {"paused_ms": 10.0 * i, "held_ms": 20.0 * i}
        r["decision"] = {"slo": {**slo, "plan_action": action}}
        rows.append(r)
    rows.append(row(STUFF5, "q0", 0.4, 0.3, rate=None, concurrency=2))
    phase = summarize(rows).phases["closed:2"]
    slo = phase.systems["ragctl"].slo
    assert slo is not None and phase.systems[STUFF5].slo is None
    # met: q0 (0.5 s) and q3 (0.9 s); q1 is late, q2 failed
    assert (slo.requests, slo.met, slo.violations) == (4, 2, 2)
    assert slo.attainment == 0.5 and slo.violation_rate == 0.5 and slo.slo_ms == 1000
    assert (slo.flagged, slo.boosted_calls) == (2, 6)
    assert (slo.paused_mean_ms, slo.held_mean_ms) == (15.0, 30.0)
    assert slo.plan_actions == {"pause": 2, "boost": 1}
    assert slo_lines(phase) == [
        "SLO ragctl: 2/4 met within 1000 ms (violations 50%), flagged 2, boosted calls 6, "
        "demoted calls 0, paused 15 ms, held 30 ms on average; planning: pause 2, boost 1"
    ]


def test_closed_loop_phase_sorted_last() -> None:
    rows = [
        row("ragctl", "q1", 1.0, 2.0, rate=None, concurrency=4),
        row("ragctl", "q1", 1.0, 2.0, rate=2.0),
    ]
    s = summarize(rows)
    assert list(s.phases) == ["2", "closed:4"]
    assert s.phases["closed:4"].concurrency == 4


def test_mixed_datasets_and_primaries_refused() -> None:
    other = row("ragctl", "q1", 1.0, 1.0)
    other["dataset"] = "musique"
    with pytest.raises(ValueError, match="several datasets"):
        summarize([row("ragctl", "q1", 1.0, 1.0), other])
    other = row("ragctl", "q1", 1.0, 1.0)
    other["primary"] = "rougeL"
    with pytest.raises(ValueError, match="primary"):
        summarize([row("ragctl", "q1", 1.0, 1.0), other])


def test_system_order() -> None:
    names = [MR, "fixed:stuff:10", STUFF5, "parrot", "other", "ragctl", "adaptiverag"]
    assert sorted(names, key=system_order) == [
        "ragctl", "adaptiverag", "parrot", "other", MR, STUFF5, "fixed:stuff:10",
    ]  # fmt: skip


# -- oracle ------------------------------------------------------------------------------------


def test_oracle_picks_ties_and_missing_query(summary: Evaluation) -> None:
    o = summary.phases["0.5"].oracle
    # q1: stuff:5, stuff:9 and map_reduce tie at 0.8 -> the fastest (stuff:5, 1.0 s);
    # q2: map_reduce's 0.9; q3: map_reduce has no row -> left out
    assert o.picks == {"q1": "stuff:5", "q2": "map_reduce:9:100"}
    assert o.queries_excluded == 1
    assert o.n == 2
    assert o.primary_value == pytest.approx(0.85)
    assert o.delay_mean_s == pytest.approx(2.5)
    assert o.configs == {"map_reduce:9:100": 1, "stuff:5": 1}
    assert o.fixed_systems == [MR, STUFF5, STUFF9]
    assert o.throughput_qps is None and o.profiler_overhead is None


def test_oracle_exact_tie_and_error_rows() -> None:
    rows = [
        row(STUFF9, "q1", 0.5, 2.0),
        row(STUFF5, "q1", 0.5, 2.0),  # same score and delay: the first in system order
        row(STUFF5, "q2", 1.0, 1.0, error="EngineTimeout: x"),  # failed -> q2 left out
        row(STUFF9, "q2", 0.2, 1.0),
        row(STUFF5, "q3", None, 3.0),  # no score: ranks below any score
        row(STUFF9, "q3", 0.0, 9.0),
    ]
    o = oracle(rows, "f1")
    assert o is not None
    assert o.picks == {"q1": "stuff:5", "q3": "stuff:9"}
    assert o.queries_excluded == 1
    assert o.primary_value == pytest.approx(0.25)
    assert oracle([row("ragctl", "q1", 1.0, 1.0)], "f1") is None


# -- ratios ------------------------------------------------------------------------------------


def test_ratios_by_hand(summary: Evaluation) -> None:
    r = summary.phases["0.5"].ratios
    half = summary.phases["0.5"]
    assert without_intervals(r) == ratios(half.systems, half.oracle)
    assert r != ratios(half.systems, half.oracle)  # the intervals are there
    assert r.primary == "f1"

    a = r.delay_ratio_vs_fixed_equal_quality
    # stuff:9 (0.633, 2.0 s) and map_reduce (0.85, 3.5 s) reach 0.6; stuff:9 is faster
    assert a.config == STUFF9 and a.reason is None
    assert a.value == pytest.approx(2.0 / 3.0)
    assert a.fixed_delay_s == 2.0 and a.ragctl_delay_s == pytest.approx(3.0)
    assert a.fixed_quality == pytest.approx(0.6333333) and a.ragctl_quality == 0.6

    b = r.delay_ratio_vs_adaptiverag
    assert b.value == pytest.approx(5.0 / 3.0) and b.quality_diff == pytest.approx(0.0)
    c = r.delay_ratio_vs_parrot
    assert c.value == pytest.approx(2.0)
    assert c.quality_diff == pytest.approx(0.1)
    assert c.quality_diff_pct == pytest.approx(20.0)
    assert c.other_quality == pytest.approx(0.5) and c.other_delay_s == 6.0

    d = r.quality_vs_fixed_similar_delay
    # |3.5 - 3| = 0.5 beats stuff:9's 1.0 and stuff:5's 2.0
    assert d.config == MR
    assert d.value == pytest.approx(-0.25)
    assert d.quality_diff_pct == pytest.approx(-0.25 / 0.85 * 100)
    assert d.delay_ratio == pytest.approx(3.5 / 3.0)

    e = r.oracle_gap
    assert e.value == pytest.approx(0.25)
    assert e.gap_pct == pytest.approx(0.25 / 0.85 * 100)
    assert e.delay_ratio == pytest.approx(2.5 / 3.0)
    assert e.oracle_quality == pytest.approx(0.85)

    assert r.profiler_overhead.value == pytest.approx(1.0 / 9.0)


def test_ratios_when_no_fixed_reaches_ragctl(summary: Evaluation) -> None:
    r = summary.phases["1"].ratios
    a = r.delay_ratio_vs_fixed_equal_quality
    assert a.value is None and a.config is None
    assert a.best_fixed_config == MR and a.best_fixed_quality == 0.7
    assert "no fixed configuration reaches ragctl's f1 0.900" in a.reason
    assert "fixed:map_reduce:9:100 at 0.700" in a.reason
    # no baselines ran at this rate
    assert r.delay_ratio_vs_adaptiverag.value is None
    assert r.delay_ratio_vs_adaptiverag.reason == "no adaptiverag rows in this phase"
    assert r.delay_ratio_vs_parrot.reason == "no parrot rows in this phase"
    # similar delay: stuff:5 (1.0) and map_reduce (4.0) are both 1 s or more away from 2.0;
    # stuff:5 is 1.0 away, map_reduce 2.0
    d = r.quality_vs_fixed_similar_delay
    assert d.config == STUFF5 and d.value == pytest.approx(0.4)
    assert d.quality_diff_pct == pytest.approx(80.0)
    e = r.oracle_gap
    assert e.value == pytest.approx(-0.2)  # ragctl beats the oracle here
    assert e.delay_ratio == pytest.approx(2.0)
    assert r.profiler_overhead.value == pytest.approx(0.1)


def test_ratios_without_ragctl_or_fixed() -> None:
    r = ratios({}, None)
    for key in ("delay_ratio_vs_fixed_equal_quality", "delay_ratio_vs_adaptiverag",
                "delay_ratio_vs_parrot", "quality_vs_fixed_similar_delay", "oracle_gap",
                "profiler_overhead", "delay_ratio_vs_static"):  # fmt: skip
        assert getattr(r, key).value is None
        assert getattr(r, key).reason == "no ragctl rows in this phase"
    s = summarize([row("ragctl", "q1", 1.0, 2.0)]).phases["0.5"].ratios
    no_fixed = "no fixed configuration in this phase"
    assert s.delay_ratio_vs_fixed_equal_quality.reason == no_fixed
    assert s.quality_vs_fixed_similar_delay.reason == no_fixed
    assert s.oracle_gap.reason.startswith("no oracle")
    assert s.profiler_overhead.reason == "ragctl recorded no profiler time"


# -- files -------------------------------------------------------------------------------------


def write_samples(path: Path, rows: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_torn_last_line_tolerated(
    tmp_path: Path, rows: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "samples.jsonl"
    write_samples(path, rows, tail='{"dataset": "squad", "system": "rag')
    with caplog.at_level(logging.WARNING, logger="ragctl.evaluation.writers"):
        loaded = load_samples(path)
    assert loaded == rows
    assert "skipped 1 unreadable line(s)" in caplog.text
    assert f"line {len(rows) + 1}" in caplog.text


def test_resume_after_a_torn_line_keeps_the_new_row(
    tmp_path: Path, rows: list[dict[str, Any]]
) -> None:
    """A run killed mid-write leaves a line without its newline; the resumed run's first row
    must not be glued onto it (it would be unreadable, and its job run again on every resume)."""
    path = tmp_path / "samples.jsonl"
    write_samples(path, rows[:1], tail='{"dataset": "squad", "system": "rag')
    writer = SampleWriter(path)
    writer.write(rows[1])
    writer.close()
    assert load_samples(path) == rows[:2]


def test_clean_file_no_warning(
    tmp_path: Path, rows: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "samples.jsonl"
    write_samples(path, rows, tail="\n")
    with caplog.at_level(logging.WARNING, logger="ragctl.evaluation.writers"):
        assert load_samples(path) == rows
    assert "skipped" not in caplog.text


SUMMARY_INTERVAL_KEYS = [
    "primary_value_ci", "quality_ci", "quality_n", "delay_mean_s_ci", "delay_p50_s_ci",
    "delay_p95_s_ci", "delay_n", "queue_mean_s_ci", "queue_n", "profiler_overhead_ci",
]  # fmt: skip
TTFT_KEYS = [
    "ttft_mean_s", "ttft_mean_s_ci", "ttft_p50_s", "ttft_p50_s_ci", "ttft_p95_s", "ttft_p95_s_ci",
    "ttft_n",
]  # fmt: skip
SUMMARY_KEYS = [
    "n", "answered", "errors", "error_kinds", "primary", "primary_value", "quality",
    "delay_mean_s", "delay_p50_s", "delay_p95_s", "queue_mean_s", "throughput_qps",
    "profiler_overhead", "configs", "top_config", "tokens",
]  # fmt: skip


def test_results_json(tmp_path: Path, summary: Evaluation) -> None:
    meta = {"dataset": "squad", "command": "ragctl eval run", "model": "m", "settings": {},
            "seed": 0, "limits": {"queries": 4}, "out": tmp_path}  # fmt: skip
    path = write_results(tmp_path / "run", summary, meta)
    data = json.loads(path.read_text())
    assert list(data) == ["version", "meta", "dataset", "primary", "rates"]
    assert data["meta"]["out"] == str(tmp_path)
    assert list(data["rates"]) == ["0.5", "1"]
    half = data["rates"]["0.5"]
    assert list(half) == ["rate", "concurrency", "systems", "oracle", "ratios"]
    assert data["version"] == 2
    # the field names older results.json files have, in their order; the intervals among them
    rag = half["systems"]["ragctl"]
    assert subsequence([*SUMMARY_KEYS, "slo"], list(rag))
    assert set(rag) - {*SUMMARY_KEYS, "slo"} == {*SUMMARY_INTERVAL_KEYS, *TTFT_KEYS}
    assert list(rag).index("primary_value_ci") == list(rag).index("primary_value") + 1
    assert rag["slo"] is None
    assert rag["primary_value_ci"] == pytest.approx([0.4, 0.8])
    assert rag["quality_n"] == {"f1": 3, "em": 3, "evidence_recall": 2, "evidence_hit": 2}
    assert rag["delay_n"] == 3 and rag["queue_n"] == 3
    assert subsequence([*SUMMARY_KEYS, "fixed_systems", "queries_excluded", "picks"],
                       list(half["oracle"]))  # fmt: skip
    assert list(half["ratios"]) == [
        "primary", "delay_ratio_vs_fixed_equal_quality", "delay_ratio_vs_adaptiverag",
        "delay_ratio_vs_parrot", "quality_vs_fixed_similar_delay", "oracle_gap",
        "profiler_overhead", "delay_ratio_vs_static",
    ]  # fmt: skip
    numbers = ["value", "config", "fixed_quality", "fixed_delay_s", "ragctl_quality",
               "ragctl_delay_s"]  # fmt: skip
    best = ["best_fixed_config", "best_fixed_quality", "best_fixed_delay_s"]
    reached = half["ratios"]["delay_ratio_vs_fixed_equal_quality"]
    with_ci = ["value_ci", "significant", "n", "left_out"]
    assert list(reached) == [*numbers, "reason", *with_ci]
    assert reached["n"] == 3 and reached["left_out"] == 1  # q4: ragctl failed on it
    missed = data["rates"]["1"]["ratios"]["delay_ratio_vs_fixed_equal_quality"]
    assert list(missed) == [*numbers, *best, "reason", *with_ci]
    assert half["ratios"]["delay_ratio_vs_parrot"]["value"] == pytest.approx(2.0)
    # and read back to the same records
    loaded = Evaluation.from_dict(data)
    assert loaded.phases == summary.phases
    assert loaded.meta["model"] == "m" and loaded.dataset == "squad"


def test_old_results_without_ratios_recompute_them(summary: Evaluation) -> None:
    payload = {"dataset": "squad", "primary": "f1",
               "rates": {k: p.to_dict() for k, p in summary.phases.items()}}  # fmt: skip
    for phase in payload["rates"].values():
        del phase["ratios"]
    loaded = Evaluation.from_dict(payload)
    # without the per-query rows the paired intervals cannot be recomputed: None, the rest same
    recomputed = loaded.phases["0.5"].ratios
    assert recomputed == without_intervals(summary.phases["0.5"].ratios)
    assert recomputed.delay_ratio_vs_parrot.value == pytest.approx(2.0)
    assert recomputed.delay_ratio_vs_parrot.value_ci is None


def test_summary_csv_columns(tmp_path: Path, summary: Evaluation) -> None:
    path = write_summary_csv(tmp_path, summary)
    with path.open() as f:
        reader = csv.DictReader(f)
        table = list(reader)
        header = reader.fieldnames
    old = [
        "rate", "concurrency", "system", "n", "errors", "primary", "quality",
        "em", "f1", "evidence_recall", "evidence_hit",
        "delay_mean_s", "delay_p50_s", "delay_p95_s", "queue_mean_s", "throughput_qps",
        "profiler_overhead", "top_config", "calls_mean", "prompt_tokens_mean",
        "output_tokens_mean",
    ]  # fmt: skip
    assert subsequence(old, header)
    assert header[header.index("quality") :][:4] == [
        "quality", "quality_ci_lo", "quality_ci_hi", "quality_n",
    ]  # fmt: skip
    assert header[header.index("delay_p95_s") :][:4] == [
        "delay_p95_s", "delay_p95_s_ci_lo", "delay_p95_s_ci_hi", "delay_n",
    ]  # fmt: skip
    for name in ("em", "f1", "evidence_recall", "evidence_hit", "delay_mean_s", "delay_p50_s",
                 "queue_mean_s", "profiler_overhead"):  # fmt: skip
        assert header[header.index(name) + 1 : header.index(name) + 3] == [
            f"{name}_ci_lo", f"{name}_ci_hi",
        ]  # fmt: skip
    assert len(table) == 7 + 4  # 6 systems + oracle at 0.5; 3 systems + oracle at 1
    rag = table[0]
    assert (rag["rate"], rag["system"], rag["n"], rag["errors"]) == ("0.5", "ragctl", "4", "1")
    assert float(rag["quality"]) == pytest.approx(0.6)
    assert (float(rag["quality_ci_lo"]), float(rag["quality_ci_hi"])) == pytest.approx((0.4, 0.8))
    assert (rag["quality_n"], rag["delay_n"]) == ("3", "3")
    assert float(rag["delay_p95_s"]) == pytest.approx(3.9)
    assert float(rag["delay_mean_s_ci_lo"]) == pytest.approx(2.0)
    # one row at rate 1: no interval, blank cells
    assert table[7]["system"] == "ragctl" and table[7]["quality_ci_lo"] == ""
    assert rag["top_config"] == "stuff:5"
    orc = table[6]
    assert orc["system"] == "oracle" and orc["throughput_qps"] == ""
    assert float(orc["quality"]) == pytest.approx(0.85)


def test_plots_written(tmp_path: Path, rows: list[dict[str, Any]], summary: Evaluation) -> None:
    paths = write_plots(tmp_path, rows, summary)
    assert [p.name for p in paths] == ["quality_vs_delay.png", "delay_cdf.png", "load.png"]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG)


def test_single_rate_has_no_load_plot(tmp_path: Path) -> None:
    rows = rows_rate_half()
    paths = write_plots(tmp_path, rows, summarize(rows))
    assert [p.name for p in paths] == ["quality_vs_delay.png", "delay_cdf.png"]
    assert not (tmp_path / "load.png").exists()


def test_render_report_mentions_every_system(summary: Evaluation) -> None:
    console = Console(record=True, width=200)
    render_report(summary, console)
    text = console.export_text()
    for name in ("ragctl", "adaptiverag", "parrot", STUFF5, STUFF9, MR, "oracle"):
        assert name in text
    assert "arrival rate 0.5 q/s" in text and "arrival rate 1 q/s" in text
    assert "vs fixed stuff:9 at equal-or-better f1" in text
    assert "2.00 s: 0.67× (fixed / ragctl)" in text
    assert "parrot mean delay 6.00 s vs ragctl 3.00 s: 2.00×" in text
    assert "ragctl 0.600 is 0.250 below it (29.4% of the oracle's)" in text
    assert "ragctl 0.900 is 0.200 above it (28.6% of the oracle's)" in text
    assert "no fixed configuration reaches ragctl's f1 0.900" in text
    assert "profiler overhead: 11.1% of ragctl's delay" in text
    assert "1 left out" in text


def test_report_from_samples_and_results(
    tmp_path: Path, rows: list[dict[str, Any]], summary: Evaluation
) -> None:
    write_samples(tmp_path / "samples.jsonl", rows)
    recomputed = load_evaluation(tmp_path)
    assert recomputed == summary
    assert report_run(tmp_path) == summary

    write_results(tmp_path, summary, {"model": "some-model"})
    loaded = report_run(tmp_path)
    assert loaded.meta == {"model": "some-model"}
    console = Console(record=True, width=200)
    render_report(loaded, console)
    text = console.export_text()
    assert "some-model" in text and "fixed:map_reduce:9:100" in text

    with pytest.raises(FileNotFoundError):
        load_evaluation(tmp_path / "empty")
    with pytest.raises(DataNotFound, match="no evaluation run"):
        report_run(tmp_path / "empty")


def test_report_rewrite_recomputes_the_files(
    tmp_path: Path, rows: list[dict[str, Any]], summary: Evaluation
) -> None:
    write_samples(tmp_path / "samples.jsonl", rows)
    (tmp_path / "run.json").write_text(json.dumps({"model": "from-run-json"}))
    loaded = report_run(tmp_path, rewrite=True)
    assert loaded.meta == {"model": "from-run-json"} and loaded.phases == summary.phases
    assert {p.name for p in tmp_path.iterdir()} >= {
        "results.json", "summary.csv", "quality_vs_delay.png", "delay_cdf.png", "load.png",
    }  # fmt: skip


def test_objective_variants_get_their_own_ratios(rows: list[dict[str, Any]]) -> None:
    """A `ragctl:<objective>` system is measured against the same fixed grid as ragctl: its
    ratios are ragctl's formulas with it in ragctl's place, and they survive results.json."""
    half = [r for r in rows if r["rate"] == 0.5]
    variant = [
        {**r, "system": "ragctl:latency", "delay_s": r["delay_s"] / 2,
         "end_s": r["arrival_s"] + r["delay_s"] / 2}
        for r in half if r["system"] == "ragctl"
    ]  # fmt: skip
    ev = summarize(half + variant)
    phase = ev.phases["0.5"]
    assert set(phase.variants or {}) == {"ragctl:latency"}
    a = phase.ratios.delay_ratio_vs_fixed_equal_quality
    v = phase.variants["ragctl:latency"].delay_ratio_vs_fixed_equal_quality
    assert v.config == a.config and v.ragctl_quality == a.ragctl_quality
    assert v.value == pytest.approx(2 * a.value)  # same quality in half the time
    back = Phase.from_dict(json.loads(json.dumps(phase.to_dict())))
    assert back.variants["ragctl:latency"].to_dict() == phase.variants["ragctl:latency"].to_dict()
    assert "variants" not in summarize(half).phases["0.5"].to_dict()  # none: no new key
