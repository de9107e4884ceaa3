"""A run's report as rich tables, and the ratios and SLO figures in words."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ragctl.evaluation.ratios import Ratios
from ragctl.evaluation.summaries import Evaluation, Phase
from ragctl.evaluation.systems import BASELINES, FIXED_PREFIX, ORACLE, RAGCTL

COLUMNS = ("n", "errors", None, "evid. recall", "mean s", "p50 s", "p95 s", "q/s", "profiler")
"""The numeric columns of a phase's table (None: the primary metric's)."""


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _q(value: float | None) -> str:
    return _f(value, ".3f")


def _signed(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, "+" + fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _sys(name: str | None) -> str:
    if name is None:
        return "-"
    return f"fixed {name.removeprefix(FIXED_PREFIX)}" if name.startswith(FIXED_PREFIX) else name


def ratio_lines(r: Ratios) -> list[str]:
    """The ratios of one phase in words, one line each."""
    p = r.primary or "quality"
    lines: list[str] = []
    a = r.delay_ratio_vs_fixed_equal_quality
    if a.value is not None:
        lines.append(
            f"ragctl mean delay {_f(a.ragctl_delay_s)} s vs {_sys(a.config)} at equal-or-better "
            f"{p} ({_q(a.fixed_quality)} >= {_q(a.ragctl_quality)}) {_f(a.fixed_delay_s)} s: "
            f"{_f(a.value)}× (fixed / ragctl)"
        )
    else:
        lines.append(f"vs fixed at equal-or-better {p}: {a.reason or 'n/a'}")
    for name in BASELINES:
        b = r.vs(name)
        if b.value is None:
            lines.append(f"vs {name}: {b.reason or 'n/a'}")
            continue
        lines.append(
            f"{name} mean delay {_f(b.other_delay_s)} s vs ragctl {_f(b.ragctl_delay_s)} s: "
            f"{_f(b.value)}×; {p} ragctl {_q(b.ragctl_quality)} vs {_q(b.other_quality)} "
            f"({_signed(b.quality_diff)}, {_signed(b.quality_diff_pct, '.1f')}%)"
        )
    d = r.quality_vs_fixed_similar_delay
    if d.value is not None:
        lines.append(
            f"at similar delay, {_sys(d.config)} ({_f(d.fixed_delay_s)} s vs ragctl "
            f"{_f(d.ragctl_delay_s)} s): {p} ragctl {_q(d.ragctl_quality)} vs "
            f"{_q(d.fixed_quality)}: {_signed(d.value)} ({_signed(d.quality_diff_pct, '.1f')}%)"
        )
    else:
        lines.append(f"vs fixed at similar delay: {d.reason or 'n/a'}")
    e = r.oracle_gap
    if e.value is not None:
        side = "below" if e.value >= 0 else "above"
        gap_pct = None if e.gap_pct is None else abs(e.gap_pct)
        lines.append(
            f"oracle {p} {_q(e.oracle_quality)} at {_f(e.oracle_delay_s)} s: ragctl "
            f"{_q(e.ragctl_quality)} is {_q(abs(e.value))} {side} it ({_f(gap_pct, '.1f')}% "
            f"of the oracle's); delay oracle / ragctl {_f(e.delay_ratio)}×"
        )
    else:
        lines.append(f"vs oracle: {e.reason or 'n/a'}")
    o = r.profiler_overhead
    if o.value is not None:
        lines.append(f"profiler overhead: {o.value:.1%} of ragctl's delay")
    else:
        lines.append(f"profiler overhead: {o.reason or 'n/a'}")
    return lines


def slo_lines(phase: Phase) -> list[str]:
    """One line per system that carried an SLO."""
    lines = []
    for name, s in phase.systems.items():
        slo = s.slo
        if not slo:
            continue
        actions = ", ".join(f"{k} {v}" for k, v in (slo.plan_actions or {}).items())
        lines.append(
            f"SLO {name}: {slo.met}/{slo.requests} met within {slo.slo_ms:.0f} ms "
            f"(violations {slo.violation_rate:.0%}), flagged {slo.flagged}, boosted calls "
            f"{slo.boosted_calls}, paused {_f(slo.paused_mean_ms, '.0f')} ms on "
            f"average" + (f"; planning: {actions}" if actions else "")
        )
    return lines


def phase_table(phase: Phase, primary: str) -> Table:
    """The systems and the oracle: primary quality, evidence recall, mean/p50/p95 delay,
    throughput, profiler overhead, errors, top configuration (and its share)."""
    table = Table(title=phase.title, title_justify="left")
    table.add_column("system", no_wrap=True)
    for col in COLUMNS:
        table.add_column(col or primary, justify="right")
    table.add_column("top config", no_wrap=True)
    for name, s in phase.with_oracle().items():
        share = "" if s.top_share is None else f" ({s.top_share:.0%})"
        table.add_row(
            name,
            "-" if s.n is None else str(s.n),
            "-" if s.errors is None else str(s.errors),
            _q(s.primary_value),
            _q(s.evidence_recall),
            _f(s.delay_mean_s),
            _f(s.delay_p50_s),
            _f(s.delay_p95_s),
            _q(s.throughput_qps),
            _pct(s.profiler_overhead),
            f"{s.top_config or '-'}{share}",
            style="bold" if name == RAGCTL else ("dim" if name == ORACLE else None),
        )
    return table


def render_report(evaluation: Evaluation, console: Console) -> None:
    """Print, per phase, the table of the systems and the oracle and the ratios in words."""
    primary = evaluation.primary or "quality"
    head = f"[bold]{evaluation.dataset or 'evaluation'}[/bold]: primary metric {primary}"
    if evaluation.meta.get("model"):
        head += f", model {evaluation.meta['model']}"
    console.print(head)
    if not evaluation.phases:
        console.print("no samples")
        return
    for phase in evaluation.phases.values():
        console.print(phase_table(phase, primary))
        orc = phase.oracle
        if orc is not None and orc.queries_excluded:
            console.print(
                f"oracle over {orc.n} queries; {orc.queries_excluded} left out (not answered "
                "by every fixed configuration)",
                highlight=False,
            )
        for line in [*ratio_lines(phase.ratios), *slo_lines(phase)]:
            console.print(f"  {line}", highlight=False, markup=False)
