"""`ragctl eval ls | run | report | download`."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ragctl.console import progress_bar, stage_callback
from ragctl.errors import InvalidRequest
from ragctl.evaluation.systems import DEFAULT_GRID, DEFAULT_SYSTEMS, DESCRIPTIONS
from ragctl.settings import Settings

eval_app = typer.Typer(help="Evaluate ragctl against fixed configurations and baselines.",
                       no_args_is_help=True)  # fmt: skip
out = Console()
if not out.is_terminal:
    out = Console(width=160)  # a report piped to a file keeps its table columns
err = Console(stderr=True)

RUN_FILE = "run.json"
"""What a run was asked to do (and AdaptiveRAG*'s calibration table): `--resume` checks it."""
RESUME_KEYS = (
    "dataset", "systems", "limit", "calibration", "seed", "rates", "concurrency", "slo_ms",
    "slo_mitigation", "plan",
)  # fmt: skip


@eval_app.command("ls")
def eval_ls(ctx: typer.Context) -> None:
    """The datasets (with their metric and how many queries the data folder has) and systems."""
    from ragctl.evaluation.metrics import primary_metric
    from ragctl.retrieval.collection import dataset_path, list_cards

    settings: Settings = ctx.obj
    table = Table("dataset", "title", "queries", "primary metric", "licence")
    for card in list_cards():
        try:
            with open(dataset_path(settings.data_dir, card.name, "queries")) as f:
                n = str(sum(1 for line in f if line.strip()))
        except Exception:
            n = "no data"
        table.add_row(card.name, card.title, n, primary_metric(card), card.license)
    out.print(table)
    systems = Table("system", "what it is")
    for name, text in DESCRIPTIONS.items():
        systems.add_row(name, text)
    out.print(systems)
    out.print(f"default systems: {DEFAULT_SYSTEMS}", highlight=False)
    out.print(f"default fixed grid: {', '.join(c.label for c in DEFAULT_GRID)}", highlight=False)


@eval_app.command("run")
def eval_run(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset card name."),
    systems: str = typer.Option(DEFAULT_SYSTEMS, help="Comma-separated systems (eval ls)."),
    limit: int = typer.Option(40, min=1, help="Test queries (a seeded sample)."),
    calibration: int = typer.Option(
        10, min=0, help="Calibration queries for adaptiverag (never among the test queries)."
    ),
    rate: str | None = typer.Option(
        None, help="Open loop: Poisson arrivals, queries/s per system; several: 0.02,0.05."
    ),
    concurrency: int | None = typer.Option(None, min=1, help="Closed loop: N jobs in flight."),
    seed: int = typer.Option(0, help="Query sample and arrival times."),
    out_dir: Path = typer.Option(..., "--out", help="Where results, samples and plots go."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    slo_ms: int | None = typer.Option(
        None,
        min=1,
        help="Latency SLO of every query, ms (default: the settings').",
    ),
    slo_mitigation: str | None = typer.Option(
        None,
        help="off, patchwork, adaptive, or a comma list of priority,pause,config.",
    ),
    plan_file: Path | None = typer.Option(
        None,
        "--plan",
        help="An allocation plan (`ragctl allocate`): its batch sizes, threads and engine "
        "sequences apply, and its concurrency when neither --rate nor --concurrency is given.",
    ),
) -> None:
    """Run the systems side by side on one engine and write results.json, samples.jsonl,
    summary.csv and plots to --out."""
    from ragctl.evaluation.systems import parse_systems
    from ragctl.retrieval.collection import check_dataset
    from ragctl.scheduler.slo import Mitigation

    settings: Settings = ctx.obj.with_overrides(slo_ms=slo_ms, slo_mitigation=slo_mitigation)
    from ragctl.allocation.cli import load_plan_option

    allocation = load_plan_option(plan_file, dataset)
    if allocation is not None:
        settings = allocation.apply(settings)
    check_dataset(settings.data_dir, dataset)
    mitigation = Mitigation.parse(settings.slo_mitigation)
    run_slo = settings.collection_slo_ms.get(dataset, settings.slo_ms)
    plan = parse_systems(systems)
    rates = _rates(rate)
    if rates and concurrency is not None:
        raise InvalidRequest("give --rate (open loop) or --concurrency (closed loop), not both")
    if not rates and concurrency is None:
        concurrency = allocation.concurrency if allocation is not None else 4
    meta = {
        "dataset": dataset, "systems": systems, "limit": limit,
        "calibration": calibration if plan.needs_calibration else 0, "seed": seed,
        "rates": rates, "concurrency": concurrency,
        "slo_ms": run_slo,
        # Without an SLO the mitigation does nothing; None keeps older runs resumable.
        "slo_mitigation": mitigation.label if run_slo else None,
        "plan": None if allocation is None else allocation.settings_overrides(),
    }  # fmt: skip
    previous = _check_out_dir(out_dir, meta, resume)
    meta.update({
        "command": "ragctl " + " ".join(sys.argv[1:]),
        "model": settings.model or "embedded SmolLM2-135M-Instruct",
        "engine_url": settings.engine_url,
        "kv_cache_gib": settings.kv_cache_gib, "kv_cache_blocks": settings.kv_cache_blocks,
        "rules_file": str(settings.rules_file) if settings.rules_file else None,
        "confidence_threshold": settings.confidence_threshold,
        "grid": [c.label for c in plan.grid],
        "started_at": previous.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "adaptiverag_table": previous.get("adaptiverag_table"),
    })  # fmt: skip
    asyncio.run(_run(settings, plan, meta, out_dir))
    from ragctl.evaluation.render import render_report
    from ragctl.evaluation.writers import load_evaluation

    render_report(load_evaluation(out_dir), out)
    out.print(f"results in {out_dir}/ (results.json, samples.jsonl, summary.csv, plots)")


@eval_app.command("report")
def eval_report(
    run_dir: Path = typer.Argument(..., help="An `eval run --out` folder."),
    rewrite: bool = typer.Option(
        False, help="Recompute results.json, summary.csv and the plots from samples.jsonl."
    ),
) -> None:
    """Print a run's table and ratios."""
    from ragctl.errors import DataNotFound

    if not (run_dir / "samples.jsonl").exists() and not (run_dir / "results.json").exists():
        raise DataNotFound(f"{run_dir} holds no evaluation run (no samples.jsonl or results.json)")
    if rewrite:
        _write_outputs(run_dir, _read_meta(run_dir))
    from ragctl.evaluation.render import render_report
    from ragctl.evaluation.writers import load_evaluation

    render_report(load_evaluation(run_dir), out)


@eval_app.command("download")
def eval_download(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="squad, musique, qmsum or finsec."),
    out_dir: Path = typer.Option(..., "--out", help="Data folder to write <dataset>/ into."),
    limit: int | None = typer.Option(None, help="Keep at most this many queries."),
) -> None:
    """Download a dataset's original public release and convert it to the common layout."""
    from ragctl.evaluation.download import download
    from ragctl.retrieval.collection import load_card

    settings: Settings = ctx.obj
    load_card(dataset)
    with err.status(f"downloading and converting {dataset}"):
        done = download(dataset, out_dir, cache_dir=settings.cache_dir / "downloads", limit=limit)
    out.print(
        f"{dataset}: {done.queries} queries, {done.documents} documents in {done.folder} "
        f"(use --data-dir {out_dir})"
    )


# -- the run ------------------------------------------------------------------------------------


async def _run(settings: Settings, plan: Any, meta: dict[str, Any], out_dir: Path) -> None:
    from ragctl.evaluation.runner import Runner, done_keys, interleave
    from ragctl.evaluation.systems import System, calibrate, complexity_class, split
    from ragctl.evaluation.writers import CALIBRATION_FILE as CALIBRATION
    from ragctl.evaluation.writers import SAMPLES_FILE as SAMPLES
    from ragctl.evaluation.writers import SampleWriter
    from ragctl.retrieval.collection import load_card, load_queries
    from ragctl.service import open_controller
    from ragctl.types import Config

    card = load_card(meta["dataset"])
    queries = load_queries(settings.data_dir, card.name)
    test, calib = split(queries, meta["limit"], meta["calibration"], meta["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_meta(out_dir, meta)
    with _progress() as bar:
        task = bar.add_task(f"{card.name}: starting the engine", total=None)
        controller = await open_controller(
            settings, card.name, progress=stage_callback(bar, card.name)
        )
        try:
            await controller.aask(test[0].question, Config("stuff", 1))  # warm-up, not counted
            controller.slo.reset()  # nor are its stage times (the engine's first call is slow)
            runner = Runner(controller, card, meta.get("adaptiverag_table"))
            if plan.needs_calibration and runner.adaptiverag_table is None:
                grid = plan.grid or DEFAULT_GRID
                jobs = interleave(calib, [System(f"fixed:{c.label}", "fixed", c) for c in grid])
                path = out_dir / CALIBRATION
                todo = [j for j in jobs if j.key not in done_keys(path, None)]
                bar.update(task, description=f"{card.name}: calibration", total=len(jobs),
                           completed=len(jobs) - len(todo))  # fmt: skip
                writer = SampleWriter(path)
                try:
                    await runner.run(todo, writer, concurrency=meta["concurrency"] or 4,
                                     on_done=lambda _: bar.advance(task))  # fmt: skip
                finally:
                    writer.close()
                classes = {}
                for q in calib:
                    outcome, _ = await controller.profile(q.question)
                    classes[q.id] = complexity_class(outcome.profile)
                rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
                runner.adaptiverag_table = calibrate(rows, classes)
                meta["adaptiverag_table"] = runner.adaptiverag_table
                meta["calibration_classes"] = classes
                _save_meta(out_dir, meta)
            path = out_dir / SAMPLES
            for rate in meta["rates"] or [None]:
                jobs = interleave(test, plan.systems)
                todo = [j for j in jobs if j.key not in done_keys(path, rate)]
                phase = f"rate {rate}/s per system" if rate else f"{meta['concurrency']} in flight"
                bar.update(task, description=f"{card.name}: {phase}", total=len(jobs),
                           completed=len(jobs) - len(todo))  # fmt: skip
                writer = SampleWriter(path)
                try:
                    await runner.run(
                        todo, writer, rate=rate,
                        concurrency=None if rate else meta["concurrency"], seed=meta["seed"],
                        on_done=lambda _: bar.advance(task),
                    )  # fmt: skip
                finally:
                    writer.close()
        finally:
            meta["counters"] = dict(controller.counters)
            meta["slo"] = controller.slo.snapshot()
            _save_meta(out_dir, meta)
            await controller.aclose()
    _write_outputs(out_dir, meta)


def _write_outputs(out_dir: Path, meta: dict[str, Any]) -> None:
    from ragctl.evaluation.plots import write_plots
    from ragctl.evaluation.summaries import summarize
    from ragctl.evaluation.writers import (
        load_samples,
        write_results,
        write_summary_csv,
    )

    rows = load_samples(out_dir / "samples.jsonl")
    summary = summarize(rows)
    write_results(out_dir, summary, meta)
    write_summary_csv(out_dir, summary)
    write_plots(out_dir, rows, summary)


def _rates(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequest(f"--rate takes numbers separated by commas, got {text!r}") from None
    if any(r <= 0 for r in rates):
        raise InvalidRequest(f"--rate values must be positive, got {text!r}")
    return rates


def _read_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _save_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    tmp = out_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir / RUN_FILE)


def _check_out_dir(out_dir: Path, meta: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The previous run's meta when resuming (it must ask for the same run)."""
    previous = _read_meta(out_dir)
    has_run = bool(previous) or (out_dir / "samples.jsonl").exists()
    if not resume:
        if has_run:
            raise InvalidRequest(
                f"{out_dir} already holds a run; pass --resume to continue it, or choose "
                "another --out"
            )
        return {}
    if not has_run:
        raise InvalidRequest(f"nothing to resume in {out_dir}")
    diff = [k for k in RESUME_KEYS if previous.get(k) != meta.get(k)]
    if diff:
        was = ", ".join(f"{k}={previous.get(k)!r}" for k in diff)
        raise InvalidRequest(f"--resume must ask for the same run as before ({was})")
    return previous


def _progress() -> Progress:
    return progress_bar(err)
