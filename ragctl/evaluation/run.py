"""What `ragctl eval` does, command by command: `datasets` (eval ls), `run_evaluation` (eval
run: check what was asked, and with `--resume` that it is the run `DIR` already holds; open the
engine and controller; calibrate AdaptiveRAG* when it runs; run every phase; write
results.json, summary.csv and the plots) and `report_run` (eval report)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragctl.errors import DataNotFound, InvalidRequest
from ragctl.evaluation.summaries import Evaluation, summarize
from ragctl.evaluation.systems import DEFAULT_GRID, Plan, fixed_system, parse_systems
from ragctl.evaluation.writers import (
    CALIBRATION_FILE,
    RESULTS_FILE,
    SAMPLES_FILE,
    SampleWriter,
    load_evaluation,
    load_samples,
    read_rows,
    write_results,
    write_summary_csv,
)
from ragctl.settings import Settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ragctl.allocation.plan import PlanFile
    from ragctl.evaluation.runner import Job, Runner
    from ragctl.retrieval.collection import DatasetCard

RUN_FILE = "run.json"
"""What a run was asked to do (and AdaptiveRAG*'s calibration table): `--resume` checks it."""
RESUME_KEYS = (
    "dataset", "systems", "limit", "calibration", "seed", "rates", "concurrency", "slo_ms",
    "slo_mitigation", "plan",
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


@dataclass(frozen=True)
class DatasetInfo:
    card: DatasetCard
    primary: str
    queries: int | None
    """How many queries the data folder holds (None: no data)."""


def datasets(data_dir: Path) -> list[DatasetInfo]:
    """Every dataset card, with its primary metric and how many queries `data_dir` holds."""
    from ragctl.evaluation.metrics import primary_metric
    from ragctl.retrieval.collection import dataset_path, list_cards

    out = []
    for card in list_cards():
        try:
            with open(dataset_path(data_dir, card.name, "queries")) as f:
                n: int | None = sum(1 for line in f if line.strip())
        except Exception:
            n = None
        out.append(DatasetInfo(card, primary_metric(card), n))
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
    meta = {
        "dataset": request.dataset, "systems": request.systems, "limit": request.limit,
        "calibration": request.calibration if plan.needs_calibration else 0,
        "seed": request.seed, "rates": rates, "concurrency": concurrency,
        "slo_ms": run_slo,
        # Without an SLO the mitigation does nothing; None keeps older runs resumable.
        "slo_mitigation": mitigation.label if run_slo else None,
        "plan": None if allocation is None else allocation.settings_overrides(),
    }  # fmt: skip
    previous = check_out_dir(out_dir, meta, resume)
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
    from ragctl.evaluation.runner import Runner, interleave
    from ragctl.evaluation.systems import calibrate, complexity_class, split
    from ragctl.retrieval.collection import load_card, load_queries
    from ragctl.service import open_controller
    from ragctl.types import Config

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
            await controller.aask(test[0].question, Config("stuff", 1))  # warm-up, not counted
            controller.slo.reset()  # nor are its stage times (the engine's first call is slow)
            runner = Runner(controller, card, meta.get("adaptiverag_table"))
            if plan.needs_calibration and runner.adaptiverag_table is None:
                path = out_dir / CALIBRATION_FILE
                jobs = interleave(calib, [fixed_system(c) for c in plan.grid or DEFAULT_GRID])
                await _phase(runner, jobs, path, bar, task, f"{card.name}: calibration",
                             rate=None, concurrency=meta["concurrency"] or 4)  # fmt: skip
                classes = {}
                for q in calib:
                    outcome, _ = await controller.profile(q.question)
                    classes[q.id] = complexity_class(outcome.profile)
                runner.adaptiverag_table = calibrate(read_rows(path)[0], classes)
                meta["adaptiverag_table"] = runner.adaptiverag_table
                meta["calibration_classes"] = classes
                save_meta(out_dir, meta)
            for rate in meta["rates"] or [None]:
                phase = f"rate {rate}/s per system" if rate else f"{meta['concurrency']} in flight"
                await _phase(
                    runner, interleave(test, plan.systems), out_dir / SAMPLES_FILE, bar, task,
                    f"{card.name}: {phase}", rate=rate,
                    concurrency=None if rate else meta["concurrency"], seed=meta["seed"],
                )  # fmt: skip
        finally:
            meta["counters"] = dict(controller.counters)
            meta["slo"] = controller.slo.snapshot()
            save_meta(out_dir, meta)
            await controller.aclose()


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
) -> None:
    """Run the jobs of one phase that `path` does not hold yet, appending their rows to it."""
    from ragctl.evaluation.runner import done_keys

    done = done_keys(path, rate)
    todo = [j for j in jobs if j.key not in done]
    bar.update(task, description=description, total=len(jobs), completed=len(jobs) - len(todo))
    writer = SampleWriter(path)
    try:
        await runner.run(todo, writer, rate=rate, concurrency=concurrency, seed=seed,
                         on_done=lambda _: bar.advance(task))  # fmt: skip
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
