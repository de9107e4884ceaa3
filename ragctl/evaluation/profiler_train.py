"""`ragctl profiler train`: build one (model, collection)'s profiler state offline from a
calibration split.

For each calibration query: its cells in the outcome grid (every label configuration answered
once, solo; cells the grid lacks are answered here and kept for every later run), its outcome
label (the cheapest configuration that agrees: `ragctl.profiler.labels`), the LLM field
profiler's raw beliefs and the learned profiler's features (the query embedding and retrieval
scores). The labelled queries are appended to the state's labels.jsonl, then the LLM's
calibration and the learned profiler are refitted from every label the state holds.

`gold` agreement reads the dataset's reference answers (evaluation only); `golden` agreement
needs none: the most expensive label configuration's answer is the reference, as the online
golden runs do in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ragctl.errors import InvalidRequest
from ragctl.types import Config

if TYPE_CHECKING:
    from rich.progress import Progress

    from ragctl.controller import Controller
    from ragctl.evaluation.grid import GridStore
    from ragctl.profiler.store import ProfilerStatus
    from ragctl.retrieval.collection import DatasetCard
    from ragctl.settings import Settings
    from ragctl.types import Query

LABEL_CONFIGS = (
    "map_rerank:1,map_rerank:3,map_rerank:6,stuff:1,stuff:3,stuff:6,stuff:9,map_reduce:3:50"
)
"""The default label configurations: each method over a few chunk counts, so that the profile
fields the rules read have values on both sides of their decision (joint: map_rerank or not;
complexity: map_reduce or not; pieces: 1 to 3). One map_reduce only: on a compute-bound engine
it costs several times a stuff answer and is rarely the cheapest that agrees."""

Agreement = Literal["gold", "golden"]


@dataclass(frozen=True)
class TrainRequest:
    dataset: str
    calibration: int
    """Calibration queries: the last ones of the seeded sample (`split`), never test queries."""
    seed: int
    configs: str | None = None
    """The label configurations; None: the dataset card's grid where it has one (the long-
    document sets, whose windows make the default's larger ones overflow the context and whose
    grid cells are then reused), else `LABEL_CONFIGS`."""
    agreement: Agreement = "gold"


@dataclass(frozen=True)
class TrainReport:
    dataset: str
    queries: int
    labelled: int
    built: int
    """Grid cells answered by this run (the rest were reused)."""
    seconds: float
    folder: Path
    status: ProfilerStatus


def label_configs(card: DatasetCard, configs: str | None) -> tuple[Config, ...]:
    """The configurations `train` labels with: `configs`, else the card's grid where it has one,
    else `LABEL_CONFIGS`."""
    from ragctl.evaluation.grid import parse_configs

    return parse_configs(configs or (",".join(card.grid) if card.grid else LABEL_CONFIGS))


def train_profiler(
    settings: Settings, request: TrainRequest, *, progress: Callable[[], Progress]
) -> TrainReport:
    """Label, profile and fit (see the module doc); cheap checks first, then the engine."""
    from ragctl.evaluation.grid import parse_configs
    from ragctl.evaluation.systems import split
    from ragctl.retrieval.collection import check_dataset, load_card, load_queries

    if request.agreement not in ("gold", "golden"):
        raise InvalidRequest(f"agreement must be gold or golden, got {request.agreement!r}")
    if request.calibration < 2:
        raise InvalidRequest(f"--calibration must be at least 2, got {request.calibration}")
    if request.configs:
        parse_configs(request.configs)  # a typo fails before anything is read
    check_dataset(settings.data_dir, request.dataset)
    card = load_card(request.dataset)
    configs = label_configs(card, request.configs)
    queries = load_queries(settings.data_dir, card.name)
    # limit=1: the calibration split is the sample's tail, the same whatever the test size.
    _, calib = split(queries, 1, request.calibration, request.seed)
    # The field profiler is what gets calibrated, whatever the setting serves with.
    llm_settings = settings.with_overrides(profiler="llm")
    return asyncio.run(_train(llm_settings, card, calib, configs, request.agreement, progress))


async def _train(
    settings: Settings,
    card: DatasetCard,
    calib: Sequence[Query],
    configs: Sequence[Config],
    agreement: Agreement,
    progress: Callable[[], Progress],
) -> TrainReport:
    from ragctl.evaluation.grid import build
    from ragctl.evaluation.run import open_grid_controller
    from ragctl.profiler.prompts import FIELDS
    from ragctl.profiler.store import ProfilerState

    start = time.perf_counter()
    with progress() as bar:
        async with open_grid_controller(settings, card, bar) as (controller, store, task):
            todo, total = len(store.missing(calib, configs)), len(calib) * len(configs)
            bar.update(task, description=f"{card.name}: label cells", total=total,
                       completed=total - todo)  # fmt: skip
            if todo:
                await controller.aask(calib[0].question, Config("stuff", 1))  # warm-up
            built = await build(controller, card, store, calib, configs,
                                on_cell=lambda _: bar.advance(task))  # fmt: skip
            labels = grid_labels(card, store, calib, configs, agreement)
            bar.update(task, description=f"{card.name}: profile", total=len(labels), completed=0)
            records = []
            for query in calib:
                if query.id in labels:
                    records.append(await label_record(controller, query, labels[query.id]))
                    bar.advance(task)
            model = getattr(controller.profiler, "model", "") or controller.engine.name
            template = controller.profiler.templates.get(FIELDS)
    state = ProfilerState.at(settings.cache_dir, model, card.name, template)
    state.append(records)
    state.refit(embedder=settings.embedder)
    return TrainReport(
        dataset=card.name,
        queries=len(calib),
        labelled=len(records),
        built=built,
        seconds=time.perf_counter() - start,
        folder=state.folder,
        status=state.status(),
    )


def grid_labels(
    card: DatasetCard,
    store: GridStore,
    queries: Sequence[Query],
    configs: Sequence[Config],
    agreement: Agreement,
) -> dict[str, Any]:
    """`{query id: OutcomeLabel}` from the grid's cells of `queries` x `configs`; `golden`
    agreement takes the configuration with the largest mean solo delay as the reference."""
    from ragctl.evaluation.metrics import primary_metric
    from ragctl.profiler.labels import f1_or_rouge_l, grid_cells, labels_from_grid

    wanted = {c.label for c in configs}
    rows = [r for r in store.rows([q.id for q in queries]) if r["config"] in wanted]
    cells = grid_cells(rows, primary_metric(card))
    golden = None
    if agreement == "golden":
        golden = max(configs, key=lambda c: _mean_delay(rows, c.label))
    return labels_from_grid(cells, mode=agreement, golden=golden, similarity=f1_or_rouge_l)


def _mean_delay(rows: Sequence[dict[str, Any]], label: str) -> float:
    delays = [float(r["delay_s"]) for r in rows if r["config"] == label and not r.get("error")]
    return sum(delays) / len(delays) if delays else 0.0


async def label_record(controller: Controller, query: Query, label: Any) -> Any:
    """The labelled query with the LLM field profiler's raw beliefs (None when its call
    failed) and the learned profiler's features (None without a query embedding)."""
    from ragctl.profiler.learned import query_features
    from ragctl.profiler.store import LabelRecord, llm_beliefs

    signals = await controller.retrieval_signals(query.question)
    features = None
    if signals.embedding is not None:
        x = query_features(signals.embedding, signals.scores, query.question)
        features = tuple(float(v) for v in x)
    llm = getattr(controller.profiler, "llm", controller.profiler)
    c = controller.collection
    outcome = await llm.profile(query.question, c.metadata, c.chunk_tokens, collection=c.name)
    return LabelRecord(
        label=label, question=query.question, features=features,
        beliefs=llm_beliefs(outcome), template=outcome.template,
    )  # fmt: skip
