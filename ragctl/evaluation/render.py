"""A run's report as rich tables, and the ratios and SLO figures in words.

Each figure is followed by its 95% bootstrap interval and the n behind it (blank for a
`results.json` written before intervals); a comparison whose paired interval excludes no
difference is marked `SIGNIFICANT` (`*`), explained in `FOOTNOTE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ragctl.evaluation.ratios import Ratios, VsBaseline
from ragctl.evaluation.summaries import Evaluation, Phase
from ragctl.evaluation.systems import BASELINES, FIXED_PREFIX, ORACLE, RAGCTL

if TYPE_CHECKING:
    from ragctl.evaluation.grid import FrontierPoint
    from ragctl.evaluation.replay import Agreement
    from ragctl.evaluation.run import GridReport, ReplayReport

COLUMNS = (
    "n", "errors", "answered", None, "evid. recall", "mean s", "p50 s", "p95 s", "TTFT p50 s",
    "q/s", "profiler",
)  # fmt: skip
"""The numeric columns of a phase's table (None: the primary metric's)."""

SIGNIFICANT = "*"
TABLE_NOTE = (
    "under each figure its 95% bootstrap interval over queries; n behind each figure: the "
    "answered queries, or the n=k under it"
)
FOOTNOTE = (
    f"[lo, hi]: 95% paired bootstrap interval over the n queries both systems answered (the "
    f"others left out); {SIGNIFICANT} significant: the interval of the difference excludes 0 "
    "(of a delay ratio, excludes 1)"
)


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _q(value: float | None) -> str:
    return _f(value, ".3f")


def _signed(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, "+" + fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ci(ci: list[float] | None, fmt: str = ".2f", significant: bool | None = None) -> str:
    """` [lo, hi]` (and the marker when significant); blank without an interval."""
    if not ci:
        return ""
    mark = SIGNIFICANT if significant else ""
    return f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]{mark}"


def _pct_ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.1%}, {ci[1]:.1%}]"


def _pairs(n: int | None, left_out: int | None) -> str:
    """`; n=3 paired, 1 left out` (blank in a file without intervals)."""
    if n is None:
        return ""
    return f"; n={n} paired" + (f", {left_out} left out" if left_out else "")


def _cell(
    value: str, ci: list[float] | None, n: int | None, *, answered: int | None, fmt: str = ".2f"
) -> str:
    """The figure, and under it its interval `[lo, hi]` and, when not all answered rows count,
    its n."""
    below = _ci(ci, fmt).strip()
    if n is not None and n != answered:
        below = f"{below} n={n}".strip()
    return f"{value}\n[dim]{escape(below)}[/dim]" if below else value


def _sys(name: str | None) -> str:
    if name is None:
        return "-"
    return f"fixed {name.removeprefix(FIXED_PREFIX)}" if name.startswith(FIXED_PREFIX) else name


def static_line(r: Ratios) -> list[str]:
    """The line against Static* (`ratio_lines`' wording), when the phase ran it."""
    b = r.vs("static")
    return [baseline_line("static", b, r.primary or "quality")] if b.value is not None else []


def baseline_line(name: str, b: VsBaseline, p: str) -> str:
    """One adaptive baseline against ragctl, in words."""
    return (
        f"{name} mean delay {_f(b.other_delay_s)} s vs ragctl {_f(b.ragctl_delay_s)} s: "
        f"{_f(b.value)}×{_ci(b.value_ci, '.2f', b.significant)}; {p} ragctl "
        f"{_q(b.ragctl_quality)} vs {_q(b.other_quality)} ({_signed(b.quality_diff)}"
        f"{_ci(b.quality_diff_ci, '+.3f', b.quality_diff_significant)}, "
        f"{_signed(b.quality_diff_pct, '.1f')}%){_pairs(b.n, b.left_out)}"
    )


def ratio_lines(r: Ratios) -> list[str]:
    """The ratios of one phase in words, one line each."""
    p = r.primary or "quality"
    lines: list[str] = []
    a = r.delay_ratio_vs_fixed_equal_quality
    if a.value is not None:
        lines.append(
            f"ragctl mean delay {_f(a.ragctl_delay_s)} s vs {_sys(a.config)} at equal-or-better "
            f"{p} ({_q(a.fixed_quality)} >= {_q(a.ragctl_quality)}) {_f(a.fixed_delay_s)} s: "
            f"{_f(a.value)}× (fixed / ragctl){_ci(a.value_ci, '.2f', a.significant)}"
            f"{_pairs(a.n, a.left_out)}"
        )
    else:
        lines.append(f"vs fixed at equal-or-better {p}: {a.reason or 'n/a'}")
    for name in BASELINES:
        b = r.vs(name)
        if b.value is None:
            lines.append(f"vs {name}: {b.reason or 'n/a'}")
            continue
        lines.append(baseline_line(name, b, p))
    d = r.quality_vs_fixed_similar_delay
    if d.value is not None:
        lines.append(
            f"at similar delay, {_sys(d.config)} ({_f(d.fixed_delay_s)} s vs ragctl "
            f"{_f(d.ragctl_delay_s)} s): {p} ragctl {_q(d.ragctl_quality)} vs "
            f"{_q(d.fixed_quality)}: {_signed(d.value)}{_ci(d.value_ci, '+.3f', d.significant)} "
            f"({_signed(d.quality_diff_pct, '.1f')}%)"
            + (
                ""
                if d.delay_ratio_ci is None
                else f"; delay fixed / ragctl {_f(d.delay_ratio)}×"
                f"{_ci(d.delay_ratio_ci, '.2f', d.delay_ratio_significant)}"
            )
            + _pairs(d.n, d.left_out)
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
            f"of the oracle's)"
            + ("" if e.value_ci is None else f"; gap{_ci(e.value_ci, '+.3f', e.significant)}")
            + f"; delay oracle / ragctl {_f(e.delay_ratio)}×"
            f"{_ci(e.delay_ratio_ci, '.2f', e.delay_ratio_significant)}{_pairs(e.n, e.left_out)}"
        )
    else:
        lines.append(f"vs oracle: {e.reason or 'n/a'}")
    o = r.profiler_overhead
    if o.value is not None:
        lines.append(
            f"profiler overhead: {o.value:.1%} of ragctl's delay{_pct_ci(o.value_ci)}"
            + ("" if o.n is None else f", n={o.n}")
        )
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
            f"{slo.boosted_calls}, demoted calls {slo.demoted_calls or 0}, paused "
            f"{_f(slo.paused_mean_ms, '.0f')} ms, held {_f(slo.held_mean_ms, '.0f')} ms on average"
            + (f"; planning: {actions}" if actions else "")
        )
    return lines


def phase_table(phase: Phase, primary: str) -> Table:
    """The systems and the oracle: primary quality, evidence recall, mean/p50/p95 delay,
    throughput, profiler overhead, errors, top configuration (and its share)."""
    table = Table(title=phase.title, title_justify="left")
    table.add_column("system", no_wrap=True)
    for col in COLUMNS:
        # a figure with an interval: wide enough for half of it (`[0.40,`), wraps, never cuts
        wide = {"n": None, "errors": None, "q/s": None, "answered": 8}.get(col or primary, 6)
        table.add_column(col or primary, justify="right", min_width=wide)
    table.add_column("top config", overflow="fold")
    for name, s in phase.with_oracle().items():
        share = "" if s.top_share is None else f" ({s.top_share:.0%})"
        quality_n = s.quality_n or {}
        overhead = _pct(s.profiler_overhead)
        if s.profiler_overhead_ci:
            lo, hi = s.profiler_overhead_ci
            overhead = f"{overhead}\n[dim]\\[{lo:.1%}, {hi:.1%}][/dim]"
        answered = s.answered
        cell = partial(_cell, answered=answered)
        table.add_row(
            name,
            "-" if s.n is None else str(s.n),
            "-" if s.errors is None else str(s.errors),
            "-" if answered is None else str(answered),
            cell(_q(s.primary_value), s.primary_value_ci, s.primary_n),
            cell(_q(s.evidence_recall), s.evidence_recall_ci, quality_n.get("evidence_recall")),
            cell(_f(s.delay_mean_s), s.delay_mean_s_ci, s.delay_n),
            cell(_f(s.delay_p50_s), s.delay_p50_s_ci, s.delay_n),
            cell(_f(s.delay_p95_s), s.delay_p95_s_ci, s.delay_n),
            cell(_f(s.ttft_p50_s), s.ttft_p50_s_ci, s.ttft_n),
            _q(s.throughput_qps),
            overhead,
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
        with_intervals = any(s.delay_n is not None for s in phase.systems.values())
        if with_intervals:
            console.print(TABLE_NOTE, style="dim", highlight=False)
        # Each objective against the fixed grid, and against the static choice made ahead.
        variant_lines = [
            f"{name}: {line}"
            for name, r in (phase.variants or {}).items()
            for line in (ratio_lines(r)[0], *static_line(r))
        ]
        for line in [*ratio_lines(phase.ratios), *variant_lines, *slo_lines(phase)]:
            console.print(f"  {line}", highlight=False, markup=False)
        if with_intervals:
            console.print(f"  {FOOTNOTE}", style="dim", highlight=False, markup=False)


def frontier_table(
    points: Sequence[FrontierPoint], systems: Sequence[FrontierPoint], primary: str
) -> Table:
    """The grid's configurations cheapest first (`frontier` marks the Pareto-optimal ones),
    then the systems, each with the solo delay the grid needs for its quality and the ratio of
    that to its own: at least 1.0 is on or above the frontier."""
    from ragctl.evaluation.grid import frontier_delay_at

    table = Table(
        "configuration / system", primary, "solo s", "prompt tokens", "frontier",
        "grid s at this quality", "ratio",
    )  # fmt: skip
    for p in points:
        table.add_row(
            p.name, _q(p.quality), _f(p.delay_s), _f(p.prompt_tokens, ".0f"),
            "yes" if p.on_frontier else "", "", "",
            style=None if p.on_frontier else "dim",
        )  # fmt: skip
    for s in systems:
        at = frontier_delay_at(points, s.quality) if s.quality is not None else None
        ratio = at / s.delay_s if at is not None and s.delay_s else None
        table.add_row(
            escape(_sys(s.name)), _q(s.quality), _f(s.delay_s), _f(s.prompt_tokens, ".0f"), "",
            _f(at), _f(ratio), style="bold" if s.name == RAGCTL else None,
        )  # fmt: skip
    return table


def render_grid(report: GridReport, console: Console) -> None:
    """`eval grid`'s summary: what was built, and the grid over the test queries."""
    console.print(
        f"[bold]{report.dataset}[/bold] grid: {report.queries} queries x {len(report.configs)} "
        f"configurations; {report.built} cells built in {report.seconds:.0f} s, "
        f"{report.reused} reused; in {report.folder}"
    )
    console.print(frontier_table(report.points, [], report.primary))


def render_replay(report: ReplayReport, console: Console) -> None:
    """`eval replay`'s report: the run report of the replayed rows, then the frontier."""
    render_report(report.evaluation, console)
    primary = report.evaluation.primary or "quality"
    console.print(frontier_table(report.points, report.systems, primary))
    for c in report.delay_checks:
        err = "-" if c.median_error is None else f"{c.median_error:.0%}"
        regret = "-" if c.regret is None else f"{c.regret:.2f}x"
        console.print(
            f"{c.system}: delay model on the test queries (each predicted before learning from "
            f"its query), median error {err} over {c.pairs} "
            f"candidates; chose the fastest of those predicted as good in {c.chose_fastest}/"
            f"{c.queries} decisions (chosen / fastest solo delay {regret})",
            highlight=False, markup=False,
        )  # fmt: skip
    noise = report.timing_noise
    if noise.median_gap is not None:
        console.print(
            f"the grid's timing noise: of two cells of one query that did the same work, the "
            f"slower took a median {noise.median_gap:.0%} longer ({noise.pairs} pairs)",
            highlight=False, markup=False,
        )  # fmt: skip
    console.print(
        f"replayed {report.decisions} decisions in {report.seconds:.1f} s (engine start "
        f"included); {report.live_cells} cells answered live and added to the grid; the delay "
        f"models (one per ragctl objective) learned {report.learned} stages from their own "
        f"chosen cells; profiles "
        f"{report.profile_hits} cached, {report.profile_misses} asked. Solo delays on an idle "
        "engine: replay says nothing about load (`eval run` measures that).",
        highlight=False,
    )


def render_agreement(agreements: Sequence[Agreement], console: Console) -> None:
    """`eval agree`: per system, how often replay chose and answered as the live run did."""
    table = Table("system", "n", "same config", "same answer", "live quality", "replay quality")
    for a in agreements:
        table.add_row(
            escape(_sys(a.system)), str(a.n), f"{a.same_config}/{a.n}", f"{a.same_answer}/{a.n}",
            _q(a.live_quality), _q(a.replay_quality),
        )  # fmt: skip
    console.print(table)
    for a in agreements:
        for d in a.disagreements:
            console.print(
                f"  {a.system} {d['query_id']}: live {d['live']} -> {_q(d['live_score'])}, "
                f"replay {d['replay']} -> {_q(d['replay_score'])}",
                highlight=False, markup=False,
            )  # fmt: skip
