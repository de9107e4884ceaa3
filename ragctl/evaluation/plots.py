"""A run's figures (matplotlib, needs the `eval` extra; rendered with Agg)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragctl.evaluation.summaries import Evaluation, Phase, Row, failed, finite, phase_key
from ragctl.evaluation.systems import FIXED_PREFIX, ORACLE, RAGCTL, system_order

if TYPE_CHECKING:
    from ragctl.evaluation.grid import FrontierPoint


def write_plots(directory: str | Path, rows: Sequence[Row], evaluation: Evaluation) -> list[Path]:
    """Write `quality_vs_delay.png` (primary quality against mean delay, one labelled point per
    system and the oracle, a panel per phase: the METIS paper's Fig. 10 view), `delay_cdf.png`
    (CDF of answered rows' delay_s per system, a panel per phase) and, with two or more arrival
    rates, `load.png` (throughput and mean delay against the arrival rate, a line per system).
    Returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not evaluation.phases:
        return []
    colors = _colors(n for p in evaluation.phases.values() for n in p.with_oracle())
    primary = evaluation.primary or "quality"
    dataset = evaluation.dataset or "run"
    written = [
        _quality_vs_delay(evaluation, colors, primary, dataset, directory / "quality_vs_delay.png"),
        _delay_cdf(rows, evaluation, colors, dataset, directory / "delay_cdf.png"),
    ]
    rated = [p for p in evaluation.phases.values() if p.rate is not None]
    if len(rated) >= 2:
        written.append(_load(rated, colors, dataset, directory / "load.png"))
    return written


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    ordered = sorted(set(names) - {ORACLE}, key=system_order)
    out = {name: cmap(i % 10) for i, name in enumerate(ordered)}
    out[ORACLE] = "black"
    return out


def _panels(n: int) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # Figure renders with Agg, no pyplot state

    fig = Figure(figsize=(5.2 * n, 4.4), layout="constrained")
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


def _quality_vs_delay(
    evaluation: Evaluation, colors: dict[str, Any], primary: str, dataset: str, path: Path
) -> Path:
    fig, axes = _panels(len(evaluation.phases))
    for ax, phase in zip(axes, evaluation.phases.values(), strict=True):
        for name, s in phase.with_oracle().items():
            x, y = s.delay_mean_s, s.primary_value
            if x is None or y is None:
                continue
            marker = "*" if name == ORACLE else ("D" if name == RAGCTL else "o")
            size = 160 if name in (ORACLE, RAGCTL) else 60
            ax.scatter([x], [y], color=colors[name], marker=marker, s=size, zorder=3)
            label = name.removeprefix(FIXED_PREFIX)
            offset = (5, -12) if name == ORACLE else (5, 4)  # an oracle often sits on a fixed one
            ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
        ax.set_title(phase.title)
        ax.set_xlabel("mean delay, arrival to answer (s)")
        ax.set_ylabel(f"{primary} (mean, 0-1)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{dataset}: quality vs mean delay (diamond: ragctl, star: oracle)")
    return _save(fig, path)


def _delay_cdf(
    rows: Sequence[Row], evaluation: Evaluation, colors: dict[str, Any], dataset: str, path: Path
) -> Path:
    fig, axes = _panels(len(evaluation.phases))
    for ax, (key, phase) in zip(axes, evaluation.phases.items(), strict=True):
        delays: dict[str, list[float]] = {}
        for r in rows:
            if phase_key(r.get("rate"), r.get("concurrency")) != key or failed(r):
                continue
            value = finite(r.get("delay_s"))
            if value is not None:
                delays.setdefault(str(r.get("system")), []).append(value)
        for name in sorted(delays, key=system_order):
            xs = sorted(delays[name])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step([xs[0], *xs], [0.0, *ys], where="post", color=colors.get(name), label=name)
        ax.set_title(phase.title)
        ax.set_xlabel("delay, arrival to answer (s)")
        ax.set_ylabel("fraction of answered queries")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if delays:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{dataset}: delay CDF per system")
    return _save(fig, path)


def _load(rated: Sequence[Phase], colors: dict[str, Any], dataset: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_t, ax_d = fig.subplots(1, 2)
    for name in sorted({n for p in rated for n in p.systems}, key=system_order):
        pts = [(float(p.rate), p.systems[name]) for p in rated if name in p.systems]  # type: ignore[arg-type]
        pts.sort(key=lambda pt: pt[0])
        tp = [(r, s.throughput_qps) for r, s in pts if s.throughput_qps is not None]
        dl = [(r, s.delay_mean_s) for r, s in pts if s.delay_mean_s is not None]
        if tp:
            ax_t.plot(*zip(*tp, strict=True), marker="o", color=colors[name], label=name)
        if dl:
            ax_d.plot(*zip(*dl, strict=True), marker="o", color=colors[name], label=name)
    top = max(float(p.rate) for p in rated)  # type: ignore[arg-type]
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
    return _save(fig, path)


def write_frontier_plot(
    path: Path,
    points: Sequence[FrontierPoint],
    systems: Sequence[FrontierPoint],
    dataset: str,
    primary: str,
) -> Path:
    """`frontier.png`: the grid's configurations (grey, the quality–cost frontier as a line)
    and the replayed systems on it; quality against solo delay and against prompt tokens."""
    fig, axes = _panels(2)
    colors = _colors(p.name for p in systems)
    for ax, attr, label in (
        (axes[0], "delay_s", "solo delay, mean (s)"),
        (axes[1], "prompt_tokens", "prompt tokens per query, mean"),
    ):
        grid = [(getattr(p, attr), p.quality, p) for p in points
                if getattr(p, attr) is not None and p.quality is not None]  # fmt: skip
        for x, y, p in grid:
            ax.scatter([x], [y], color="grey", s=25, zorder=2)
            ax.annotate(p.name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color="grey")  # fmt: skip
        # The frontier of this panel's cost: best quality so far, cheapest first.
        best, line = -1.0, []
        for x, y, _ in sorted(grid, key=lambda t: (t[0], -t[1])):
            if y > best:
                best = y
                line.append((x, y))
        if line:
            ax.step(*zip(*line, strict=True), where="post", color="grey", linestyle="--",
                    label="grid frontier")  # fmt: skip
        for s in systems:
            x, y = getattr(s, attr), s.quality
            if x is None or y is None:
                continue
            marker = "*" if s.name == ORACLE else ("D" if s.name == RAGCTL else "o")
            ax.scatter([x], [y], color=colors[s.name], marker=marker, s=120, zorder=3,
                       label=s.name)  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel(f"{primary} (mean, 0-1)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")  # cheap, good configurations crowd the top left
    fig.suptitle(f"{dataset}: the grid's quality-cost frontier and the systems on it (replay)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)
