"""The `ragctl allocate` pipeline without its terminal: choose what to measure (`Inputs`), and
from the measurements fit, solve and write the plan, `<stem>.curves.json` and `<stem>.png`
(`finish`). The measuring in between is `profile.profile_components` on an open controller."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragctl.allocation.curves import CPU_COMPONENTS, ENGINE_COMPONENTS, Curve
from ragctl.errors import InvalidRequest, MissingDependency
from ragctl.settings import Settings


@dataclass
class Inputs:
    """What to measure: batch sizes, thread counts and the questions, plus notes for the plan."""

    sizes: list[int]
    engine_sizes: list[int]
    cpus: int
    cpu_budget: int
    pool: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def threads(self) -> list[int]:
        return list(range(1, self.cpu_budget + 1))


@dataclass
class Outcome:
    solution: Any
    doc: dict[str, Any]
    curves: list[Curve]
    visits: dict[str, float]
    notes: list[str]
    curves_file: Path
    png: Path


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def inputs(
    settings: Settings,
    dataset: str,
    *,
    sizes: list[int],
    engine_sizes: list[int],
    engines: int,
    sample: int,
    cpu_threads: int | None,
    seed: int,
) -> Inputs:
    from ragctl.retrieval.collection import load_queries

    notes: list[str] = []
    if settings.max_num_seqs is not None and engine_sizes[-1] > settings.max_num_seqs:
        notes.append(
            f"engine batch sizes above the engine's max_num_seqs {settings.max_num_seqs} dropped"
        )
        engine_sizes = [b for b in engine_sizes if b <= settings.max_num_seqs] or [
            settings.max_num_seqs
        ]
    cpus = cpu_count()
    budget = cpu_threads or cpus
    if budget < len(CPU_COMPONENTS):
        notes.append(f"CPU thread budget raised to {len(CPU_COMPONENTS)}: one per CPU component")
        budget = len(CPU_COMPONENTS)
    if engines > 1:
        notes.append(
            f"planned for {engines} engines; profiling measured the one engine and assumes "
            "every engine is like it"
        )
    queries = [q.question for q in load_queries(settings.data_dir, dataset)]
    if not queries:
        raise InvalidRequest(f"dataset {dataset} has no queries")
    random.Random(seed).shuffle(queries)
    pool = queries[: max(sample, sizes[-1], engine_sizes[-1])]
    return Inputs(sizes, engine_sizes, cpus, budget, pool, notes)


def finish(
    settings: Settings,
    dataset: str,
    given: Inputs,
    measured: Any,
    *,
    out_file: Path,
    engines: int,
    latency_cap_ms: float | None,
) -> Outcome:
    """Fit, solve, and write the plan, the curves file and the plot beside it."""
    from ragctl.allocation.milp import problem_from_curves, solve
    from ragctl.allocation.plan import write_plan

    notes = [*given.notes, *measured.notes]
    curves = measured.curves()
    visits = dict(measured.mix.visits)
    if settings.profiler_url:
        notes.append("the profiler runs at --profiler-url: its calls do not load this engine")
        visits["profile"] = 0.0
    esizes = given.engine_sizes
    problem = problem_from_curves(
        curves,
        visits,
        cpu_threads=given.cpu_budget,
        engines=engines,
        engine_batch_sizes=esizes,
        latency_cap_s=latency_cap_ms / 1000 if latency_cap_ms is not None else None,
    )
    solution = solve(problem)
    urls = settings.engine_urls()
    for url, e in zip(urls, solution.engines, strict=False):
        if url != "local":
            notes.append(
                f"max_num_seqs applies to an in-process engine; start the vLLM server at "
                f"{url} with --max-num-seqs {e.max_num_seqs}"
            )
    if urls and not solution.engines:
        notes.append("the engine at --engine-url is not part of the plan")
    for i, e in enumerate(solution.engines):
        if e.components and e.max_num_seqs == esizes[-1] and e.busy > 0.99:
            notes.append(
                f"engine{i}'s max_num_seqs {e.max_num_seqs} is the largest size measured; larger "
                "ones may do better (--engine-batch-sizes)"
            )
    machine = {
        "cpu_count": given.cpus,
        "cpu_threads": given.cpu_budget,
        "model": settings.model or "embedded SmolLM2-135M-Instruct",
        "engine": settings.engine_url or "in-process",
        "engines": engines,
        "embedder": settings.embedder,
        "dataset": dataset,
    }
    doc = write_plan(
        out_file,
        solution=solution,
        curves=curves,
        visits=visits,
        presence=measured.mix.presence,
        machine=machine,
        mix={k: v for k, v in measured.mix.to_dict().items() if k not in ("visits", "presence")},
        notes=notes,
    )
    stem = out_file.with_suffix("")
    curves_file = stem.with_name(stem.name + ".curves.json")
    png = stem.with_name(stem.name + ".png")
    curves_file.write_text(
        json.dumps(
            {
                "dataset": dataset,
                "machine": machine,
                "curves": [c.to_dict() for c in curves],
                "measurements": measured.raw(),
                "mix": measured.mix.to_dict(),
                "seconds": measured.seconds,
                "solution": solution.to_dict(),
            },
            indent=2,
        )
        + "\n"
    )
    plot_curves(curves, png)
    return Outcome(solution, doc, curves, visits, notes, curves_file, png)


def component_order(c: Curve) -> tuple[int, int]:
    """CPU components, then engine components, each by thread count."""
    return (_rank(c.component), c.threads or 0)


def _rank(component: str) -> int:
    names = (*CPU_COMPONENTS, *ENGINE_COMPONENTS)
    return names.index(component) if component in names else len(names)


def plot_curves(curves: list[Curve], path: Path) -> None:
    """Measured points and fitted lines, one subplot per component (a line per thread count)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependency(
            f"the plot needs matplotlib: pip install 'ragctl[eval]' ({e})"
        ) from e
    import numpy as np

    names = sorted({c.component for c in curves}, key=_rank)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for c in sorted((c for c in curves if c.component == name), key=component_order):
            xs = [b for b, _ in c.points]
            grid = np.linspace(min(xs), max(xs), 100)
            label = "measured" if c.threads is None else f"{c.threads} thread(s)"
            line = ax.plot(grid, [c.predict(x) * 1000 for x in grid], "-", alpha=0.7)[0]
            ax.plot(xs, [s * 1000 for _, s in c.points], "o", color=line.get_color(), label=label)
        ax.set_title(name)
        ticks = sorted({b for c in curves if c.component == name for b in c.batch_sizes})
        ax.set_xticks(
            ticks, [str(b) if ticks[-1] <= 8 or b == ticks[0] or b >= 4 else "" for b in ticks]
        )
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per batch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("latency vs batch size: points measured, lines fitted (piecewise linear)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
