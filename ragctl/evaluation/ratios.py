"""The headline numbers of one phase: ragctl against the fixed configurations, the adaptive
baselines and the oracle, on the dataset's primary metric.

Delay ratios are always other / ragctl (above 1: ragctl is faster); quality differences are
ragctl - other (above 0: ragctl is better). Every ratio has `value` (None when it cannot be
computed, then `reason` says why) and the numbers it came from, ragctl's last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ragctl.evaluation.records import Record
from ragctl.evaluation.systems import FIXED_PREFIX, RAGCTL, system_order

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


@dataclass(frozen=True)
class ProfilerOverhead(Record):
    """Ragctl's profiler time / its delay."""

    value: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Ratios(Record):
    primary: str | None
    delay_ratio_vs_fixed_equal_quality: VsFixedEqualQuality
    delay_ratio_vs_adaptiverag: VsBaseline
    delay_ratio_vs_parrot: VsBaseline
    quality_vs_fixed_similar_delay: VsFixedSimilarDelay
    oracle_gap: OracleGap
    profiler_overhead: ProfilerOverhead
    NESTED: ClassVar[Mapping[str, type[Record]]] = {
        "delay_ratio_vs_fixed_equal_quality": VsFixedEqualQuality,
        "delay_ratio_vs_adaptiverag": VsBaseline,
        "delay_ratio_vs_parrot": VsBaseline,
        "quality_vs_fixed_similar_delay": VsFixedSimilarDelay,
        "oracle_gap": OracleGap,
        "profiler_overhead": ProfilerOverhead,
    }

    def vs(self, baseline: str) -> VsBaseline:
        """The ratio against one of the adaptive baselines (`systems.BASELINES`)."""
        return getattr(self, f"delay_ratio_vs_{baseline}")  # type: ignore[no-any-return]


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


def ratios(systems: Mapping[str, Summary], oracle: OracleSummary | None) -> Ratios:
    """The ratios of one phase, from its system summaries and its oracle."""
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
