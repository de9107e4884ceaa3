"""`ragctl allocate`: profile this machine, solve for the throughput-maximising allocation, write
the plan file (plus `<stem>.curves.json` and `<stem>.png` beside it); the work is
`ragctl.allocation.run`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ragctl.allocation.curves import Curve
from ragctl.allocation.run import component_order
from ragctl.cli.common import DATASET_FLAGS, err, open_controller, out
from ragctl.errors import InvalidRequest
from ragctl.settings import Settings


def allocate(
    ctx: typer.Context,
    dataset: str = typer.Option(..., *DATASET_FLAGS, help="Dataset whose questions to use."),
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
    from ragctl.allocation import run
    from ragctl.allocation.profile import profile_components
    from ragctl.retrieval.collection import check_dataset

    settings: Settings = ctx.obj
    started = time.perf_counter()
    check_dataset(settings.data_dir, dataset)
    given = run.inputs(
        settings, dataset, sizes=_sizes(batch_sizes, "--batch-sizes"),
        engine_sizes=_sizes(engine_batch_sizes, "--engine-batch-sizes"), engines=engines,
        sample=sample, cpu_threads=cpu_threads, seed=seed,
    )  # fmt: skip

    async def measure() -> Any:
        controller = await open_controller(settings, dataset)
        try:
            with err.status("profiling") as status:
                return await profile_components(
                    controller, given.pool, sample=sample, batch_sizes=given.sizes,
                    engine_batch_sizes=given.engine_sizes, threads=given.threads,
                    repeats=repeats, engine_repeats=engine_repeats,
                    status=lambda text: status.update(f"profiling: {text}"),
                )  # fmt: skip
        finally:
            await controller.aclose()

    measured = asyncio.run(measure())
    done = run.finish(
        settings, dataset, given, measured, out_file=out_file, engines=engines,
        latency_cap_ms=latency_cap_ms,
    )  # fmt: skip
    solution, doc = done.solution, done.doc
    _print_curves(done.curves)
    _print_mix(measured.mix, done.visits)
    _print_solution(solution, doc)
    for note in done.notes:
        out.print(f"[dim]note: {note}[/dim]", highlight=False)
    out.print(
        f"[bold]predicted throughput {solution.throughput_qps:.4g} queries/s[/bold] "
        f"(bottleneck {solution.bottleneck}, {solution.bottleneck_resource}; sized for "
        f"{doc['concurrency']} queries in flight, ~{doc['predicted_latency_s']:.3g} s each)",
        highlight=False,
    )
    out.print(
        f"plan {out_file}, curves {done.curves_file}, plot {done.png} "
        f"({time.perf_counter() - started:.0f} s in all)",
        highlight=False,
    )


def _sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise InvalidRequest(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise InvalidRequest(f"{flag} takes batch sizes >= 1, got {text!r}")
    return sizes


def _s(x: float) -> str:
    return f"{x * 1000:.3g} ms" if x < 1 else f"{x:.3g} s"


def _print_curves(curves: list[Curve]) -> None:
    table = Table(title="latency per batch", title_justify="left")
    for col in ("component", "threads", "batch", "measured", "fitted", "fit"):
        table.add_column(col, justify="left" if col in ("component", "fit") else "right")
    for c in sorted(curves, key=component_order):
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
