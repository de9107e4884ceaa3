"""`ragctl eval ls | run | grid | replay | agree | report | download`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ragctl.console import progress_bar
from ragctl.evaluation.systems import DEFAULT_GRID, DEFAULT_SYSTEMS, DESCRIPTIONS
from ragctl.settings import Settings

eval_app = typer.Typer(help="Evaluate ragctl against fixed configurations and baselines.",
                       no_args_is_help=True)  # fmt: skip
out = Console()
if not out.is_terminal:
    out = Console(width=160)  # a report piped to a file keeps its table columns
err = Console(stderr=True)


@eval_app.command("ls")
def eval_ls(ctx: typer.Context) -> None:
    """The datasets (with their metric, how many queries the data folder has and the outcome
    grids built for them) and systems."""
    from ragctl.evaluation.run import datasets

    settings: Settings = ctx.obj
    table = Table("dataset", "title", "queries", "primary metric", "licence", "grids built")
    for d in datasets(settings.data_dir, settings.cache_dir):
        n = "no data" if d.queries is None else str(d.queries)
        grids = "\n".join(
            f"{g.complete} queries complete, {g.queries} begun, {g.cells} cells "
            f"({Path(g.model).name})"
            for g in d.grids
        )
        table.add_row(d.card.name, d.card.title, n, d.primary, d.card.license, grids or "-")
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
        10, min=0, help="Calibration queries for adaptiverag and static (never test queries)."
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
        help="off, patchwork, adaptive, admission (adaptive + shed + hold), or modes and "
        "mechanisms (priority, pause, config, triage, shed, hold) joined by ',' or '+'.",
    ),
    plan_file: Path | None = typer.Option(
        None,
        "--plan",
        help="An allocation plan (`ragctl allocate`): its batch sizes, threads and engine "
        "sequences apply, and its concurrency when neither --rate nor --concurrency is given.",
    ),
    warmup: int = typer.Option(
        0,
        min=0,
        help="Warm up first with N other queries, discarded: with --rate, arriving at the "
        "first rate with the run's SLO (the SLO loop keeps what it learned); else all at once.",
    ),
    cooldown: int = typer.Option(
        0,
        min=0,
        help="With --rate: after each phase's last measured arrival, up to N other queries go "
        "on arriving at its rate until every measured query has finished; none is recorded.",
    ),
) -> None:
    """Run the systems side by side on one engine and write results.json, samples.jsonl,
    summary.csv and plots to --out."""
    from ragctl.cli.common import load_plan_option
    from ragctl.evaluation.render import render_report
    from ragctl.evaluation.run import RunRequest, run_evaluation

    settings: Settings = ctx.obj.with_overrides(slo_ms=slo_ms, slo_mitigation=slo_mitigation)
    evaluation = run_evaluation(
        settings,
        RunRequest(dataset, systems, limit, calibration, rate, concurrency, seed, warmup, cooldown),
        out_dir,
        resume=resume,
        allocation=load_plan_option(plan_file, dataset),
        progress=lambda: progress_bar(err),
    )
    render_report(evaluation, out)
    out.print(f"results in {out_dir}/ (results.json, samples.jsonl, summary.csv, plots)")


@eval_app.command("grid")
def eval_grid(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset card name."),
    limit: int = typer.Option(40, min=1, help="Test queries (the seeded sample eval run draws)."),
    calibration: int = typer.Option(
        10, min=0, help="Calibration queries (AdaptiveRAG*'s, never among the test queries)."
    ),
    seed: int = typer.Option(0, help="Query sample."),
    configs: str | None = typer.Option(
        None,
        help="Comma-separated method:chunks[:ilen] (default: the dataset card's grid, else "
        "the wide default grid).",
    ),
) -> None:
    """Answer every query with every configuration of the grid, one at a time on an idle
    engine, and keep each cell on disk (resumable; a built cell is never answered again)."""
    from ragctl.evaluation.render import render_grid
    from ragctl.evaluation.run import GridRequest, build_grid

    settings: Settings = ctx.obj
    report = build_grid(
        settings,
        GridRequest(dataset, limit, calibration, seed, configs),
        progress=lambda: progress_bar(err),
    )
    render_grid(report, out)


@eval_app.command("replay")
def eval_replay(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset card name."),
    systems: str = typer.Option(
        DEFAULT_SYSTEMS, help="Comma-separated systems (eval ls); `fixed` = the whole grid."
    ),
    limit: int = typer.Option(40, min=1, help="Test queries (the seeded sample eval run draws)."),
    calibration: int = typer.Option(
        10, min=0, help="Calibration queries for adaptiverag and static (never test queries)."
    ),
    seed: int = typer.Option(0, help="Query sample."),
    configs: str | None = typer.Option(
        None, help="The grid's configurations (default: the card's grid, else the wide one)."
    ),
    out_dir: Path = typer.Option(..., "--out", help="Where results, samples and plots go."),
) -> None:
    """Replay each system's decisions (real profiler and policy) over the outcome grid: the
    quality, tokens and solo delay each would get, and the grid's quality-cost frontier. Cells
    the grid lacks are answered live once and added to it."""
    from ragctl.evaluation.render import render_replay
    from ragctl.evaluation.run import GridRequest, replay_run

    settings: Settings = ctx.obj
    report = replay_run(
        settings,
        GridRequest(dataset, limit, calibration, seed, configs),
        systems,
        out_dir,
        progress=lambda: progress_bar(err),
    )
    render_replay(report, out)
    out.print(f"results in {out_dir}/ (results.json, samples.jsonl, summary.csv, frontier.csv, "
              "frontier.png)")  # fmt: skip


@eval_app.command("agree")
def eval_agree(
    live_dir: Path = typer.Argument(..., help="An `eval run --concurrency 1` folder."),
    replay_dir: Path = typer.Argument(..., help="An `eval replay` folder on the same queries."),
) -> None:
    """Check replay against a live run: per system, the queries where both chose the same
    configuration and gave the same answer, and each side's quality."""
    from ragctl.errors import DataNotFound
    from ragctl.evaluation.render import render_agreement
    from ragctl.evaluation.replay import agreement
    from ragctl.evaluation.writers import SAMPLES_FILE, load_samples

    for d in (live_dir, replay_dir):
        if not (d / SAMPLES_FILE).exists():
            raise DataNotFound(f"{d} holds no {SAMPLES_FILE}")
    found = agreement(
        load_samples(live_dir / SAMPLES_FILE), load_samples(replay_dir / SAMPLES_FILE)
    )
    if not found:
        raise DataNotFound("the two runs share no system answered on the same queries")
    render_agreement(found, out)


@eval_app.command("report")
def eval_report(
    run_dir: Path = typer.Argument(..., help="An `eval run --out` folder."),
    rewrite: bool = typer.Option(
        False, help="Recompute results.json, summary.csv and the plots from samples.jsonl."
    ),
) -> None:
    """Print a run's table and ratios."""
    from ragctl.evaluation.render import render_report
    from ragctl.evaluation.run import report_run

    render_report(report_run(run_dir, rewrite=rewrite), out)


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
