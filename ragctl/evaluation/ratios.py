"""The headline numbers of one phase: ragctl against the fixed configurations, the adaptive
baselines and the oracle, on the dataset's primary metric.

Delay ratios are always other / ragctl (above 1: ragctl is faster); quality differences are
ragctl - other (above 0: ragctl is better). Every ratio has `value` (None when it cannot be
computed, then `reason` says why) and the numbers it came from, ragctl's last.

Intervals (given the per-query rows): each figure comparing two systems has a 95% paired
bootstrap interval (`value_ci`, `quality_diff_ci`, `delay_ratio_ci`) over the `n` queries both
answered with a delay and a primary score; `left_out` counts the queries either ran that are
not among them (one failed, or has no delay or score). `significant` (and
`quality_diff_significant`, `delay_ratio_significant`): the interval excludes 0 for a
difference, 1 for a delay ratio (the same resamples: mean(a) / mean(b) > 1 exactly when
mean(a) - mean(b) > 0). The value itself stays the ratio of the two systems' own means; the
choice of configuration (the fastest of equal quality, the closest delay) is taken as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from ragctl.evaluation.intervals import Interval, excludes, paired_diff_ci, ratio_ci
from ragctl.evaluation.records import Record
from ragctl.evaluation.systems import BASELINES, FIXED_PREFIX, ORACLE, RAGCTL, system_order

if TYPE_CHECKING:
    from ragctl.evaluation.summaries import OracleSummary, Summary

_EPS = 1e-12
"""Slack when asking whether a fixed configuration's quality is at least ragctl's."""


@dataclass(frozen=True)
class VsFixedEqualQuality(Record):
    """Fixed delay / ragctl delay for the fastest fixed configuration whose quality is at least
    ragctl's (`config`); when none is, the best one (`best_fixed_*`) and no value."""

    value: float | None = None
    config: str | None = None
    fixed_quality: float | None = None
    fixed_delay_s: float | None = None
    ragctl_quality: float | None = None
    ragctl_delay_s: float | None = None
    best_fixed_config: str | None = None
    best_fixed_quality: float | None = None
    best_fixed_delay_s: float | None = None
    reason: str | None = None
    value_ci: Interval | None = None
    significant: bool | None = None
    n: int | None = None
    left_out: int | None = None
    OMIT_NONE: ClassVar[tuple[str, ...]] = (
        "best_fixed_config", "best_fixed_quality", "best_fixed_delay_s",
    )  # fmt: skip


@dataclass(frozen=True)
class VsBaseline(Record):
    """Their delay / ragctl delay, with `quality_diff` (ragctl - theirs) and `quality_diff_pct`
    (of theirs)."""

    value: float | None = None
    system: str | None = None
    other_quality: float | None = None
    other_delay_s: float | None = None
    quality_diff: float | None = None
    quality_diff_pct: float | None = None
    ragctl_quality: float | None = None
    ragctl_delay_s: float | None = None
    reason: str | None = None
    value_ci: Interval | None = None
    significant: bool | None = None
    quality_diff_ci: Interval | None = None
    quality_diff_significant: bool | None = None
    n: int | None = None
    left_out: int | None = None


@dataclass(frozen=True)
class VsFixedSimilarDelay(Record):
    """Ragctl quality - that of the fixed configuration whose mean delay is closest to ragctl's
    (`quality_diff_pct` of the fixed one's; `delay_ratio` fixed / ragctl)."""

    value: float | None = None
    config: str | None = None
    fixed_quality: float | None = None
    fixed_delay_s: float | None = None
    quality_diff_pct: float | None = None
    delay_ratio: float | None = None
    ragctl_quality: float | None = None
    ragctl_delay_s: float | None = None
    reason: str | None = None
    value_ci: Interval | None = None
    significant: bool | None = None
    delay_ratio_ci: Interval | None = None
    delay_ratio_significant: bool | None = None
    n: int | None = None
    left_out: int | None = None


@dataclass(frozen=True)
class OracleGap(Record):
    """Oracle quality - ragctl quality (`gap_pct` of the oracle's), `delay_ratio` oracle /
    ragctl."""

    value: float | None = None
    oracle_quality: float | None = None
    oracle_delay_s: float | None = None
    gap_pct: float | None = None
    delay_ratio: float | None = None
    ragctl_quality: float | None = None
    ragctl_delay_s: float | None = None
    reason: str | None = None
    value_ci: Interval | None = None
    significant: bool | None = None
    delay_ratio_ci: Interval | None = None
    delay_ratio_significant: bool | None = None
    n: int | None = None
    left_out: int | None = None


@dataclass(frozen=True)
class ProfilerOverhead(Record):
    """Ragctl's profiler time / its delay (`value_ci` over its `n` answered rows)."""

    value: float | None = None
    reason: str | None = None
    value_ci: Interval | None = None
    n: int | None = None


@dataclass(frozen=True)
class Ratios(Record):
    primary: str | None
    delay_ratio_vs_fixed_equal_quality: VsFixedEqualQuality
    delay_ratio_vs_adaptiverag: VsBaseline
    delay_ratio_vs_parrot: VsBaseline
    quality_vs_fixed_similar_delay: VsFixedSimilarDelay
    oracle_gap: OracleGap
    profiler_overhead: ProfilerOverhead
    delay_ratio_vs_static: VsBaseline | None = None
    """None only in a result written before Static* existed."""
    NESTED: ClassVar[Mapping[str, type[Record]]] = {
        "delay_ratio_vs_fixed_equal_quality": VsFixedEqualQuality,
        "delay_ratio_vs_adaptiverag": VsBaseline,
        "delay_ratio_vs_parrot": VsBaseline,
        "delay_ratio_vs_static": VsBaseline,
        "quality_vs_fixed_similar_delay": VsFixedSimilarDelay,
        "oracle_gap": OracleGap,
        "profiler_overhead": ProfilerOverhead,
    }

    def vs(self, baseline: str) -> VsBaseline:
        """The ratio against one of the adaptive baselines (`systems.BASELINES`)."""
        found = getattr(self, f"delay_ratio_vs_{baseline}")
        return found if found is not None else VsBaseline(reason="not in this (older) result")


def _q(s: Summary | None) -> float | None:
    return None if s is None else s.primary_value


def _d(s: Summary | None) -> float | None:
    return None if s is None else s.delay_mean_s


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _pct(diff: float | None, base: float | None) -> float | None:
    r = _ratio(diff, base)
    return None if r is None else 100.0 * r


PerQuery = Mapping[str, Mapping[str, Any] | None]
"""A system's rows by query id: the answered row, or None where it failed."""


def ratios(
    systems: Mapping[str, Summary],
    oracle: OracleSummary | None,
    samples: Mapping[str, PerQuery] | None = None,
) -> Ratios:
    """The ratios of one phase, from its system summaries and its oracle; with `samples`
    (system, or `ORACLE` -> `PerQuery`) their paired intervals too."""
    r = _ratios(systems, oracle)
    return r if samples is None else _with_intervals(r, systems, samples)


def _ratios(systems: Mapping[str, Summary], oracle: OracleSummary | None) -> Ratios:
    rag = systems.get(RAGCTL)
    primary = next((s.primary for s in systems.values() if s.primary), None)
    rq, rd = _q(rag), _d(rag)
    fixed = {
        name: s
        for name, s in systems.items()
        if name.startswith(FIXED_PREFIX) and _q(s) is not None and _d(s) is not None
    }
    why = None
    if rag is None:
        why = "no ragctl rows in this phase"
    elif rd is None or rq is None:
        why = f"ragctl has no answered rows with a delay and a {primary} score"
    elif rd == 0:
        why = "ragctl's mean delay is 0"
    base: dict[str, Any] = {"ragctl_quality": rq, "ragctl_delay_s": rd}
    no_fixed = "no fixed configuration in this phase"
    if rag is None:
        overhead = ProfilerOverhead(reason="no ragctl rows in this phase")
    elif rag.profiler_overhead is None:
        overhead = ProfilerOverhead(reason="ragctl recorded no profiler time")
    else:
        overhead = ProfilerOverhead(value=rag.profiler_overhead)
    return Ratios(
        primary=primary,
        delay_ratio_vs_fixed_equal_quality=(
            VsFixedEqualQuality(reason=why or no_fixed, **base)
            if why or not fixed
            else _vs_fixed_equal_quality(fixed, rq, rd, primary, base)  # type: ignore[arg-type]
        ),
        delay_ratio_vs_adaptiverag=_vs_baseline("adaptiverag", systems, why, base),
        delay_ratio_vs_parrot=_vs_baseline("parrot", systems, why, base),
        quality_vs_fixed_similar_delay=(
            VsFixedSimilarDelay(reason=why or no_fixed, **base)
            if why or not fixed
            else _vs_fixed_similar_delay(fixed, rq, rd, base)  # type: ignore[arg-type]
        ),
        oracle_gap=_oracle_gap(oracle, why, base),
        profiler_overhead=overhead,
        delay_ratio_vs_static=_vs_baseline("static", systems, why, base),
    )


def _vs_fixed_equal_quality(
    fixed: Mapping[str, Summary], rq: float, rd: float, primary: str | None, base: dict[str, Any]
) -> VsFixedEqualQuality:
    q = {n: _q(s) for n, s in fixed.items()}
    d = {n: _d(s) for n, s in fixed.items()}
    eligible = [n for n in fixed if q[n] >= rq - _EPS]  # type: ignore[operator]
    if eligible:
        name = min(eligible, key=lambda n: (d[n], system_order(n)))
        return VsFixedEqualQuality(
            value=_ratio(d[name], rd), config=name, fixed_quality=q[name], fixed_delay_s=d[name],
            **base,
        )  # fmt: skip
    best = max(fixed, key=lambda n: (q[n], -d[n]))  # type: ignore[operator]
    return VsFixedEqualQuality(
        best_fixed_config=best,
        best_fixed_quality=q[best],
        best_fixed_delay_s=d[best],
        reason=(
            f"no fixed configuration reaches ragctl's {primary} {rq:.3f} "
            f"(best: {best} at {q[best]:.3f})"
        ),
        **base,
    )


def _vs_baseline(
    name: str, systems: Mapping[str, Summary], why: str | None, base: dict[str, Any]
) -> VsBaseline:
    other = systems.get(name)
    oq, od = _q(other), _d(other)
    numbers = {"system": name, "other_quality": oq, "other_delay_s": od, **base}
    if why:
        return VsBaseline(reason=why, **numbers)
    if other is None:
        return VsBaseline(reason=f"no {name} rows in this phase", **numbers)
    if od is None:
        return VsBaseline(reason=f"{name} has no answered rows with a delay", **numbers)
    rq = base["ragctl_quality"]
    diff = rq - oq if oq is not None else None
    return VsBaseline(
        value=_ratio(od, base["ragctl_delay_s"]),
        quality_diff=diff,
        quality_diff_pct=_pct(diff, oq),
        **numbers,
    )


def _vs_fixed_similar_delay(
    fixed: Mapping[str, Summary], rq: float, rd: float, base: dict[str, Any]
) -> VsFixedSimilarDelay:
    name = min(fixed, key=lambda n: (abs(_d(fixed[n]) - rd), system_order(n)))  # type: ignore[operator]
    fq, fd = _q(fixed[name]), _d(fixed[name])
    return VsFixedSimilarDelay(
        value=rq - fq,  # type: ignore[operator]
        config=name,
        fixed_quality=fq,
        fixed_delay_s=fd,
        quality_diff_pct=_pct(rq - fq, fq),  # type: ignore[operator]
        delay_ratio=_ratio(fd, rd),
        **base,
    )


def _oracle_gap(oracle: OracleSummary | None, why: str | None, base: dict[str, Any]) -> OracleGap:
    oq, od = _q(oracle), _d(oracle)
    numbers = {"oracle_quality": oq, "oracle_delay_s": od, **base}
    if why:
        return OracleGap(reason=why, **numbers)
    if oracle is None or oq is None:
        return OracleGap(reason="no oracle: no query answered by every fixed configuration",
                         **numbers)  # fmt: skip
    rq = base["ragctl_quality"]
    return OracleGap(
        value=oq - rq, gap_pct=_pct(oq - rq, oq), delay_ratio=_ratio(od, base["ragctl_delay_s"]),
        **numbers,
    )  # fmt: skip


# -- intervals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pairs:
    """Ragctl's and another system's primary scores and delays on the queries both answered."""

    rq: list[float]
    rd: list[float]
    oq: list[float]
    od: list[float]
    left_out: int


def _point(row: Mapping[str, Any] | None, primary: str | None) -> tuple[float, float] | None:
    """A row's primary score and delay, when it has both (finite)."""
    if row is None or primary is None:
        return None
    q, d = (row.get("scores") or {}).get(primary), row.get("delay_s")
    if q is None or d is None or not math.isfinite(float(q)) or not math.isfinite(float(d)):
        return None
    return float(q), float(d)


def _pairs(rag: PerQuery, other: PerQuery, primary: str | None) -> _Pairs:
    out = _Pairs([], [], [], [], 0)
    left_out = 0
    for qid in dict.fromkeys([*rag, *other]):
        a, b = _point(rag.get(qid), primary), _point(other.get(qid), primary)
        if a is None or b is None:
            left_out += 1
            continue
        out.rq.append(a[0])
        out.rd.append(a[1])
        out.oq.append(b[0])
        out.od.append(b[1])
    return replace(out, left_out=left_out)


def _with_intervals(
    r: Ratios, systems: Mapping[str, Summary], samples: Mapping[str, PerQuery]
) -> Ratios:
    rag = samples.get(RAGCTL)
    if rag is None:
        return r

    def pairs(name: str | None) -> _Pairs | None:
        other = samples.get(name) if name else None
        return None if other is None else _pairs(rag, other, r.primary)

    def counts(p: _Pairs) -> dict[str, int]:
        return {"n": len(p.rq), "left_out": p.left_out}

    a = r.delay_ratio_vs_fixed_equal_quality
    if a.value is not None and (p := pairs(a.config)):
        ci = ratio_ci(p.od, p.rd)
        a = replace(a, value_ci=ci, significant=excludes(ci, 1.0), **counts(p))
    vs = {}
    for name in BASELINES:
        key, b = f"delay_ratio_vs_{name}", r.vs(name)
        if b.value is not None and (p := pairs(b.system)):
            ci = ratio_ci(p.od, p.rd)
            diff_ci = paired_diff_ci(p.rq, p.oq) if b.quality_diff is not None else None
            b = replace(
                b, value_ci=ci, significant=excludes(ci, 1.0), quality_diff_ci=diff_ci,
                quality_diff_significant=excludes(diff_ci, 0.0), **counts(p),
            )  # fmt: skip
        vs[key] = b
    d = r.quality_vs_fixed_similar_delay
    if d.value is not None and (p := pairs(d.config)):
        ci, delay_ci = paired_diff_ci(p.rq, p.oq), ratio_ci(p.od, p.rd)
        d = replace(
            d, value_ci=ci, significant=excludes(ci, 0.0), delay_ratio_ci=delay_ci,
            delay_ratio_significant=excludes(delay_ci, 1.0), **counts(p),
        )  # fmt: skip
    e = r.oracle_gap
    if e.value is not None and (p := pairs(ORACLE)):
        ci, delay_ci = paired_diff_ci(p.oq, p.rq), ratio_ci(p.od, p.rd)
        e = replace(
            e, value_ci=ci, significant=excludes(ci, 0.0), delay_ratio_ci=delay_ci,
            delay_ratio_significant=excludes(delay_ci, 1.0), **counts(p),
        )  # fmt: skip
    o = r.profiler_overhead
    summary = systems.get(RAGCTL)
    if o.value is not None and summary is not None:
        o = replace(o, value_ci=summary.profiler_overhead_ci, n=summary.delay_n)
    return replace(
        r, delay_ratio_vs_fixed_equal_quality=a, quality_vs_fixed_similar_delay=d,
        oracle_gap=e, profiler_overhead=o, **vs,
    )  # fmt: skip
