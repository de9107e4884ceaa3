"""`ragctl allocate`: profile this machine, solve for the throughput-maximising allocation, write
the plan file (plus `<stem>.curves.json` and `<stem>.png` beside it)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ragctl.allocation.curves import CPU_COMPONENTS, ENGINE_COMPONENTS, Curve
from ragctl.allocation.plan import PlanFile, load_plan
from ragctl.errors import InvalidRequest, MissingDependency
from ragctl.settings import Settings

out = Console()
err = Console(stderr=True)


def load_plan_option(path: Path | None, dataset: str) -> PlanFile | None:
    """`--plan` of `serve` and `eval run`: the checked plan, its warnings printed (None
    without the option)."""
    if path is None:
        return None
    plan = load_plan(path)
    for line in plan.warnings(cpu_count=os.cpu_count(), dataset=dataset):
        err.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    return plan


def _sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise InvalidRequest(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise InvalidRequest(f"{flag} takes batch sizes >= 1, got {text!r}")
    return sizes


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def allocate(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset whose questions to use."),
    out_file: Path = typer.Option(..., "--out", help="The plan file to write (YAML)."),
    sample: int = typer.Option(
        4, min=1, help="Real questions run adaptively to learn the query mix (calls per query)."
    ),
    batch_sizes: str = typer.Option(
        "1,2,4,8,16,32", help="Batch sizes measured for query embedding and FAISS search."
    ),
    engine_batch_sizes: str = typer.Option(
        "1,2,4,8", help="Engine calls measured at once (candidate max concurrent sequences)."
    ),
    engines: int = typer.Option(
        1,
        min=1,
        help="Engines the plan is for (>1: the profiler may get its own engine). Profiling "
        "measures the one engine and assumes the others are like it.",
    ),
    latency_cap_ms: float | None = typer.Option(
        None, min=0.001, help="Longest a batch (CPU) or a batch of engine calls may take."
    ),
    cpu_threads: int | None = typer.Option(
        None, min=1, help="CPU threads embedding and search may use together. Default: the CPUs."
    ),
    repeats: int = typer.Option(3, min=1, help="Timings per point for embedding and search."),
    engine_repeats: int = typer.Option(1, min=1, help="Timings per point for engine calls."),
    seed: int = typer.Option(0, help="Which questions are used."),
) -> None:
    """Profile each component's latency against batch size on this machine, fit
    piecewise-linear curves, and solve a MILP for the batch sizes, threads and engine
    concurrency that maximise throughput. Writes the plan (`serve --plan` / `eval run --plan`
    apply it), `<stem>.curves.json` and `<stem>.png`."""
    from ragctl.allocation.milp import problem_from_curves, solve
    from ragctl.allocation.plan import write_plan
    from ragctl.retrieval.collection import check_dataset, load_queries

    settings: Settings = ctx.obj
    started = time.perf_counter()
    check_dataset(settings.data_dir, dataset)
    sizes = _sizes(batch_sizes, "--batch-sizes")
    esizes = _sizes(engine_batch_sizes, "--engine-batch-sizes")
    notes: list[str] = []
    if settings.max_num_seqs is not None and esizes[-1] > settings.max_num_seqs:
        notes.append(
            f"engine batch sizes above the engine's max_num_seqs {settings.max_num_seqs} dropped"
        )
        esizes = [b for b in esizes if b <= settings.max_num_seqs] or [settings.max_num_seqs]
    cpus = _cpu_count()
    budget = cpu_threads or cpus
    if budget < len(CPU_COMPONENTS):
        notes.append(f"CPU thread budget raised to {len(CPU_COMPONENTS)}: one per CPU component")
        budget = len(CPU_COMPONENTS)
    threads = list(range(1, budget + 1))
    if engines > 1:
        notes.append(
            f"planned for {engines} engines; profiling measured the one engine and assumes "
            "every engine is like it"
        )
    queries = [q.question for q in load_queries(settings.data_dir, dataset)]
    if not queries:
        raise InvalidRequest(f"dataset {dataset} has no queries")
    random.Random(seed).shuffle(queries)
    pool = queries[: max(sample, sizes[-1], esizes[-1])]

    measured = asyncio.run(
        _measure(settings, dataset, pool, sample, sizes, esizes, threads, repeats, engine_repeats)
    )
    notes.extend(measured.notes)
    curves = measured.curves()
    visits = dict(measured.mix.visits)
    if settings.profiler_url:
        notes.append("the profiler runs at --profiler-url: its calls do not load this engine")
        visits["profile"] = 0.0
    problem = problem_from_curves(
        curves,
        visits,
        cpu_threads=budget,
        engines=engines,
        engine_batch_sizes=esizes,
        latency_cap_s=latency_cap_ms / 1000 if latency_cap_ms is not None else None,
    )
    solution = solve(problem)
    if settings.engine_url:
        notes.append(
            f"max_num_seqs applies to an in-process engine; start the vLLM server at "
            f"{settings.engine_url} with --max-num-seqs {solution.engines[0].max_num_seqs}"
            if solution.engines
            else "the engine at --engine-url is not part of the plan"
        )
    for i, e in enumerate(solution.engines):
        if e.components and e.max_num_seqs == esizes[-1] and e.busy > 0.99:
            notes.append(
                f"engine{i}'s max_num_seqs {e.max_num_seqs} is the largest size measured; larger "
                "ones may do better (--engine-batch-sizes)"
            )
    machine = {
        "cpu_count": cpus,
        "cpu_threads": budget,
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
    _plot(curves, png)

    _print_curves(curves)
    _print_mix(measured.mix, visits)
    _print_solution(solution, doc)
    for note in notes:
        out.print(f"[dim]note: {note}[/dim]", highlight=False)
    out.print(
        f"[bold]predicted throughput {solution.throughput_qps:.4g} queries/s[/bold] "
        f"(bottleneck {solution.bottleneck}, {solution.bottleneck_resource}; sized for "
        f"{doc['concurrency']} queries in flight, ~{doc['predicted_latency_s']:.3g} s each)",
        highlight=False,
    )
    out.print(
        f"plan {out_file}, curves {curves_file}, plot {png} "
        f"({time.perf_counter() - started:.0f} s in all)",
        highlight=False,
    )


async def _measure(
    settings: Settings,
    dataset: str,
    questions: list[str],
    sample: int,
    sizes: list[int],
    esizes: list[int],
    threads: list[int],
    repeats: int,
    engine_repeats: int,
) -> Any:
    from ragctl.allocation.profile import profile_components
    from ragctl.cli import _open_controller

    controller = await _open_controller(settings, dataset)
    try:
        with err.status("profiling") as status:
            return await profile_components(
                controller, questions, sample=sample, batch_sizes=sizes,
                engine_batch_sizes=esizes, threads=threads, repeats=repeats,
                engine_repeats=engine_repeats,
                status=lambda text: status.update(f"profiling: {text}"),
            )  # fmt: skip
    finally:
        await controller.aclose()


def _s(x: float) -> str:
    return f"{x * 1000:.3g} ms" if x < 1 else f"{x:.3g} s"


def _print_curves(curves: list[Curve]) -> None:
    table = Table(title="latency per batch", title_justify="left")
    for col in ("component", "threads", "batch", "measured", "fitted", "fit"):
        table.add_column(col, justify="left" if col in ("component", "fit") else "right")
    for c in sorted(curves, key=_order):
        breaks = ",".join(f"{x:g}" for x, _ in c.fit.knots[1:-1])
        fit = f"{len(c.fit.segments) or 1} seg" + (f", break at {breaks}" if breaks else "")
        fit += f"; max err {c.max_rel_error:.1%}"
        for i, (b, s) in enumerate(c.points):
            first = i == 0
            table.add_row(
                c.component if first else "", "-" if c.threads is None else str(c.threads),
                str(b), _s(s), _s(c.predict(b)), fit if first else "",
                end_section=i == len(c.points) - 1,
            )  # fmt: skip
    out.print(table)


def _rank(component: str) -> int:
    names = (*CPU_COMPONENTS, *ENGINE_COMPONENTS)
    return names.index(component) if component in names else len(names)


def _order(c: Curve) -> tuple[int, int]:
    return (_rank(c.component), c.threads or 0)


def _print_mix(mix: Any, visits: dict[str, float]) -> None:
    configs = ", ".join(f"{k} x{v}" for k, v in sorted(mix.configs.items()))
    per_query = ", ".join(f"{k} {v:.3g}" for k, v in visits.items() if v > 0)
    out.print(f"query mix of {mix.queries} sample questions: {configs}", highlight=False)
    out.print(f"visits per query: {per_query}", highlight=False)


def _print_solution(solution: Any, doc: dict[str, Any]) -> None:
    table = Table(title=f"allocation ({solution.status})", title_justify="left")
    for col in ("component", "runs on", "batch", "threads", "per batch", "busy"):
        table.add_column(col, justify="left" if col in ("component", "runs on") else "right")
    for name, ch in solution.cpu.items():
        table.add_row(name, "cpu", str(ch.batch), str(ch.threads), _s(ch.latency_s),
                      f"{ch.utilisation:.0%}")  # fmt: skip
    for i, e in enumerate(solution.engines):
        for name in e.components:
            table.add_row(
                name, f"engine{i}", str(e.max_num_seqs), "-",
                _s(solution.engine_latency_s[name]), f"{e.shares[name]:.0%} of {e.busy:.0%}",
            )  # fmt: skip
    out.print(table)
    settings = ", ".join(f"{k}={v}" for k, v in doc["settings"].items())
    out.print(f"plan settings: {settings}; concurrency {doc['concurrency']}", highlight=False)


def _plot(curves: list[Curve], path: Path) -> None:
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
        for c in sorted((c for c in curves if c.component == name), key=_order):
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
