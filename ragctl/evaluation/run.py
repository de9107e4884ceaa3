"""What `ragctl eval` does, command by command: `datasets` (eval ls), `run_evaluation` (eval
run: check what was asked, and with `--resume` that it is the run `DIR` already holds; open the
engine and controller; calibrate AdaptiveRAG* when it runs; run every phase; write
results.json, summary.csv and the plots), `report_run` (eval report), `build_grid` (eval grid:
the outcome grid, `grid`) and `replay_run` (eval replay: decisions over the grid, `replay`)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragctl.errors import DataNotFound, InvalidRequest, RagctlError
from ragctl.evaluation.summaries import Evaluation, summarize
from ragctl.evaluation.systems import (
    DEFAULT_GRID,
    FIXED_PREFIX,
    Plan,
    parse_systems,
)
from ragctl.evaluation.writers import (
    CALIBRATION_FILE,
    RESULTS_FILE,
    SAMPLES_FILE,
    SampleWriter,
    load_evaluation,
    load_samples,
    write_results,
    write_summary_csv,
)
from ragctl.settings import Settings
from ragctl.types import Config

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ragctl.allocation.plan import PlanFile
    from ragctl.controller import Controller
    from ragctl.evaluation.grid import FrontierPoint, GridSize, GridStore, TimingNoise
    from ragctl.evaluation.replay import DelayCheck
    from ragctl.evaluation.runner import Job, Runner
    from ragctl.retrieval.collection import DatasetCard
    from ragctl.scheduler.cost import StageWork
    from ragctl.types import Query

WARMUP_SEED = 7919
"""Added to `--seed` for the paced warm-up's arrivals: its own gaps, not the first phase's."""

RUN_FILE = "run.json"
"""What a run was asked to do (and AdaptiveRAG*'s calibration table): `--resume` checks it."""
RESUME_KEYS = (
    "dataset", "systems", "limit", "calibration", "seed", "rates", "concurrency", "slo_ms",
    "slo_mitigation", "plan", "cooldown",
)  # fmt: skip


@dataclass(frozen=True)
class RunRequest:
    """The options of `ragctl eval run`, as given."""

    dataset: str
    systems: str
    limit: int
    calibration: int
    rate: str | None
    concurrency: int | None
    seed: int
    warmup: int = 0
    """Queries outside the test and calibration sets answered first and discarded (`warm_up`):
    on the CPU engine the first occurrences of new batch shapes are slow, and the first
    measured phase must not pay for them. Open loop, they arrive at the first phase's rate
    with the run's SLO, and the SLO loop keeps what it learned from them (a running server's
    delay model and records are not empty); closed loop, all at once, forgotten."""
    cooldown: int = 0
    """Open loop: at most this many other queries (not the warm-up's) go on arriving at each
    phase's rate after its last measured arrival, until every measured query has finished, and
    are not recorded (`Runner.run`): a phase stands for a steady stream to its end, as the
    warm-up makes it stand for one from its start. The SLO loop serves them like any request,
    so its own totals (`meta.slo`) count them; the phase's rows and figures do not."""


@dataclass(frozen=True)
class DatasetInfo:
    card: DatasetCard
    primary: str
    queries: int | None
    """How many queries the data folder holds (None: no data)."""
    grids: tuple[GridSize, ...] = ()
    """The outcome grids built for it under the cache folder (complete: for its default grid)."""


def datasets(data_dir: Path, cache_dir: Path | None = None) -> list[DatasetInfo]:
    """Every dataset card, with its primary metric, how many queries `data_dir` holds and
    (given `cache_dir`) the grids built for it."""
    from ragctl.evaluation.grid import default_grid, grid_sizes
    from ragctl.evaluation.metrics import primary_metric
    from ragctl.retrieval.collection import dataset_path, list_cards

    out = []
    for card in list_cards():
        try:
            with open(dataset_path(data_dir, card.name, "queries")) as f:
                n: int | None = sum(1 for line in f if line.strip())
        except Exception:
            n = None
        grids = tuple(grid_sizes(cache_dir, card.name, default_grid(card))) if cache_dir else ()
        out.append(DatasetInfo(card, primary_metric(card), n, grids))
    return out


def parse_rates(text: str | None) -> list[float]:
    """`--rate 0.02,0.05`: positive numbers."""
    if not text:
        return []
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequest(f"--rate takes numbers separated by commas, got {text!r}") from None
    if any(r <= 0 for r in rates):
        raise InvalidRequest(f"--rate values must be positive, got {text!r}")
    return rates


def read_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def save_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    tmp = out_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir / RUN_FILE)


def check_out_dir(out_dir: Path, meta: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The previous run's meta when resuming (it must ask for the same run)."""
    previous = read_meta(out_dir)
    has_run = bool(previous) or (out_dir / SAMPLES_FILE).exists()
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


def run_evaluation(
    settings: Settings,
    request: RunRequest,
    out_dir: Path,
    *,
    resume: bool,
    allocation: PlanFile | None,
    progress: Callable[[], Progress],
) -> Evaluation:
    """Run the systems side by side on one engine; write results.json, samples.jsonl,
    summary.csv and the plots to `out_dir`; return the summaries written. `allocation` (an
    `ragctl allocate` plan) applies its settings, and its concurrency when neither a rate nor a
    concurrency is asked for; `progress` makes the progress display."""
    from ragctl.retrieval.collection import check_dataset
    from ragctl.scheduler.slo import Mitigation

    if allocation is not None:
        settings = allocation.apply(settings)
    check_dataset(settings.data_dir, request.dataset)
    mitigation = Mitigation.parse(settings.slo_mitigation)
    run_slo = settings.collection_slo_ms.get(request.dataset, settings.slo_ms)
    plan = parse_systems(request.systems)
    rates = parse_rates(request.rate)
    concurrency = request.concurrency
    if rates and concurrency is not None:
        raise InvalidRequest("give --rate (open loop) or --concurrency (closed loop), not both")
    if not rates and concurrency is None:
        concurrency = allocation.concurrency if allocation is not None else 4
    if request.cooldown and not rates:
        raise InvalidRequest("--cooldown needs --rate: only open-loop arrivals go on arriving")
    meta = {
        "dataset": request.dataset, "systems": request.systems, "limit": request.limit,
        "calibration": request.calibration if plan.needs_calibration else 0,
        "seed": request.seed, "rates": rates, "concurrency": concurrency,
        "slo_ms": run_slo,
        # Without an SLO the mitigation does nothing; None keeps older runs resumable.
        "slo_mitigation": mitigation.label if run_slo else None,
        "plan": None if allocation is None else allocation.settings_overrides(),
        # None without one: runs from before the cool-down stay resumable.
        "cooldown": request.cooldown or None,
    }  # fmt: skip
    previous = check_out_dir(out_dir, meta, resume)
    meta.update({
        "command": "ragctl " + " ".join(sys.argv[1:]),
        "model": settings.model or "embedded SmolLM2-135M-Instruct",
        "engine_url": settings.engine_url,
        "kv_cache_gib": settings.kv_cache_gib, "kv_cache_blocks": settings.kv_cache_blocks,
        "rules_file": str(settings.rules_file) if settings.rules_file else None,
        "confidence_threshold": settings.confidence_threshold,
        "delay_weight": settings.delay_weight,
        "grid": [c.label for c in plan.grid],
        "started_at": previous.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "adaptiverag_table": previous.get("adaptiverag_table"),
        "warmup": request.warmup,
    })  # fmt: skip
    asyncio.run(_run(settings, plan, meta, out_dir, progress))
    write_outputs(out_dir, meta)
    return load_evaluation(out_dir)


async def _run(
    settings: Settings,
    plan: Plan,
    meta: dict[str, Any],
    out_dir: Path,
    progress: Callable[[], Progress],
) -> None:
    from ragctl.console import stage_callback
    from ragctl.evaluation.grid import GridKey, GridStore, build
    from ragctl.evaluation.runner import Runner, interleave
    from ragctl.evaluation.systems import calibrate, complexity_class, split
    from ragctl.retrieval.collection import load_card, load_queries
    from ragctl.service import open_controller

    card = load_card(meta["dataset"])
    queries = load_queries(settings.data_dir, card.name)
    test, calib = split(queries, meta["limit"], meta["calibration"], meta["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_meta(out_dir, meta)
    with progress() as bar:
        task = bar.add_task(f"{card.name}: starting the engine", total=None)
        controller = await open_controller(
            settings, card.name, progress=stage_callback(bar, card.name)
        )
        try:
            # The engine's first call is not measured and carries no SLO (under `admission` it
            # could be shed before the engine has seen a single batch shape).
            await controller.aask(test[0].question, Config("stuff", 1), slo_ms=math.inf)
            controller.slo.reset()  # nor are its stage times (the engine's first call is slow)
            extra = warmup_queries(queries, [*test, *calib], meta["warmup"], meta["seed"])
            if extra:
                bar.update(task, description=f"{card.name}: warming the engine up")
                rate = meta["rates"][0] * len(plan.systems) if meta["rates"] else None
                await warm_up(controller, extra, rate, meta["seed"])
                # Paced, the warm-up is the traffic a running server has already served: what
                # the SLO loop learned from it stays, what it counted goes. At once, it only
                # shows the engine its batch shapes, and a burst teaches nothing to keep.
                controller.slo.reset(learned=rate is None)
            runner = Runner(controller, card, meta.get("adaptiverag_table"))
            if plan.needs_calibration and runner.adaptiverag_table is None:
                # From the outcome grid: solo answers, built once and shared by later runs.
                store = GridStore.open(settings.cache_dir, GridKey.of(controller))
                configs = plan.grid or DEFAULT_GRID
                todo = len(store.missing(calib, configs))
                bar.update(task, description=f"{card.name}: calibration (grid)", total=todo,
                           completed=0)  # fmt: skip
                await build(controller, card, store, calib, configs,
                            on_cell=lambda _: bar.advance(task))  # fmt: skip
                rows = [
                    {**store.get(q.id, c), "system": FIXED_PREFIX + c.label}  # type: ignore[dict-item]
                    for q in calib
                    for c in configs
                ]
                writer = SampleWriter(out_dir / CALIBRATION_FILE)
                try:
                    for row in rows:
                        writer.write(row)
                finally:
                    writer.close()
                classes = {}
                for q in calib:
                    outcome, _ = await controller.profile(q.question)
                    classes[q.id] = complexity_class(outcome.profile)
                runner.adaptiverag_table = calibrate(rows, classes, settings.delay_weight)
                meta["calibration_grid"] = store.folder.name
                meta["adaptiverag_table"] = runner.adaptiverag_table
                meta["calibration_classes"] = classes
                save_meta(out_dir, meta)
            cooldown = interleave(
                warmup_queries(queries, [*test, *calib, *extra], meta.get("cooldown") or 0,
                               meta["seed"]),
                plan.systems,
            )  # fmt: skip
            meta["cold_phases"] = []
            for rate in meta["rates"] or [None]:
                # Every phase answers the same test queries. From an empty prefix cache, none
                # reuses an earlier phase's prompts: a mode that refused a query in one phase
                # would otherwise meet it uncached in the next beside the cached rest, slower
                # than a mode that answered it (seen in the SLO benchmark: the queries shedding
                # refused near capacity were the slow ones of the next phase's bursts).
                cold = await controller.engine.reset_prefix_cache()
                meta["cold_phases"].append(cold)
                if not cold and len(meta["cold_phases"]) > 1:
                    log.warning(
                        "the engine could not empty its prefix cache: phase %d meets the "
                        "prompts of the phases before it cached (a vLLM server needs "
                        "VLLM_SERVER_DEV_MODE=1 for POST /reset_prefix_cache)",
                        len(meta["cold_phases"]),
                    )
                phase = f"rate {rate}/s per system" if rate else f"{meta['concurrency']} in flight"
                await _phase(
                    runner, interleave(test, plan.systems), out_dir / SAMPLES_FILE, bar, task,
                    f"{card.name}: {phase}", rate=rate,
                    concurrency=None if rate else meta["concurrency"], seed=meta["seed"],
                    cooldown=cooldown,
                )  # fmt: skip
        finally:
            meta["counters"] = dict(controller.counters)
            meta["slo"] = controller.slo.snapshot()
            save_meta(out_dir, meta)
            await controller.aclose()


def warmup_queries(queries: Sequence[Any], used: Sequence[Any], n: int, seed: int) -> list:
    """`n` queries (seeded) that are not in `used` (the test and calibration queries)."""
    import random

    taken = {q.id for q in used}
    rest = [q for q in queries if q.id not in taken]
    return random.Random(seed).sample(rest, min(n, len(rest)))


async def warm_up(
    controller: Controller, queries: Sequence[Query], rate: float | None, seed: int
) -> None:
    """Answer `queries` and discard the answers: open loop at `rate` per second (Poisson, with
    the run's SLO, so that the SLO loop acts and learns as in the phase that follows), else all
    at once without an SLO (the batch shapes of a loaded engine occur, none is refused). A
    failure here is the run's own to report, on its measured queries."""
    from ragctl.evaluation.runner import gather_all, paced, poisson_arrivals

    async def ask(question: str) -> None:
        with suppress(RagctlError):
            await controller.aask(question, slo_ms=None if rate else math.inf)

    if rate is None:
        await gather_all([asyncio.ensure_future(ask(q.question)) for q in queries])
        return
    tasks: list[asyncio.Future[Any]] = []
    arrivals = poisson_arrivals(len(queries), rate, seed + WARMUP_SEED)
    calls = [lambda q=q: ask(q.question) for q in queries]
    await gather_all(tasks, lambda: paced(calls, arrivals, time.perf_counter(), tasks))


async def _phase(
    runner: Runner,
    jobs: Sequence[Job],
    path: Path,
    bar: Progress,
    task: TaskID,
    description: str,
    *,
    rate: float | None,
    concurrency: int | None,
    seed: int = 0,
    cooldown: Sequence[Job] = (),
) -> None:
    """Run the jobs of one phase that `path` does not hold yet, appending their rows to it
    (`cooldown`: `Runner.run`'s)."""
    from ragctl.evaluation.runner import done_keys

    done = done_keys(path, rate)
    todo = [j for j in jobs if j.key not in done]
    bar.update(task, description=description, total=len(jobs), completed=len(jobs) - len(todo))
    writer = SampleWriter(path)
    try:
        await runner.run(todo, writer, rate=rate, concurrency=concurrency, seed=seed,
                         on_done=lambda _: bar.advance(task), cooldown=cooldown)  # fmt: skip
    finally:
        writer.close()


def write_outputs(out_dir: Path, meta: dict[str, Any]) -> None:
    """Summarize `samples.jsonl`; write results.json, summary.csv and the plots."""
    from ragctl.evaluation.plots import write_plots

    rows = load_samples(out_dir / SAMPLES_FILE)
    evaluation = summarize(rows)
    write_results(out_dir, evaluation, meta)
    write_summary_csv(out_dir, evaluation)
    write_plots(out_dir, rows, evaluation)


def report_run(run_dir: Path, *, rewrite: bool = False) -> Evaluation:
    """A run's summaries, for `ragctl eval report`; `rewrite` first recomputes results.json,
    summary.csv and the plots from samples.jsonl."""
    if not (run_dir / SAMPLES_FILE).exists() and not (run_dir / RESULTS_FILE).exists():
        raise DataNotFound(f"{run_dir} holds no evaluation run (no samples.jsonl or results.json)")
    if rewrite:
        write_outputs(run_dir, read_meta(run_dir))
    return load_evaluation(run_dir)


# -- eval grid and eval replay -----------------------------------------------------------------


@dataclass(frozen=True)
class GridRequest:
    """The options of `ragctl eval grid` (and the grid part of `eval replay`)."""

    dataset: str
    limit: int
    calibration: int
    seed: int
    configs: str | None
    """`method:chunks[:ilen],...`; None: the dataset card's grid, else the wide default."""


@dataclass(frozen=True)
class GridReport:
    dataset: str
    primary: str
    folder: Path
    queries: int
    configs: tuple[Config, ...]
    built: int
    """Cells answered by this run."""
    reused: int
    """Cells an earlier run had built."""
    seconds: float
    points: list[FrontierPoint]
    """Per configuration, its means over the test queries, frontier flagged."""


def _grid_queries(
    settings: Settings, request: GridRequest
) -> tuple[DatasetCard, tuple[Config, ...], list, list]:
    """The card, the grid's configurations (checked first: a typo costs nothing) and the test
    and calibration queries."""
    from ragctl.evaluation.grid import default_grid, parse_configs
    from ragctl.evaluation.systems import split
    from ragctl.retrieval.collection import check_dataset, load_card, load_queries

    configs = parse_configs(request.configs) if request.configs else None
    check_dataset(settings.data_dir, request.dataset)
    card = load_card(request.dataset)
    queries = load_queries(settings.data_dir, card.name)
    test, calib = split(queries, request.limit, request.calibration, request.seed)
    return card, configs or default_grid(card), test, calib


@asynccontextmanager
async def open_grid_controller(
    settings: Settings, card: DatasetCard, bar: Progress
) -> AsyncIterator[tuple[Controller, GridStore, TaskID]]:
    """The engine and controller of `eval grid` and `eval replay`, with the grid of their key
    (closed on exit), and the progress task that reports on them."""
    from ragctl.console import stage_callback
    from ragctl.evaluation.grid import GridKey, GridStore
    from ragctl.service import open_controller

    task = bar.add_task(f"{card.name}: starting the engine", total=None)
    controller = await open_controller(settings, card.name, progress=stage_callback(bar, card.name))
    try:
        yield controller, GridStore.open(settings.cache_dir, GridKey.of(controller)), task
    finally:
        await controller.aclose()


def build_grid(
    settings: Settings, request: GridRequest, *, progress: Callable[[], Progress]
) -> GridReport:
    """Answer every (query, configuration) of the grid the cache lacks, one at a time on an
    idle engine: the test queries and the calibration ones (`split`, as `eval run` draws them)."""
    card, configs, test, calib = _grid_queries(settings, request)
    return asyncio.run(_build_grid(settings, card, test, calib, configs, progress))


async def _build_grid(
    settings: Settings,
    card: DatasetCard,
    test: list,
    calib: list,
    configs: tuple[Config, ...],
    progress: Callable[[], Progress],
) -> GridReport:
    from ragctl.evaluation.grid import build, grid_summary
    from ragctl.evaluation.metrics import primary_metric

    start = time.perf_counter()
    queries = [*test, *calib]
    with progress() as bar:
        async with open_grid_controller(settings, card, bar) as (controller, store, task):
            todo = len(store.missing(queries, configs))
            total = len(queries) * len(configs)
            bar.update(task, description=f"{card.name}: grid", total=total,
                       completed=total - todo)  # fmt: skip
            if todo:
                await controller.aask(queries[0].question, Config("stuff", 1))  # warm-up
            built = await build(controller, card, store, queries, configs,
                                on_cell=lambda _: bar.advance(task))  # fmt: skip
    return GridReport(
        dataset=card.name,
        primary=primary_metric(card),
        folder=store.folder,
        queries=len(queries),
        configs=configs,
        built=built,
        reused=total - todo,
        seconds=time.perf_counter() - start,
        points=grid_summary(store, card, test, configs),
    )


@dataclass(frozen=True)
class ReplayReport:
    evaluation: Evaluation
    points: list[FrontierPoint]
    """The grid's configurations over the test queries, frontier flagged."""
    systems: list[FrontierPoint]
    """Each replayed system (and the oracle) placed on the same plane."""
    decisions: int
    live_cells: int
    learned: int
    """Stage observations the delay model took from ragctl's chosen cells (`Replayer.learn`)."""
    profile_hits: int
    profile_misses: int
    delay_checks: list[DelayCheck]
    """The delay model's predictions against the grid's solo delays, per ragctl system."""
    timing_noise: TimingNoise
    """The grid's own spread of solo delays for the same work, over the test queries."""
    seconds: float
    out_dir: Path


def replay_run(
    settings: Settings,
    request: GridRequest,
    systems: str,
    out_dir: Path,
    *,
    progress: Callable[[], Progress],
) -> ReplayReport:
    """Replay each system's decisions over the grid; write samples.jsonl, results.json,
    summary.csv, the run's plots, frontier.csv and frontier.png to `out_dir`."""
    card, configs, test, calib = _grid_queries(settings, request)
    plan = parse_systems(systems, grid=configs)
    # The calibration split's cells warm the delay model, whatever the systems need.
    warm = list(calib)
    if not plan.needs_calibration:
        calib = []
    return asyncio.run(
        _replay(settings, card, test, calib, configs, plan, systems, out_dir, progress, warm)
    )


async def _replay(
    settings: Settings,
    card: DatasetCard,
    test: list,
    calib: list,
    configs: tuple[Config, ...],
    plan: Plan,
    systems: str,
    out_dir: Path,
    progress: Callable[[], Progress],
    warm: Sequence[Query] = (),
) -> ReplayReport:
    """`warm`: the queries whose cells teach the delay model first (the calibration split:
    live, it would have learned from the engine's own stages). A test query's chosen cells
    teach it only after its decisions (`Replayer.learn`)."""
    from ragctl.evaluation.grid import grid_observations, grid_summary, timing_noise
    from ragctl.evaluation.plots import write_frontier_plot
    from ragctl.evaluation.replay import (
        PROFILES_FILE,
        CachedProfiler,
        Replayer,
        ReplayStats,
        delay_check,
    )
    from ragctl.evaluation.writers import write_frontier_csv

    start = time.perf_counter()
    stats = ReplayStats()
    with progress() as bar:
        async with open_grid_controller(settings, card, bar) as (controller, store, task):
            profiler = CachedProfiler(
                controller.profiler, store.folder / PROFILES_FILE, controller.profiler.engine.name
            )
            controller.profiler = profiler  # type: ignore[assignment]
            c = controller.collection
            if not all(
                profiler.has(q.question, c.metadata, c.chunk_tokens, c.name) for q in test + calib
            ):
                # The engine's first call is slow: keep it out of the profiles' timings, and
                # out of the delay model (a test query's stages teach it only after deciding).
                await controller.aask(test[0].question, Config("stuff", 1))
                controller.slo.reset()
            delay = controller.slo.delay
            planner = _planner(controller, configs)
            warmed = grid_observations(store, warm, planner)
            for work, load, seconds, budget in warmed:
                delay.observe(work, load, seconds, budget=budget)
            delay.refit()
            replayer = Replayer(controller, card, store, stats, planner)
            await replayer.warm_trust(calib, plan)
            table = None
            if plan.needs_calibration:
                bar.update(task, description=f"{card.name}: AdaptiveRAG* calibration")
                table = await replayer.adaptiverag_table(calib, plan.grid or configs)
            jobs = len(test) * len(plan.systems)
            bar.update(task, description=f"{card.name}: replay", total=jobs, completed=0)
            rows = await replayer.rows(test, plan, table, on_row=lambda: bar.advance(task))
            checks = delay_check(rows, store)
            noise = timing_noise(store, [q.id for q in test])
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = out_dir / SAMPLES_FILE
    samples.unlink(missing_ok=True)  # a replay is cheap: it is written whole each time
    writer = SampleWriter(samples)
    try:
        for row in rows:
            writer.write(row)
    finally:
        writer.close()
    points = grid_summary(store, card, test, configs)
    meta = {
        "command": "ragctl " + " ".join(sys.argv[1:]),
        "replay": True,
        "dataset": card.name, "systems": systems, "limit": len(test),
        "calibration": len(calib), "grid": [c.label for c in configs],
        "grid_folder": store.folder.name, "adaptiverag_table": table,
        "model": settings.model or "embedded SmolLM2-135M-Instruct",
        "rules_file": str(settings.rules_file) if settings.rules_file else None,
        "confidence_threshold": settings.confidence_threshold,
        "delay_weight": settings.delay_weight, "explore_delay": settings.explore_delay,
        "explore_seed": settings.explore_seed,
        "live_cells": stats.live_cells,
        "delay_model": {
            "warm_observations": len(warmed), "learned_on_test_queries": stats.learned,
            "source": delay.source,
            "on_test_queries": [c.to_dict() for c in checks],
            "timing_noise": noise.to_dict(),
        },
        "note": "solo delays on an idle engine; replay says nothing about load (eval run does)",
    }  # fmt: skip
    write_outputs(out_dir, meta)
    evaluation = load_evaluation(out_dir)
    placed = system_points(evaluation)
    write_frontier_csv(out_dir, points, placed)
    write_frontier_plot(out_dir / "frontier.png", points, placed, card.name,
                        evaluation.primary or "quality")  # fmt: skip
    return ReplayReport(
        evaluation=evaluation,
        points=points,
        systems=placed,
        decisions=stats.decisions,
        live_cells=stats.live_cells,
        learned=stats.learned,
        profile_hits=profiler.hits,
        profile_misses=profiler.misses,
        delay_checks=checks,
        timing_noise=noise,
        seconds=time.perf_counter() - start,
        out_dir=out_dir,
    )


def _planner(
    controller: Controller, configs: Sequence[Config]
) -> Callable[[Query, Config], tuple[StageWork, ...]]:
    """`planned(query, config)`: the work the controller would plan for `config` on `query`
    (its retrieved chunks, sized as best-fit sizes them), retrieved once per query."""
    from ragctl.policy import planned_work

    k = max(c.num_chunks for c in configs)
    sizers: dict[str, Any] = {}

    def planned(query: Query, config: Config) -> tuple[StageWork, ...]:
        if query.id not in sizers:
            chunks = controller.retriever.search(query.question, k)
            sizers[query.id] = controller.synthesizer.sizer(query.question, chunks)
        return planned_work(sizers[query.id], config)

    return planned


def system_points(evaluation: Evaluation) -> list[FrontierPoint]:
    """The non-fixed systems and the oracle of the (one) replay phase, as points."""
    from ragctl.evaluation.grid import FrontierPoint

    out = []
    for phase in evaluation.phases.values():
        for name, s in phase.with_oracle().items():
            if name.startswith(FIXED_PREFIX):
                continue
            prompt = (s.tokens or {}).get("prompt")
            out.append(FrontierPoint(name, s.primary_value, s.delay_mean_s, prompt))
    return out
