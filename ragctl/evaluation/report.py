"""Evaluation reports: from `samples.jsonl` rows to summaries, headline ratios, files and tables.

`ragctl eval run` appends one JSON row per (query x system x rate) to `DIR/samples.jsonl` as each
completes. Everything here is a pure function of those rows, plus the writers:

- `load_samples` reads the rows back (a torn line from an interrupted run is skipped, counted).
- `summarize` groups them by phase (an arrival rate, or a closed loop at some concurrency) and
  system: counts, answer and evidence quality, delay percentiles, throughput, profiler overhead,
  the configurations that ran, token means; adds the oracle (per query the best `fixed:*`
  configuration, derived, not run) and `ratios`, the numbers behind the headline claims.
- `write_results`, `write_summary_csv`, `write_plots` write results.json, summary.csv and PNGs.
- `render_report` prints rich tables and the ratios in words; `report_dir` does it for a run's
  directory.

Rows with a non-null `error` are counted as errors and left out of every mean and percentile.
Delay ratios are always other / ragctl (above 1: ragctl is faster); quality differences are
ragctl - other (above 0: ragctl is better), on the dataset's primary metric.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ragctl.benchmarks import percentile
from ragctl.errors import InvalidRequest
from ragctl.evaluation.metrics import ANSWER_SCORES, EVIDENCE_SCORES, mean_scores, primary_metric
from ragctl.types import Config

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.csv"
RESULTS_VERSION = 1

RAGCTL = "ragctl"
BASELINES = ("adaptiverag", "parrot")
FIXED_PREFIX = "fixed:"
ORACLE = "oracle"

_EPS = 1e-12
"""Slack when asking whether a fixed configuration's quality is at least ragctl's."""

Row = Mapping[str, Any]


# -- reading -----------------------------------------------------------------------------------


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `samples.jsonl`, in file order. Lines that are not a JSON object (the torn
    last line an interrupted run leaves, or one a resumed run appended to) are skipped; their
    count and line numbers are logged as a warning."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    torn: list[int] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn.append(number)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn.append(number)
    if torn:
        log.warning(
            "%s: skipped %d unreadable line(s) (line %s); an interrupted run leaves a torn "
            "last line",
            path,
            len(torn),
            ", ".join(map(str, torn)),
        )
    return rows


# -- phases and systems ------------------------------------------------------------------------


def phase_key(rate: float | None, concurrency: int | None = None) -> str:
    """The key a phase has in a summary: the arrival rate (`0.5`), or `closed` / `closed:4` for
    a closed loop (at that concurrency)."""
    if rate is not None:
        return f"{float(rate):g}"
    return "closed" if concurrency is None else f"closed:{concurrency}"


def phase_title(rate_summary: Mapping[str, Any]) -> str:
    """`arrival rate 0.5 q/s`, `closed loop`, `closed loop, concurrency 4`."""
    rate, conc = rate_summary.get("rate"), rate_summary.get("concurrency")
    if rate is not None:
        return f"arrival rate {float(rate):g} q/s"
    return "closed loop" if conc is None else f"closed loop, concurrency {conc}"


def _phase_order(item: tuple[str, Mapping[str, Any]]) -> tuple[int, float, str]:
    key, entry = item
    rate = entry.get("rate")
    return (0, float(rate), key) if rate is not None else (1, 0.0, key)


def system_order(name: str) -> tuple[Any, ...]:
    """Sort key: ragctl, adaptiverag, parrot, other systems, then `fixed:*` by method, chunks
    and summary budget."""
    if name == RAGCTL:
        return (0, 0, "", 0, 0)
    if name in BASELINES:
        return (0, 1 + BASELINES.index(name), "", 0, 0)
    if name.startswith(FIXED_PREFIX):
        try:
            c = Config.parse(name[len(FIXED_PREFIX) :])
        except ValueError:
            return (3, 0, name, 0, 0)
        return (2, 0, c.method, c.num_chunks, c.intermediate_length or 0)
    return (1, 0, name, 0, 0)


def _failed(row: Row) -> bool:
    return row.get("error") is not None


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _histogram(labels: Iterable[str]) -> dict[str, int]:
    counts = Counter(labels)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _token_means(rows: Sequence[Row]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, value in (row.get("tokens") or {}).items():
            bucket = values.setdefault(name, [])
            if value is not None:
                bucket.append(float(value))
    return {name: sum(v) / len(v) for name, v in values.items() if v}


def _delay_stats(delays: Sequence[float]) -> dict[str, float | None]:
    if not delays:
        return {"delay_mean_s": None, "delay_p50_s": None, "delay_p95_s": None}
    return {
        "delay_mean_s": sum(delays) / len(delays),
        "delay_p50_s": percentile(delays, 0.5),
        "delay_p95_s": percentile(delays, 0.95),
    }


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


# -- summaries ---------------------------------------------------------------------------------


def system_summary(rows: Sequence[Row], primary: str | None) -> dict[str, Any]:
    """One system's numbers in one phase (see `summarize`)."""
    answered = [r for r in rows if not _failed(r)]
    errors = [r for r in rows if _failed(r)]
    quality = mean_scores([r.get("scores") or {} for r in answered])
    timed = [r for r in answered if _num(r.get("delay_s")) is not None]
    delays = [float(r["delay_s"]) for r in timed]
    queues = [float(r["queue_s"]) for r in answered if _num(r.get("queue_s")) is not None]
    starts = [float(r["arrival_s"]) for r in rows if _num(r.get("arrival_s")) is not None]
    ends = [float(r["end_s"]) for r in rows if _num(r.get("end_s")) is not None]
    span = max(ends) - min(starts) if starts and ends else None
    throughput = len(answered) / span if span is not None and span > 0 else None
    profiled = [_num(r.get("profile_s")) for r in timed]
    overhead = None
    if any(p is not None for p in profiled):
        overhead = _ratio(sum(p or 0.0 for p in profiled), sum(delays))
    configs = _histogram(str(r["config"]) for r in answered if r.get("config"))
    return {
        "n": len(rows),
        "answered": len(answered),
        "errors": len(errors),
        "error_kinds": _histogram(str(r["error"]).split(":", 1)[0].strip() for r in errors),
        "primary": primary,
        "primary_value": quality.get(primary) if primary else None,
        "quality": quality,
        **_delay_stats(delays),
        "queue_mean_s": _mean(queues),
        "throughput_qps": throughput,
        "profiler_overhead": overhead,
        "configs": configs,
        "top_config": next(iter(configs), None),
        "tokens": _token_means(answered),
        "slo": slo_summary(rows),
    }


def slo_summary(rows: Sequence[Row]) -> dict[str, Any] | None:
    """SLO figures of rows that carried an SLO (None when none did): attainment judged on the
    client-side delay (arrival to answer; a failed request is a violation), and what the SLO
    loop did, from each Decision's `slo` record."""
    with_slo = [r for r in rows if _num(r.get("slo_ms")) is not None]
    if not with_slo:
        return None
    met = [
        r for r in with_slo
        if not _failed(r) and float(r["delay_s"]) * 1000 <= float(r["slo_ms"])
    ]  # fmt: skip
    records = [(r.get("decision") or {}).get("slo") or {} for r in with_slo]
    n = len(with_slo)
    return {
        "slo_ms": _mean([float(r["slo_ms"]) for r in with_slo]),
        "requests": n,
        "met": len(met),
        "violations": n - len(met),
        "violation_rate": (n - len(met)) / n,
        "attainment": len(met) / n,
        "flagged": sum(bool(x.get("flagged")) for x in records),
        "boosted_calls": sum(int(x.get("boosted_calls") or 0) for x in records),
        "paused_mean_ms": _mean([float(x.get("paused_ms") or 0.0) for x in records]),
        "plan_actions": _histogram(
            str(x["plan_action"]) for x in records if x.get("plan_action", "none") != "none"
        ),
    }


def oracle(rows: Sequence[Row], primary: str | None) -> dict[str, Any] | None:
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
    queries: list[str] = []
    for r in rows:
        system = str(r.get("system", ""))
        if system not in fixed:
            continue
        qid = str(r.get("query_id"))
        if qid not in queries:
            queries.append(qid)
        if not _failed(r):
            answers.setdefault((qid, system), r)  # a repeated row: the first answer counts

    def rank(pair: tuple[int, Row]) -> tuple[float, float, int]:
        index, row = pair
        value = _num((row.get("scores") or {}).get(primary)) if primary else None
        delay = _num(row.get("delay_s"))
        return (
            -value if value is not None else math.inf,
            delay if delay is not None else math.inf,
            index,
        )

    picks: dict[str, str] = {}
    picked: list[Row] = []
    excluded = 0
    for qid in queries:
        candidates = [answers.get((qid, s)) for s in fixed]
        if any(c is None for c in candidates):
            excluded += 1
            continue
        index, best = min(enumerate(candidates), key=rank)  # type: ignore[arg-type]
        picks[qid] = fixed[index][len(FIXED_PREFIX) :]
        picked.append(best)  # type: ignore[arg-type]
    quality = mean_scores([r.get("scores") or {} for r in picked])
    delays = [float(r["delay_s"]) for r in picked if _num(r.get("delay_s")) is not None]
    configs = _histogram(picks.values())
    return {
        "n": len(picked),
        "answered": len(picked),
        "errors": 0,
        "error_kinds": {},
        "primary": primary,
        "primary_value": quality.get(primary) if primary else None,
        "quality": quality,
        **_delay_stats(delays),
        "queue_mean_s": None,
        "throughput_qps": None,
        "profiler_overhead": None,
        "configs": configs,
        "top_config": next(iter(configs), None),
        "tokens": _token_means(picked),
        "fixed_systems": fixed,
        "queries_excluded": excluded,
        "picks": picks,
    }


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Summaries per phase and system, the oracle, and the ratios.

    Returns `{"dataset", "primary", "rates": {phase_key: {"rate", "concurrency", "systems":
    {system: system_summary}, "oracle": ... | None, "ratios": ...}}}`, phases by rising rate
    (closed loops last), systems in `system_order`. A system summary holds `n`, `answered`,
    `errors`, `error_kinds`, `primary`, `primary_value`, `quality` (every score's mean, evidence
    included), `delay_mean_s`/`delay_p50_s`/`delay_p95_s`, `queue_mean_s`, `throughput_qps`
    (answered / (last end_s - first arrival_s)), `profiler_overhead` (sum profile_s / sum
    delay_s; None when nothing was profiled), `configs` (label -> count, most first),
    `top_config`, `tokens` (means)."""
    datasets = sorted({str(r["dataset"]) for r in rows if r.get("dataset")})
    if len(datasets) > 1:
        raise ValueError(f"rows from several datasets ({', '.join(datasets)}); report one run")
    dataset = datasets[0] if datasets else None
    primary = _primary_of(rows, dataset)
    phases: dict[str, list[Row]] = {}
    for r in rows:
        phases.setdefault(phase_key(r.get("rate"), r.get("concurrency")), []).append(r)
    entries: dict[str, dict[str, Any]] = {}
    for key, phase_rows in phases.items():
        by_system: dict[str, list[Row]] = {}
        for r in phase_rows:
            by_system.setdefault(str(r.get("system")), []).append(r)
        first = phase_rows[0]
        concurrency = next(
            (r["concurrency"] for r in phase_rows if r.get("concurrency") is not None), None
        )
        entry: dict[str, Any] = {
            "rate": first.get("rate"),
            "concurrency": concurrency,
            "systems": {
                name: system_summary(by_system[name], primary)
                for name in sorted(by_system, key=system_order)
            },
            "oracle": oracle(phase_rows, primary),
        }
        entry["ratios"] = ratios(entry)
        entries[key] = entry
    return {
        "dataset": dataset,
        "primary": primary,
        "rates": dict(sorted(entries.items(), key=_phase_order)),
    }


# -- ratios ------------------------------------------------------------------------------------


def _q(s: Mapping[str, Any] | None) -> float | None:
    return None if s is None else s.get("primary_value")


def _d(s: Mapping[str, Any] | None) -> float | None:
    return None if s is None else s.get("delay_mean_s")


def _pct(diff: float | None, base: float | None) -> float | None:
    r = _ratio(diff, base)
    return None if r is None else 100.0 * r


def _missing(**numbers: Any) -> dict[str, Any]:
    return {"value": None, **numbers}


def ratios(rate_summary: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of one phase, ragctl against the rest, on the primary metric.

    Every entry has `value` (None when it cannot be computed, then `reason` says why) and the
    numbers it came from:
    - `delay_ratio_vs_fixed_equal_quality`: fixed delay / ragctl delay for the fastest fixed
      configuration whose quality is at least ragctl's (`config`; `best_fixed_*` when none is);
    - `delay_ratio_vs_adaptiverag`, `delay_ratio_vs_parrot`: their delay / ragctl delay, with
      `quality_diff` (ragctl - theirs) and `quality_diff_pct` (of theirs);
    - `quality_vs_fixed_similar_delay`: ragctl quality - that of the fixed configuration whose
      mean delay is closest to ragctl's (`quality_diff_pct` of the fixed one's; `delay_ratio`);
    - `oracle_gap`: oracle quality - ragctl quality (`gap_pct` of the oracle's), `delay_ratio`
      oracle / ragctl;
    - `profiler_overhead`: ragctl's profiler time / its delay."""
    systems: Mapping[str, Mapping[str, Any]] = rate_summary.get("systems") or {}
    rag = systems.get(RAGCTL)
    primary = next((s.get("primary") for s in systems.values() if s.get("primary")), None)
    rq, rd = _q(rag), _d(rag)
    base = {"ragctl_quality": rq, "ragctl_delay_s": rd}
    fixed = {
        name: s
        for name, s in systems.items()
        if name.startswith(FIXED_PREFIX) and _q(s) is not None and _d(s) is not None
    }
    out: dict[str, Any] = {"primary": primary}

    why = None
    if rag is None:
        why = "no ragctl rows in this phase"
    elif rd is None or rq is None:
        why = f"ragctl has no answered rows with a delay and a {primary} score"
    elif rd == 0:
        why = "ragctl's mean delay is 0"

    # (a) the fastest fixed configuration of equal-or-better quality
    a = _missing(config=None, fixed_quality=None, fixed_delay_s=None, **base)
    if why:
        a["reason"] = why
    elif not fixed:
        a["reason"] = "no fixed configuration in this phase"
    else:
        eligible = [n for n, s in fixed.items() if _q(s) >= rq - _EPS]  # type: ignore[operator]
        if eligible:
            name = min(eligible, key=lambda n: (_d(fixed[n]), system_order(n)))
            a.update(
                value=_ratio(_d(fixed[name]), rd),
                config=name,
                fixed_quality=_q(fixed[name]),
                fixed_delay_s=_d(fixed[name]),
                reason=None,
            )
        else:
            best = max(fixed, key=lambda n: (_q(fixed[n]), -_d(fixed[n])))  # type: ignore[operator]
            a.update(
                best_fixed_config=best,
                best_fixed_quality=_q(fixed[best]),
                best_fixed_delay_s=_d(fixed[best]),
                reason=(
                    f"no fixed configuration reaches ragctl's {primary} {rq:.3f} "
                    f"(best: {best} at {_q(fixed[best]):.3f})"
                ),
            )
    out["delay_ratio_vs_fixed_equal_quality"] = a

    # (b), (c) the adaptive baselines
    for name in BASELINES:
        other = systems.get(name)
        oq, od = _q(other), _d(other)
        entry = _missing(
            system=name, other_quality=oq, other_delay_s=od, quality_diff=None,
            quality_diff_pct=None, **base,
        )  # fmt: skip
        if why:
            entry["reason"] = why
        elif other is None:
            entry["reason"] = f"no {name} rows in this phase"
        elif od is None:
            entry["reason"] = f"{name} has no answered rows with a delay"
        else:
            diff = rq - oq if rq is not None and oq is not None else None
            entry.update(
                value=_ratio(od, rd),
                quality_diff=diff,
                quality_diff_pct=_pct(diff, oq),
                reason=None,
            )
        out[f"delay_ratio_vs_{name}"] = entry

    # (d) the fixed configuration of the most similar delay
    d = _missing(
        config=None, fixed_quality=None, fixed_delay_s=None, quality_diff_pct=None,
        delay_ratio=None, **base,
    )  # fmt: skip
    if why:
        d["reason"] = why
    elif not fixed:
        d["reason"] = "no fixed configuration in this phase"
    else:
        name = min(fixed, key=lambda n: (abs(_d(fixed[n]) - rd), system_order(n)))  # type: ignore[operator]
        fq = _q(fixed[name])
        d.update(
            value=rq - fq,  # type: ignore[operator]
            config=name,
            fixed_quality=fq,
            fixed_delay_s=_d(fixed[name]),
            quality_diff_pct=_pct(rq - fq, fq),  # type: ignore[operator]
            delay_ratio=_ratio(_d(fixed[name]), rd),
            reason=None,
        )
    out["quality_vs_fixed_similar_delay"] = d

    # (e) distance to the oracle
    orc = rate_summary.get("oracle")
    oq, od = _q(orc), _d(orc)
    e = _missing(oracle_quality=oq, oracle_delay_s=od, gap_pct=None, delay_ratio=None, **base)
    if why:
        e["reason"] = why
    elif orc is None or oq is None:
        e["reason"] = "no oracle: no query answered by every fixed configuration"
    else:
        e.update(value=oq - rq, gap_pct=_pct(oq - rq, oq), delay_ratio=_ratio(od, rd), reason=None)
    out["oracle_gap"] = e

    overhead = None if rag is None else rag.get("profiler_overhead")
    reason = None
    if rag is None:
        reason = "no ragctl rows in this phase"
    elif overhead is None:
        reason = "ragctl recorded no profiler time"
    out["profiler_overhead"] = {"value": overhead, "reason": reason}
    return out


# -- files -------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_results(
    directory: str | Path, summary: Mapping[str, Any], meta: Mapping[str, Any]
) -> Path:
    """Write `results.json`: `{"version", "meta", "dataset", "primary", "rates"}`, `rates` as
    in `summarize`. `meta` is the run's description (dataset, command line, model, settings,
    seed, limits); anything JSON cannot hold is written as its `str`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": RESULTS_VERSION,
        "meta": _clean(dict(meta)),
        "dataset": summary.get("dataset"),
        "primary": summary.get("primary"),
        "rates": _clean(summary.get("rates") or {}),
    }
    path = directory / RESULTS_FILE
    path.write_text(json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n")
    return path


def _score_columns(summary: Mapping[str, Any]) -> list[str]:
    seen: list[str] = []
    for entry in (summary.get("rates") or {}).values():
        for s in _with_oracle(entry).values():
            for name in s.get("quality") or {}:
                if name not in seen:
                    seen.append(name)
    known = [n for n in (*ANSWER_SCORES, *EVIDENCE_SCORES) if n in seen]
    return known + [n for n in seen if n not in known]


def _with_oracle(entry: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    out = dict(entry.get("systems") or {})
    if entry.get("oracle") is not None:
        out[ORACLE] = entry["oracle"]
    return out


SUMMARY_COLUMNS_HEAD = ("rate", "concurrency", "system", "n", "errors", "primary", "quality")
SUMMARY_COLUMNS_TAIL = (
    "delay_mean_s", "delay_p50_s", "delay_p95_s", "queue_mean_s", "throughput_qps",
    "profiler_overhead", "top_config", "calls_mean", "prompt_tokens_mean", "output_tokens_mean",
)  # fmt: skip


def write_summary_csv(directory: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write `summary.csv`: one row per phase x system, the oracle included (`system` =
    `oracle`); columns `SUMMARY_COLUMNS_HEAD`, each score's mean (em, f1, ..., evidence_recall,
    evidence_hit, as present), then `SUMMARY_COLUMNS_TAIL`. Empty cells for None."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scores = _score_columns(summary)
    columns = [*SUMMARY_COLUMNS_HEAD, *scores, *SUMMARY_COLUMNS_TAIL]
    path = directory / SUMMARY_FILE
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for entry in (summary.get("rates") or {}).values():
            for name, s in _with_oracle(entry).items():
                quality = s.get("quality") or {}
                tokens = s.get("tokens") or {}
                row = {
                    "rate": entry.get("rate"),
                    "concurrency": entry.get("concurrency"),
                    "system": name,
                    "n": s.get("n"),
                    "errors": s.get("errors"),
                    "primary": s.get("primary"),
                    "quality": s.get("primary_value"),
                    **{k: quality.get(k) for k in scores},
                    **{k: s.get(k) for k in SUMMARY_COLUMNS_TAIL[:7]},
                    "calls_mean": tokens.get("calls"),
                    "prompt_tokens_mean": tokens.get("prompt"),
                    "output_tokens_mean": tokens.get("output"),
                }
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    ordered = sorted(set(names) - {ORACLE}, key=system_order)
    out = {name: cmap(i % 10) for i, name in enumerate(ordered)}
    out[ORACLE] = "black"
    return out


def write_plots(
    directory: str | Path, rows: Sequence[Row], summary: Mapping[str, Any]
) -> list[Path]:
    """Write the figures (matplotlib, Agg): `quality_vs_delay.png` (primary quality against
    mean delay, one labelled point per system and the oracle, a panel per phase: the METIS
    paper's Fig. 10 view), `delay_cdf.png` (CDF of answered rows' delay_s per system, a panel
    per phase) and, with two or more arrival rates, `load.png` (throughput and mean delay
    against the arrival rate, a line per system). Returns the paths written."""
    from matplotlib.figure import Figure  # needs the `eval` extra; Figure renders with Agg

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = summary.get("rates") or {}
    if not entries:
        return []
    primary = summary.get("primary") or "quality"
    dataset = summary.get("dataset") or "run"
    names = {n for e in entries.values() for n in _with_oracle(e)}
    colors = _colors(names)
    written: list[Path] = []
    n = len(entries)

    fig = Figure(figsize=(5.2 * n, 4.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, entry in zip(axes, entries.values(), strict=True):
        for name, s in _with_oracle(entry).items():
            x, y = _d(s), _q(s)
            if x is None or y is None:
                continue
            marker = "*" if name == ORACLE else ("D" if name == RAGCTL else "o")
            size = 160 if name in (ORACLE, RAGCTL) else 60
            ax.scatter([x], [y], color=colors[name], marker=marker, s=size, zorder=3)
            label = name[len(FIXED_PREFIX) :] if name.startswith(FIXED_PREFIX) else name
            offset = (5, -12) if name == ORACLE else (5, 4)  # an oracle often sits on a fixed one
            ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
        ax.set_title(phase_title(entry))
        ax.set_xlabel("mean delay, arrival to answer (s)")
        ax.set_ylabel(f"{primary} (mean, 0-1)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{dataset}: quality vs mean delay (diamond: ragctl, star: oracle)")
    written.append(_save(fig, directory / "quality_vs_delay.png"))

    fig = Figure(figsize=(5.2 * n, 4.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    keys = list(entries)
    for ax, key in zip(axes, keys, strict=True):
        delays: dict[str, list[float]] = {}
        for r in rows:
            if phase_key(r.get("rate"), r.get("concurrency")) != key or _failed(r):
                continue
            value = _num(r.get("delay_s"))
            if value is not None:
                delays.setdefault(str(r.get("system")), []).append(value)
        for name in sorted(delays, key=system_order):
            xs = sorted(delays[name])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step([xs[0], *xs], [0.0, *ys], where="post", color=colors.get(name), label=name)
        ax.set_title(phase_title(entries[key]))
        ax.set_xlabel("delay, arrival to answer (s)")
        ax.set_ylabel("fraction of answered queries")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if delays:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{dataset}: delay CDF per system")
    written.append(_save(fig, directory / "delay_cdf.png"))

    rated = [e for e in entries.values() if e.get("rate") is not None]
    if len(rated) >= 2:
        fig = Figure(figsize=(11, 4.4), layout="constrained")
        ax_t, ax_d = fig.subplots(1, 2)
        systems = sorted({n for e in rated for n in e.get("systems") or {}}, key=system_order)
        for name in systems:
            pts = [
                (float(e["rate"]), e["systems"][name])
                for e in rated
                if name in (e.get("systems") or {})
            ]
            pts.sort(key=lambda p: p[0])
            tp = [(r, s["throughput_qps"]) for r, s in pts if s.get("throughput_qps") is not None]
            dl = [(r, s["delay_mean_s"]) for r, s in pts if s.get("delay_mean_s") is not None]
            if tp:
                ax_t.plot(*zip(*tp, strict=True), marker="o", color=colors[name], label=name)
            if dl:
                ax_d.plot(*zip(*dl, strict=True), marker="o", color=colors[name], label=name)
        top = max(float(e["rate"]) for e in rated)
        ax_t.plot([0, top], [0, top], linestyle=":", color="grey", label="offered load")
        ax_t.set_title("throughput vs arrival rate")
        ax_t.set_xlabel("arrival rate (queries/s)")
        ax_t.set_ylabel("throughput, answered (queries/s)")
        ax_d.set_title("mean delay vs arrival rate")
        ax_d.set_xlabel("arrival rate (queries/s)")
        ax_d.set_ylabel("mean delay, arrival to answer (s)")
        for ax in (ax_t, ax_d):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{dataset}: load")
        written.append(_save(fig, directory / "load.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


# -- rendering ---------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _sys(name: str | None) -> str:
    if name is None:
        return "-"
    return f"fixed {name[len(FIXED_PREFIX) :]}" if name.startswith(FIXED_PREFIX) else name


def _signed(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, "+" + fmt)


def ratio_lines(ratios_: Mapping[str, Any]) -> list[str]:
    """The ratios of one phase in words, one line each."""
    p = ratios_.get("primary") or "quality"
    lines: list[str] = []
    a = ratios_.get("delay_ratio_vs_fixed_equal_quality") or {}
    if a.get("value") is not None:
        lines.append(
            f"ragctl mean delay {_f(a['ragctl_delay_s'])} s vs {_sys(a['config'])} at "
            f"equal-or-better {p} ({_f(a['fixed_quality'], '.3f')} >= "
            f"{_f(a['ragctl_quality'], '.3f')}) {_f(a['fixed_delay_s'])} s: "
            f"{_f(a['value'])}× (fixed / ragctl)"
        )
    else:
        lines.append(f"vs fixed at equal-or-better {p}: {a.get('reason') or 'n/a'}")
    for name in BASELINES:
        b = ratios_.get(f"delay_ratio_vs_{name}") or {}
        if b.get("value") is None:
            lines.append(f"vs {name}: {b.get('reason') or 'n/a'}")
            continue
        lines.append(
            f"{name} mean delay {_f(b['other_delay_s'])} s vs ragctl {_f(b['ragctl_delay_s'])} "
            f"s: {_f(b['value'])}×; {p} ragctl {_f(b['ragctl_quality'], '.3f')} vs "
            f"{_f(b['other_quality'], '.3f')} ({_signed(b['quality_diff'])}, "
            f"{_signed(b['quality_diff_pct'], '.1f')}%)"
        )
    d = ratios_.get("quality_vs_fixed_similar_delay") or {}
    if d.get("value") is not None:
        lines.append(
            f"at similar delay, {_sys(d['config'])} ({_f(d['fixed_delay_s'])} s vs ragctl "
            f"{_f(d['ragctl_delay_s'])} s): {p} ragctl {_f(d['ragctl_quality'], '.3f')} vs "
            f"{_f(d['fixed_quality'], '.3f')}: {_signed(d['value'])} "
            f"({_signed(d['quality_diff_pct'], '.1f')}%)"
        )
    else:
        lines.append(f"vs fixed at similar delay: {d.get('reason') or 'n/a'}")
    e = ratios_.get("oracle_gap") or {}
    if e.get("value") is not None:
        side = "below" if e["value"] >= 0 else "above"
        gap_pct = None if e["gap_pct"] is None else abs(e["gap_pct"])
        lines.append(
            f"oracle {p} {_f(e['oracle_quality'], '.3f')} at {_f(e['oracle_delay_s'])} s: "
            f"ragctl {_f(e['ragctl_quality'], '.3f')} is {_f(abs(e['value']), '.3f')} {side} "
            f"it ({_f(gap_pct, '.1f')}% of the oracle's); delay oracle / ragctl "
            f"{_f(e['delay_ratio'])}×"
        )
    else:
        lines.append(f"vs oracle: {e.get('reason') or 'n/a'}")
    o = ratios_.get("profiler_overhead") or {}
    if o.get("value") is not None:
        lines.append(f"profiler overhead: {o['value']:.1%} of ragctl's delay")
    else:
        lines.append(f"profiler overhead: {o.get('reason') or 'n/a'}")
    return lines


def render_report(summary: Mapping[str, Any], console: Console) -> None:
    """Print, per phase, a table of the systems and the oracle (primary quality, evidence
    recall, mean/p50/p95 delay, throughput, profiler overhead, errors, top configuration) and
    the ratios in words."""
    primary = summary.get("primary") or "quality"
    meta = summary.get("meta") or {}
    head = f"[bold]{summary.get('dataset') or 'evaluation'}[/bold]: primary metric {primary}"
    if meta.get("model"):
        head += f", model {meta['model']}"
    console.print(head)
    entries = summary.get("rates") or {}
    if not entries:
        console.print("no samples")
        return
    for entry in entries.values():
        table = Table(title=phase_title(entry), title_justify="left")
        table.add_column("system", no_wrap=True)
        for col in ("n", "errors", primary, "evid. recall", "mean s", "p50 s", "p95 s", "q/s",
                    "profiler"):  # fmt: skip
            table.add_column(col, justify="right")
        table.add_column("top config", no_wrap=True)
        for name, s in _with_oracle(entry).items():
            top = s.get("top_config")
            share = ""
            if top is not None and s.get("answered"):
                share = f" ({(s.get('configs') or {}).get(top, 0) / s['answered']:.0%})"
            table.add_row(
                name,
                str(s.get("n", "-")),
                str(s.get("errors", "-")),
                _f(s.get("primary_value"), ".3f"),
                _f((s.get("quality") or {}).get("evidence_recall"), ".3f"),
                _f(s.get("delay_mean_s")),
                _f(s.get("delay_p50_s")),
                _f(s.get("delay_p95_s")),
                _f(s.get("throughput_qps"), ".3f"),
                "-" if s.get("profiler_overhead") is None else f"{s['profiler_overhead']:.1%}",
                f"{top or '-'}{share}",
                style="bold" if name == RAGCTL else ("dim" if name == ORACLE else None),
            )
        console.print(table)
        orc = entry.get("oracle")
        if orc is not None and orc.get("queries_excluded"):
            console.print(
                f"oracle over {orc['n']} queries; {orc['queries_excluded']} left out (not "
                "answered by every fixed configuration)",
                highlight=False,
            )
        for line in ratio_lines(entry.get("ratios") or ratios(entry)):
            console.print(f"  {line}", highlight=False, markup=False)
        for line in slo_lines(entry):
            console.print(f"  {line}", highlight=False, markup=False)


def slo_lines(entry: Mapping[str, Any]) -> list[str]:
    """One line per system that carried an SLO."""
    lines = []
    for name, s in (entry.get("systems") or {}).items():
        slo = s.get("slo")
        if not slo:
            continue
        actions = ", ".join(f"{k} {v}" for k, v in (slo.get("plan_actions") or {}).items())
        lines.append(
            f"SLO {name}: {slo['met']}/{slo['requests']} met within {slo['slo_ms']:.0f} ms "
            f"(violations {slo['violation_rate']:.0%}), flagged {slo['flagged']}, boosted calls "
            f"{slo['boosted_calls']}, paused {_f(slo.get('paused_mean_ms'), '.0f')} ms on "
            f"average" + (f"; planning: {actions}" if actions else "")
        )
    return lines


def report_dir(directory: str | Path, console: Console) -> dict[str, Any]:
    """Render a run's report: `results.json` when present, else recomputed from
    `samples.jsonl`. Returns the summary rendered."""
    directory = Path(directory)
    results = directory / RESULTS_FILE
    if results.exists():
        summary: dict[str, Any] = json.loads(results.read_text(encoding="utf-8"))
    elif (directory / SAMPLES_FILE).exists():
        summary = summarize(load_samples(directory / SAMPLES_FILE))
    else:
        raise FileNotFoundError(f"{directory} holds neither {RESULTS_FILE} nor {SAMPLES_FILE}")
    render_report(summary, console)
    return summary
