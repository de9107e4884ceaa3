"""From `samples.jsonl` rows to typed summaries: per phase (an arrival rate, or a closed loop at
some concurrency) and system, plus the oracle and the headline `ratios`.

Rows with a non-null `error` are counted as errors and left out of every mean and percentile.
Every quality and delay figure has a 95% bootstrap interval over the rows behind it (`*_ci`,
`[lo, hi]`, see `intervals`; None below two rows or in a file written before intervals), and
the ratios paired ones. Every summary is a `Record`: it converts to the dict `results.json`
holds and back.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ragctl.benchmarks import percentile
from ragctl.errors import InvalidRequest, SLOUnmeetable
from ragctl.evaluation.intervals import Interval, mean_ci, percentile_ci, ratio_ci
from ragctl.evaluation.metrics import mean_scores, primary_metric
from ragctl.evaluation.ratios import PerQuery, Ratios, ratios
from ragctl.evaluation.records import Record
from ragctl.evaluation.systems import FIXED_PREFIX, ORACLE, RAGCTL, system_order

Row = Mapping[str, Any]


def failed(row: Row) -> bool:
    return row.get("error") is not None


def finite(value: Any) -> float | None:
    """The number, or None when missing or not finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


SHED_ERROR = SLOUnmeetable.__name__
"""How a shed request's row begins its `error` (the runner writes `Type: message`)."""


def histogram(labels: Iterable[str]) -> dict[str, int]:
    """Label -> count, most first (ties by label)."""
    return dict(sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0])))


def delays_of(rows: Iterable[Row]) -> list[float]:
    return [float(r["delay_s"]) for r in rows if finite(r.get("delay_s")) is not None]


def ttfts_of(rows: Iterable[Row]) -> list[float]:
    return [float(r["ttft_s"]) for r in rows if finite(r.get("ttft_s")) is not None]


def scores_of(rows: Iterable[Row]) -> dict[str, list[float]]:
    """Score name -> the rows' finite values of it (as `mean_scores` averages them)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        for name, value in (r.get("scores") or {}).items():
            bucket = out.setdefault(name, [])
            if value is not None:
                bucket.append(float(value))
    return out


def phase_key(rate: float | None, concurrency: int | None = None) -> str:
    """The key a phase has in a summary: the arrival rate (`0.5`), or `closed` / `closed:4` for
    a closed loop (at that concurrency)."""
    if rate is not None:
        return f"{float(rate):g}"
    return "closed" if concurrency is None else f"closed:{concurrency}"


# -- the records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SloSummary(Record):
    """SLO figures of the rows that carried an SLO: attainment judged on the client-side delay
    (arrival to answer; a failed request is a violation), and what the SLO loop did."""

    slo_ms: float | None
    requests: int
    met: int
    violations: int
    violation_rate: float
    attainment: float
    flagged: int
    boosted_calls: int
    demoted_calls: int
    paused_mean_ms: float | None
    held_mean_ms: float | None
    plan_actions: dict[str, int]


@dataclass(frozen=True)
class Summary(Record):
    """One system's numbers (or the oracle's) in one phase. `quality`: every score's mean,
    evidence included; `throughput_qps`: answered / (last end_s - first arrival_s);
    `profiler_overhead`: sum profile_s / sum delay_s (None when nothing was profiled);
    `configs`: label -> count, most first; `tokens`: means.

    Next to each figure its 95% interval (`*_ci`; `quality_ci` per score) and the number of
    queries behind it: `quality_n` per score (the answered rows with that score), `delay_n`
    (the answered rows with a delay: the delay figures and the profiler overhead), `ttft_n`
    (the answered rows with a time to first token: arrival to the first answer token; results
    written before it have none), `queue_n`.
    All None in a `results.json` written before intervals."""

    n: int | None
    answered: int | None
    errors: int | None
    error_kinds: dict[str, int]
    primary: str | None
    primary_value: float | None
    primary_value_ci: Interval | None
    quality: dict[str, float]
    quality_ci: dict[str, Interval | None] | None
    quality_n: dict[str, int] | None
    delay_mean_s: float | None
    delay_mean_s_ci: Interval | None
    delay_p50_s: float | None
    delay_p50_s_ci: Interval | None
    delay_p95_s: float | None
    delay_p95_s_ci: Interval | None
    delay_n: int | None
    ttft_mean_s: float | None
    ttft_mean_s_ci: Interval | None
    ttft_p50_s: float | None
    ttft_p50_s_ci: Interval | None
    ttft_p95_s: float | None
    ttft_p95_s_ci: Interval | None
    ttft_n: int | None
    queue_mean_s: float | None
    queue_mean_s_ci: Interval | None
    queue_n: int | None
    throughput_qps: float | None
    profiler_overhead: float | None
    profiler_overhead_ci: Interval | None
    configs: dict[str, int]
    top_config: str | None
    tokens: dict[str, float]

    @property
    def evidence_recall(self) -> float | None:
        return (self.quality or {}).get("evidence_recall")

    @property
    def evidence_recall_ci(self) -> Interval | None:
        return (self.quality_ci or {}).get("evidence_recall")

    @property
    def primary_n(self) -> int | None:
        """The number of answered rows with a primary score."""
        return (self.quality_n or {}).get(self.primary) if self.primary else None

    @property
    def top_share(self) -> float | None:
        """The share of answered rows that ran `top_config`."""
        if self.top_config is None or not self.answered:
            return None
        return (self.configs or {}).get(self.top_config, 0) / self.answered


@dataclass(frozen=True)
class SystemSummary(Summary):
    slo: SloSummary | None
    NESTED: ClassVar[Mapping[str, type[Record]]] = {"slo": SloSummary}


@dataclass(frozen=True)
class OracleSummary(Summary):
    """Per query the best `fixed:*` configuration (derived, not run): `picks` query id ->
    configuration, over the queries every one of `fixed_systems` answered."""

    fixed_systems: list[str]
    queries_excluded: int
    picks: dict[str, str]


@dataclass(frozen=True)
class Phase(Record):
    """One arrival rate (or closed loop): its systems in `system_order`, the oracle, the ratios."""

    rate: float | None
    concurrency: int | None
    systems: dict[str, SystemSummary]
    oracle: OracleSummary | None
    ratios: Ratios
    variants: dict[str, Ratios] | None = None
    """The same ratios for each `ragctl:<objective>` system (None: there is none)."""
    OMIT_NONE: ClassVar[tuple[str, ...]] = ("variants",)

    @property
    def title(self) -> str:
        """`arrival rate 0.5 q/s`, `closed loop`, `closed loop, concurrency 4`."""
        if self.rate is not None:
            return f"arrival rate {float(self.rate):g} q/s"
        if self.concurrency is None:
            return "closed loop"
        return f"closed loop, concurrency {self.concurrency}"

    def with_oracle(self) -> dict[str, Summary]:
        """The systems, then the oracle (when there is one)."""
        out: dict[str, Summary] = dict(self.systems)
        if self.oracle is not None:
            out[ORACLE] = self.oracle
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Phase:
        systems = {n: SystemSummary.from_dict(s) for n, s in (data.get("systems") or {}).items()}
        orc = None if data.get("oracle") is None else OracleSummary.from_dict(data["oracle"])
        stored = data.get("ratios")
        return cls(
            rate=data.get("rate"),
            concurrency=data.get("concurrency"),
            systems=systems,
            oracle=orc,
            ratios=Ratios.from_dict(stored) if stored else ratios(systems, orc),
            variants=(
                {k: Ratios.from_dict(v) for k, v in data["variants"].items()}
                if data.get("variants")
                else None
            ),
        )


@dataclass(frozen=True)
class Evaluation:
    """A run's summaries: its phases by rising rate (closed loops last), keyed by `phase_key`;
    `meta` is the run's description when read from `results.json`."""

    dataset: str | None
    primary: str | None
    phases: dict[str, Phase]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """From `results.json`'s payload."""
        return cls(
            dataset=data.get("dataset"),
            primary=data.get("primary"),
            phases={k: Phase.from_dict(p) for k, p in (data.get("rates") or {}).items()},
            meta=dict(data.get("meta") or {}),
        )


# -- computing them ----------------------------------------------------------------------------


def _scored(rows: Sequence[Row], primary: str | None, configs: dict[str, int]) -> dict[str, Any]:
    """The fields a system and the oracle compute alike from their answered rows."""
    quality = mean_scores([r.get("scores") or {} for r in rows])
    scored = scores_of(rows)
    quality_ci = {name: mean_ci(scored[name]) for name in quality}
    delays = delays_of(rows)
    ttfts = ttfts_of(rows)
    tokens: dict[str, list[float]] = {}
    for r in rows:
        for name, value in (r.get("tokens") or {}).items():
            bucket = tokens.setdefault(name, [])
            if value is not None:
                bucket.append(float(value))
    return {
        "primary": primary,
        "primary_value": quality.get(primary) if primary else None,
        "primary_value_ci": quality_ci.get(primary) if primary else None,
        "quality": quality,
        "quality_ci": quality_ci,
        "quality_n": {name: len(scored[name]) for name in quality},
        "delay_mean_s": mean(delays),
        "delay_mean_s_ci": mean_ci(delays),
        "delay_p50_s": percentile(delays, 0.5) if delays else None,
        "delay_p50_s_ci": percentile_ci(delays, 0.5),
        "delay_p95_s": percentile(delays, 0.95) if delays else None,
        "delay_p95_s_ci": percentile_ci(delays, 0.95),
        "delay_n": len(delays),
        "ttft_mean_s": mean(ttfts),
        "ttft_mean_s_ci": mean_ci(ttfts),
        "ttft_p50_s": percentile(ttfts, 0.5) if ttfts else None,
        "ttft_p50_s_ci": percentile_ci(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95) if ttfts else None,
        "ttft_p95_s_ci": percentile_ci(ttfts, 0.95),
        "ttft_n": len(ttfts) if ttfts else None,  # None: rows from before TTFT was recorded
        "configs": configs,
        "top_config": next(iter(configs), None),
        "tokens": {name: sum(v) / len(v) for name, v in tokens.items() if v},
    }


def system_summary(rows: Sequence[Row], primary: str | None) -> SystemSummary:
    """One system's numbers in one phase."""
    answered = [r for r in rows if not failed(r)]
    errors = [r for r in rows if failed(r)]
    timed = [r for r in answered if finite(r.get("delay_s")) is not None]
    queues = [float(r["queue_s"]) for r in answered if finite(r.get("queue_s")) is not None]
    starts = [float(r["arrival_s"]) for r in rows if finite(r.get("arrival_s")) is not None]
    ends = [float(r["end_s"]) for r in rows if finite(r.get("end_s")) is not None]
    span = max(ends) - min(starts) if starts and ends else None
    profiled = [finite(r.get("profile_s")) for r in timed]
    overhead = overhead_ci = None
    if any(p is not None for p in profiled):
        total = sum(delays_of(timed))
        overhead = sum(p or 0.0 for p in profiled) / total if total else None
        overhead_ci = ratio_ci([p or 0.0 for p in profiled], delays_of(timed))
    configs = histogram(str(r["config"]) for r in answered if r.get("config"))
    return SystemSummary(
        n=len(rows),
        answered=len(answered),
        errors=len(errors),
        error_kinds=histogram(str(r["error"]).split(":", 1)[0].strip() for r in errors),
        queue_mean_s=mean(queues),
        queue_mean_s_ci=mean_ci(queues),
        queue_n=len(queues),
        throughput_qps=len(answered) / span if span is not None and span > 0 else None,
        profiler_overhead=overhead,
        profiler_overhead_ci=overhead_ci,
        slo=slo_summary(rows),
        **_scored(answered, primary, configs),
    )


def slo_summary(rows: Sequence[Row]) -> SloSummary | None:
    """The SLO figures of the rows that carried an SLO (None when none did), from each
    Decision's `slo` record."""
    with_slo = [r for r in rows if finite(r.get("slo_ms")) is not None]
    if not with_slo:
        return None
    met = sum(not failed(r) and float(r["delay_s"]) * 1000 <= float(r["slo_ms"]) for r in with_slo)
    records = [(r.get("decision") or {}).get("slo") or {} for r in with_slo]
    n = len(with_slo)
    return SloSummary(
        slo_ms=mean([float(r["slo_ms"]) for r in with_slo]),
        requests=n,
        met=met,
        violations=n - met,
        violation_rate=(n - met) / n,
        attainment=met / n,
        flagged=sum(bool(x.get("flagged")) for x in records),
        boosted_calls=sum(int(x.get("boosted_calls") or 0) for x in records),
        demoted_calls=sum(int(x.get("demoted_calls") or 0) for x in records),
        paused_mean_ms=mean([float(x.get("paused_ms") or 0.0) for x in records]),
        held_mean_ms=mean([float(x.get("held_ms") or 0.0) for x in records]),
        plan_actions=histogram(
            [str(x["plan_action"]) for x in records if x.get("plan_action", "none") != "none"]
            # A shed request failed before its answer: its row has the error, not a Decision.
            + ["shed" for r in with_slo if str(r.get("error") or "").startswith(SHED_ERROR)]
        ),
    )


def oracle(rows: Sequence[Row], primary: str | None) -> OracleSummary | None:
    """Per query, the `fixed:*` row with the best primary score (ties: the lowest delay, then
    the first in `system_order`), over the queries every fixed system answered; the means of
    those picks. Rows of one phase only. None when the phase has no fixed system."""
    fixed = sorted(
        {str(r.get("system")) for r in rows if str(r.get("system", "")).startswith(FIXED_PREFIX)},
        key=system_order,
    )
    if not fixed:
        return None
    answers: dict[tuple[str, str], Row] = {}
    queries: dict[str, None] = {}  # in first-seen order
    for r in rows:
        system = str(r.get("system", ""))
        if system not in fixed:
            continue
        qid = str(r.get("query_id"))
        queries.setdefault(qid)
        if not failed(r):
            answers.setdefault((qid, system), r)  # a repeated row: the first answer counts

    def rank(pair: tuple[int, Row]) -> tuple[float, float, int]:
        index, row = pair
        value = finite((row.get("scores") or {}).get(primary)) if primary else None
        delay = finite(row.get("delay_s"))
        return (
            -value if value is not None else math.inf,
            delay if delay is not None else math.inf,
            index,
        )

    picks: dict[str, str] = {}
    picked: list[Row] = []
    for qid in queries:
        candidates = [answers.get((qid, s)) for s in fixed]
        if any(c is None for c in candidates):
            continue
        index, best = min(enumerate(candidates), key=rank)  # type: ignore[arg-type]
        picks[qid] = fixed[index][len(FIXED_PREFIX) :]
        picked.append(best)  # type: ignore[arg-type]
    return OracleSummary(
        n=len(picked),
        answered=len(picked),
        errors=0,
        error_kinds={},
        queue_mean_s=None,
        queue_mean_s_ci=None,
        queue_n=None,
        throughput_qps=None,
        profiler_overhead=None,
        profiler_overhead_ci=None,
        fixed_systems=fixed,
        queries_excluded=len(queries) - len(picked),
        picks=picks,
        **_scored(picked, primary, histogram(picks.values())),
    )


def _primary_of(rows: Sequence[Row], dataset: str | None) -> str | None:
    names = Counter(r["primary"] for r in rows if r.get("primary"))
    if len(names) > 1:
        raise ValueError(f"rows disagree on the primary metric: {dict(names)}")
    if names:
        return next(iter(names))
    if dataset:
        try:
            return primary_metric(dataset)
        except (InvalidRequest, OSError, ValueError):
            return None
    return None


def by_query(rows: Iterable[Row]) -> dict[str, Row | None]:
    """A system's rows by query id, in first-seen order: the first answered row, or None where
    every row of that query failed."""
    out: dict[str, Row | None] = {}
    for r in rows:
        qid = str(r.get("query_id"))
        if out.get(qid) is None:
            out[qid] = None if failed(r) else r
    return out


def oracle_by_query(samples: Mapping[str, PerQuery], orc: OracleSummary) -> dict[str, Row | None]:
    """The oracle's picks as rows by query id (None: a query some fixed system did not answer)."""
    out: dict[str, Row | None] = {}
    for system in orc.fixed_systems:
        out.update(dict.fromkeys(q for q in samples.get(system, {}) if q not in out))
    for qid, config in orc.picks.items():
        out[qid] = samples[FIXED_PREFIX + config][qid]
    return out


def _phase_order(phase: Phase) -> tuple[int, float]:
    return (0, float(phase.rate)) if phase.rate is not None else (1, 0.0)


def summarize(rows: Sequence[Row]) -> Evaluation:
    """Summaries per phase and system, the oracle, and the ratios (rows of one dataset)."""
    datasets = sorted({str(r["dataset"]) for r in rows if r.get("dataset")})
    if len(datasets) > 1:
        raise ValueError(f"rows from several datasets ({', '.join(datasets)}); report one run")
    dataset = datasets[0] if datasets else None
    primary = _primary_of(rows, dataset)
    grouped: dict[str, list[Row]] = {}
    for r in rows:
        grouped.setdefault(phase_key(r.get("rate"), r.get("concurrency")), []).append(r)
    phases: dict[str, Phase] = {}
    for key, phase_rows in grouped.items():
        by_system: dict[str, list[Row]] = {}
        for r in phase_rows:
            by_system.setdefault(str(r.get("system")), []).append(r)
        systems = {
            name: system_summary(by_system[name], primary)
            for name in sorted(by_system, key=system_order)
        }
        orc = oracle(phase_rows, primary)
        samples = {name: by_query(by_system[name]) for name in systems}
        if orc is not None:
            samples[ORACLE] = oracle_by_query(samples, orc)
        phases[key] = Phase(
            rate=phase_rows[0].get("rate"),
            concurrency=next(
                (r["concurrency"] for r in phase_rows if r.get("concurrency") is not None), None
            ),
            systems=systems,
            oracle=orc,
            ratios=ratios(systems, orc, samples),
            variants={
                name: ratios({**systems, RAGCTL: systems[name]}, orc,
                             {**samples, RAGCTL: samples[name]})
                for name in systems if name.startswith(RAGCTL + ":")
            } or None,  # fmt: skip
        )
    ordered = sorted(phases.items(), key=lambda kv: (*_phase_order(kv[1]), kv[0]))
    return Evaluation(dataset=dataset, primary=primary, phases=dict(ordered))
