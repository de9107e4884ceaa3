"""The 95% bootstrap intervals (`ragctl.evaluation.intervals`) and how the summaries, ratios,
files and report carry them: coverage and narrowing with n, pairing, degenerate and tiny
samples, the significance marker and n in the report, and results.json files written before
intervals."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from scipy.stats import bootstrap

from ragctl.evaluation.intervals import (
    excludes,
    mean_ci,
    paired_diff_ci,
    percentile_ci,
    ratio_ci,
)
from ragctl.evaluation.render import FOOTNOTE, SIGNIFICANT, render_report
from ragctl.evaluation.summaries import Evaluation, summarize
from ragctl.evaluation.writers import RESULTS_FILE, load_evaluation, write_results

STUFF5 = "fixed:stuff:5"


@pytest.fixture(autouse=True)
def no_warnings() -> Iterator[None]:
    """Every interval here is computed without a warning (scipy's degenerate-data ones
    included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def width(ci: list[float] | None) -> float:
    assert ci is not None
    return ci[1] - ci[0]


# -- the statistics ----------------------------------------------------------------------------


def test_mean_ci_contains_the_true_mean_and_narrows_with_n() -> None:
    rng = np.random.default_rng(7)
    # coverage: of 40 samples of 30, about 95% of the intervals hold the true mean 5
    samples = [rng.normal(5.0, 2.0, 30) for _ in range(40)]
    cis = [mean_ci(x) for x in samples]
    pairs = zip(cis, samples, strict=True)
    assert all(ci is not None and ci[0] <= x.mean() <= ci[1] for ci, x in pairs)
    covered = sum(ci[0] < 5.0 < ci[1] for ci in cis)  # type: ignore[index]
    assert 34 <= covered <= 40
    # the width goes as 1 / sqrt(n): 500 values give about 0.2 of 20 values' width
    small, large = rng.normal(5.0, 2.0, 20), rng.normal(5.0, 2.0, 500)
    assert width(mean_ci(large)) < 0.4 * width(mean_ci(small))
    # roughly the normal interval: +-1.96 sd / sqrt(n)
    assert width(mean_ci(large)) == pytest.approx(2 * 1.96 * large.std() / np.sqrt(500), rel=0.15)
    lo, hi = mean_ci(large)  # type: ignore[misc]
    assert lo < 5.0 < hi


def test_intervals_are_reproducible() -> None:
    values = list(np.random.default_rng(1).exponential(2.0, 50))
    assert mean_ci(values) == mean_ci(values)
    assert percentile_ci(values, 0.95) == percentile_ci(values, 0.95)


def test_percentile_ci_brackets_the_sample_percentile() -> None:
    values = np.random.default_rng(3).exponential(1.0, 300)
    for q in (0.5, 0.95):
        lo, hi = percentile_ci(values, q)  # type: ignore[misc]
        assert lo <= float(np.quantile(values, q)) <= hi
        assert lo < hi
    # the tail is less certain than the middle
    assert width(percentile_ci(values, 0.95)) > width(percentile_ci(values, 0.5))


def test_pairing_matters() -> None:
    """A consistent per-query shift of 0.5 under a between-query spread of 10: the paired
    difference is significant, the same data resampled unpaired is not."""
    rng = np.random.default_rng(11)
    base = rng.normal(0.0, 10.0, 40)
    a, b = base + 0.5 + rng.normal(0.0, 0.1, 40), base
    paired = paired_diff_ci(a, b)
    assert paired is not None and excludes(paired, 0.0) is True
    assert paired[0] < 0.5 < paired[1]
    unpaired = bootstrap(
        (a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=False, vectorized=True,
        n_resamples=2000, method="percentile", random_state=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    assert excludes([unpaired.low, unpaired.high], 0.0) is False
    assert width(paired) < 0.1 * (unpaired.high - unpaired.low)


def test_ratio_ci() -> None:
    rng = np.random.default_rng(5)
    b = rng.uniform(1.0, 10.0, 60)
    a = 2.0 * b * rng.uniform(0.9, 1.1, 60)
    ci = ratio_ci(a, b)
    assert ci is not None and ci[0] < a.mean() / b.mean() < ci[1]
    assert 1.8 < ci[0] < ci[1] < 2.2
    assert excludes(ci, 1.0) is True
    assert ratio_ci([1.0, 2.0], [0.0, 0.0]) is None  # mean(b) is 0


def test_constant_sample_gives_a_degenerate_interval() -> None:
    assert mean_ci([0.7] * 5) == [0.7, 0.7]
    assert percentile_ci([3.0] * 4, 0.95) == [3.0, 3.0]
    assert paired_diff_ci([1.0] * 3, [0.25] * 3) == [0.75, 0.75]
    assert ratio_ci([2.0] * 3, [4.0] * 3) == [0.5, 0.5]
    # a constant shift is certain (significant), no shift is not
    assert excludes(paired_diff_ci([1.0] * 3, [0.25] * 3), 0.0) is True
    assert excludes(mean_ci([0.0, 0.0]), 0.0) is False


def test_too_few_values_give_none() -> None:
    assert mean_ci([1.0]) is None and mean_ci([]) is None
    assert percentile_ci([1.0], 0.5) is None
    assert paired_diff_ci([1.0], [2.0]) is None
    assert ratio_ci([1.0], [2.0]) is None
    assert mean_ci([1.0, float("nan"), 2.0]) is None  # not finite: no interval, no warning
    assert excludes(None, 0.0) is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_diff_ci([1.0, 2.0], [1.0])


# -- in the summaries and the report -----------------------------------------------------------


def row(system: str, qid: str, f1: float, delay: float, error: str | None = None) -> dict[str, Any]:
    return {
        "dataset": "squad", "system": system, "query_id": qid, "rate": 1.0, "arrival_s": 0.0,
        "end_s": delay, "delay_s": delay, "queue_s": 0.0, "profile_s": 0.1 * delay,
        "config": "stuff:5", "scores": {"f1": f1}, "primary": "f1", "error": error,
    }  # fmt: skip


def shifted_rows(n: int = 30, failed: int = 2) -> list[dict[str, Any]]:
    """ragctl answers every query 1 s faster than parrot (delays spread 1-30 s between
    queries); their f1 differ by noise only; parrot fails on `failed` queries; a fixed
    configuration as slow as parrot."""
    rng = np.random.default_rng(2)
    rows = []
    for i in range(n):
        spread, qid = float(i + 1), f"q{i}"
        f1 = float(rng.uniform(0.0, 1.0))
        rows.append(row("ragctl", qid, f1, spread))
        err = "EngineTimeout: x" if i < failed else None
        rows.append(row("parrot", qid, float(rng.uniform(0.0, 1.0)), spread + 1.0, err))
        rows.append(row(STUFF5, qid, f1, spread + 1.0))
    return rows


def test_paired_ratios_left_out_and_significance() -> None:
    r = summarize(shifted_rows()).phases["1"].ratios
    p = r.delay_ratio_vs_parrot
    assert (p.n, p.left_out) == (28, 2)  # the queries parrot failed on are left out
    assert p.value_ci is not None and p.value_ci[0] > 1.0 and p.significant is True
    assert p.quality_diff_ci is not None and p.quality_diff_significant is False
    a = r.delay_ratio_vs_fixed_equal_quality
    assert a.config == STUFF5 and (a.n, a.left_out) == (30, 0)
    assert a.significant is True and a.value_ci[0] > 1.0  # type: ignore[index]
    # same f1 on every query: the quality difference at similar delay is exactly 0
    d = r.quality_vs_fixed_similar_delay
    assert d.value_ci == [0.0, 0.0] and d.significant is False
    assert d.delay_ratio_significant is True
    o = r.profiler_overhead
    assert o.n == 30 and o.value_ci == pytest.approx([0.1, 0.1])


def test_summary_intervals_and_n() -> None:
    rows = shifted_rows()
    s = summarize(rows).phases["1"].systems["parrot"]
    assert (s.answered, s.delay_n, s.primary_n) == (28, 28, 28)
    delays = [r["delay_s"] for r in rows if r["system"] == "parrot" and not r["error"]]
    lo, hi = s.delay_mean_s_ci  # type: ignore[misc]
    assert lo < s.delay_mean_s < hi  # type: ignore[operator]
    assert s.delay_mean_s == pytest.approx(np.mean(delays))
    assert s.delay_p95_s_ci is not None and s.delay_p95_s_ci[0] <= s.delay_p95_s
    assert s.quality_ci["f1"] == s.primary_value_ci  # type: ignore[index]


def test_report_prints_n_intervals_and_the_marker() -> None:
    console = Console(record=True, width=250)
    render_report(summarize(shifted_rows()), console)
    text = console.export_text()
    line = next(x for x in text.splitlines() if "parrot mean delay" in x)
    p = summarize(shifted_rows()).phases["1"].ratios.delay_ratio_vs_parrot
    lo, hi = p.value_ci  # type: ignore[misc]
    assert f"× [{lo:.2f}, {hi:.2f}]{SIGNIFICANT};" in line
    assert "n=28 paired, 2 left out" in line
    # the quality difference is not significant: its interval has no marker
    qlo, qhi = p.quality_diff_ci  # type: ignore[misc]
    assert f"[{qlo:+.3f}, {qhi:+.3f}]," in line
    assert f"[{qlo:+.3f}, {qhi:+.3f}]{SIGNIFICANT}" not in line
    assert FOOTNOTE in text
    # the table: the answered column and the interval under each figure
    table_row = next(x for x in text.splitlines() if x.startswith("│ parrot"))
    assert "│       28 │" in table_row
    assert "profiler overhead: 10.0% of ragctl's delay [10.0%, 10.0%], n=30" in text


def strip_intervals(payload: dict[str, Any]) -> dict[str, Any]:
    """A results.json payload as version 1 wrote it: no interval or n field anywhere."""
    extra = {"significant", "quality_diff_significant", "delay_ratio_significant", "n",
             "left_out", "quality_n", "delay_n", "queue_n"}  # fmt: skip

    def strip(value: Any, in_ratio: bool = False) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v, in_ratio or k == "ratios")
                for k, v in value.items()
                if not k.endswith("_ci") and not (k in extra and (in_ratio or k != "n"))
            }
        return value

    out = strip(payload)
    out["version"] = 1
    return out


def test_old_results_load_and_render(tmp_path: Path) -> None:
    evaluation = summarize(shifted_rows())
    write_results(tmp_path, evaluation, {"model": "m"})
    new = json.loads((tmp_path / RESULTS_FILE).read_text())
    old = strip_intervals(new)
    assert "delay_mean_s_ci" not in json.dumps(old) and '"left_out"' not in json.dumps(old)
    assert old["rates"]["1"]["systems"]["parrot"]["n"] == 30  # the summary's own n stays
    (tmp_path / RESULTS_FILE).write_text(json.dumps(old))

    loaded = load_evaluation(tmp_path)
    s = loaded.phases["1"].systems["parrot"]
    assert s.delay_mean_s == evaluation.phases["1"].systems["parrot"].delay_mean_s
    assert s.delay_mean_s_ci is None and s.quality_ci is None and s.delay_n is None
    assert loaded.phases["1"].ratios.delay_ratio_vs_parrot.value_ci is None
    assert loaded.phases["1"].ratios.delay_ratio_vs_parrot.value == pytest.approx(
        evaluation.phases["1"].ratios.delay_ratio_vs_parrot.value
    )

    console = Console(record=True, width=250)
    render_report(loaded, console)
    text = console.export_text()
    assert "parrot mean delay" in text and "n=" not in text
    assert SIGNIFICANT not in text and FOOTNOTE[:40] not in text
    # and the new file renders its intervals
    console = Console(record=True, width=250)
    render_report(Evaluation.from_dict(new), console)
    assert "n=28 paired" in console.export_text()
