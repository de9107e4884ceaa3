"""The outcome grid: every (query, configuration) of a dataset answered once, one query at a
time on an idle engine, and kept on disk for every later evaluation (`ragctl eval grid`).

A cell holds what replay, the oracle and AdaptiveRAG*'s calibration read: the answer, its scores
(the dataset's metric and evidence recall), prompt and output tokens per stage, engine calls and
the solo delay. Cells live under `<cache_dir>/grids/<dataset>/<key>/cells.jsonl`, where `key`
digests everything that changes an answer (`GridKey`: model, synthesis template versions, the
collection's fingerprint: corpus, chunking, tokenizer and embedder; answer budget, temperature,
context). Retrieval depth needs no place in the key: the index is exact, so a configuration of
n chunks reads the same top-n prefix whatever was retrieved. Cells are appended as they finish,
so an interrupted build resumes where it stopped, and a built cell is never answered again.
The engine's prefix cache is emptied before each cell (`cold_cache` says whether it could be):
a query's cells run back to back and share prompt prefixes (stuff:9 holds stuff:6's chunks),
and a delay that reused its neighbour's prefill would not be a solo delay.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragctl.errors import InvalidRequest, RagctlError
from ragctl.evaluation import metrics
from ragctl.evaluation.writers import SampleWriter, read_rows
from ragctl.scheduler.cost import NO_LOAD, Load, StageWork
from ragctl.synthesis.registry import MAX_CHUNKS
from ragctl.types import METHODS, Config

if TYPE_CHECKING:
    from ragctl.controller import Controller
    from ragctl.retrieval.collection import DatasetCard
    from ragctl.types import Answer, Query

GRID_DIR = "grids"
CELLS_FILE = "cells.jsonl"
KEY_FILE = "key.json"

WIDE_CHUNKS = (1, 2, 3, 4, 6, 9, 12)
"""Chunk counts of stuff and map_rerank in the default grid."""
WIDE_MAP_REDUCE = ((3, 50), (6, 50), (9, 50), (3, 100), (6, 100), (9, 100))
"""(chunks, summary budget) of map_reduce in the default grid."""


def wide_grid() -> tuple[Config, ...]:
    """The default grid (20 configurations): stuff and map_rerank over 1-12 chunks, map_reduce
    over 3-9 chunks at two summary budgets. A dataset card's `grid` replaces it (the
    long-document sets take fewer)."""
    out = [Config(m, n) for m in ("map_rerank", "stuff") for n in WIDE_CHUNKS]
    out += [Config("map_reduce", n, ilen) for n, ilen in WIDE_MAP_REDUCE]
    return tuple(sorted(out, key=config_order))


def config_order(c: Config) -> tuple[int, int, int]:
    return (METHODS.index(c.method), c.num_chunks, c.intermediate_length or 0)


def default_grid(card: DatasetCard) -> tuple[Config, ...]:
    """The card's grid, else `wide_grid()`."""
    if not card.grid:
        return wide_grid()
    return parse_configs(",".join(card.grid))


def parse_configs(text: str) -> tuple[Config, ...]:
    """`stuff:3,map_reduce:6:50,...`: valid, distinct configurations, cheap to expensive."""
    configs: dict[str, Config] = {}
    for raw in text.split(","):
        label = raw.strip()
        if not label:
            continue
        try:
            c = Config.parse(label)
        except ValueError as e:
            raise InvalidRequest(f"--configs: {e}") from None
        if c.num_chunks > MAX_CHUNKS:
            raise InvalidRequest(f"--configs: {label} uses more than {MAX_CHUNKS} chunks")
        configs[c.label] = c
    if not configs:
        raise InvalidRequest("--configs names no configuration")
    return tuple(sorted(configs.values(), key=config_order))


@dataclass(frozen=True)
class GridKey:
    """Everything that changes a cell's answer, apart from the query and the configuration."""

    dataset: str
    model: str
    collection: str
    """The retriever's fingerprint: corpus, chunking, tokenizer, embedder."""
    templates: Mapping[str, str]
    """Synthesis prompt template versions."""
    answer_max_tokens: int
    temperature: float
    max_model_len: int

    @classmethod
    def of(cls, controller: Controller) -> GridKey:
        retriever = controller.retriever
        inner = getattr(retriever, "inner", retriever)  # a BatchingRetriever wraps the index
        fingerprint = getattr(inner, "fingerprint", "") or getattr(retriever, "fingerprint", "")
        s = controller.synthesizer
        return cls(
            dataset=controller.collection.name,
            model=controller.engine.name,
            collection=str(fingerprint),
            templates=dict(sorted(s.template_versions.items())),
            answer_max_tokens=s.answer_max_tokens,
            temperature=s.temperature,
            max_model_len=controller.engine.max_model_len,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["templates"] = dict(self.templates)
        return d

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class GridStore:
    """One grid's cells on disk: `(query id, configuration label) -> cell`, appended as built."""

    folder: Path
    key: GridKey
    cells: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, cache_dir: Path, key: GridKey) -> GridStore:
        folder = Path(cache_dir) / GRID_DIR / key.dataset / key.digest
        store = cls(folder, key)
        path = folder / CELLS_FILE
        if path.exists():
            for row in read_rows(path)[0]:  # a torn last line is a cell to build again
                store.cells.setdefault((str(row["query_id"]), str(row["config"])), row)
        return store

    def get(self, query_id: str, config: Config) -> dict[str, Any] | None:
        return self.cells.get((query_id, config.label))

    def missing(
        self, queries: Iterable[Query], configs: Sequence[Config]
    ) -> list[tuple[Query, Config]]:
        return [(q, c) for q in queries for c in configs if self.get(q.id, c) is None]

    def add(self, cell: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        key_path = self.folder / KEY_FILE
        if not key_path.exists():
            key_path.write_text(json.dumps(self.key.to_dict(), indent=2) + "\n")
        writer = SampleWriter(self.folder / CELLS_FILE)
        try:
            writer.write(cell)
        finally:
            writer.close()
        self.cells[(str(cell["query_id"]), str(cell["config"]))] = cell

    def rows(self, query_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        wanted = None if query_ids is None else set(query_ids)
        return [c for (q, _), c in self.cells.items() if wanted is None or q in wanted]


@dataclass(frozen=True)
class GridSize:
    """One grid on disk, counted (`ragctl eval ls`)."""

    digest: str
    model: str
    queries: int
    cells: int
    complete: int
    """Queries with a cell for every configuration of the grid asked about."""


def grid_sizes(cache_dir: Path, dataset: str, grid: Sequence[Config]) -> list[GridSize]:
    """The grids built for `dataset` under `cache_dir` (one per key: model, templates,
    chunking...), the most cells first, with how many queries `grid` is complete for."""
    wanted = {c.label for c in grid}
    out = []
    for folder in sorted((Path(cache_dir) / GRID_DIR / dataset).glob("*/")):
        cells = folder / CELLS_FILE
        if not cells.exists():
            continue
        rows = read_rows(cells)[0]
        per_query: dict[str, set[str]] = {}
        for r in rows:
            per_query.setdefault(str(r.get("query_id")), set()).add(str(r.get("config")))
        try:
            model = str(json.loads((folder / KEY_FILE).read_text()).get("model", "?"))
        except (OSError, ValueError, AttributeError):
            model = "?"
        out.append(
            GridSize(
                folder.name,
                model,
                queries=len(per_query),
                cells=sum(len(c) for c in per_query.values()),
                complete=sum(wanted <= c for c in per_query.values()),
            )
        )
    return sorted(out, key=lambda g: -g.cells)


Observation = tuple[StageWork, Load, float, "StageWork | None"]
"""One stage for the delay model: its observed work, the load, its seconds, its planned work."""


def grid_observations(
    store: GridStore,
    queries: Iterable[Query],
    planned: Callable[[Query, Config], Sequence[StageWork]] | None = None,
) -> list[Observation]:
    """The synthesis stages of `queries`' cells as the delay model's observations
    (`cell_observations` of each)."""
    out: list[Observation] = []
    by_id = {q.id: q for q in queries}
    for cell in store.rows(by_id):
        out += cell_observations(cell, by_id[cell["query_id"]], planned)
    return out


def cell_observations(
    cell: Mapping[str, Any],
    query: Query,
    planned: Callable[[Query, Config], Sequence[StageWork]] | None = None,
) -> list[Observation]:
    """One cell's synthesis stages as the delay model's observations: each stage's calls,
    prompt and output tokens and seconds, under no load (a cell is answered alone on an idle
    engine), with the stage's planned work when `planned(query, config)` gives it (so the
    model learns how much of each stage's output budget is used). Nothing for a failed cell. A
    cell keeps a stage's summed output, not its longest call's: decode steps are read as the
    mean per call (exact for one call)."""
    if cell.get("error"):
        return []
    plan = {w.stage: w for w in planned(query, Config.parse(cell["config"]))} if planned else {}
    out: list[Observation] = []
    for st in cell.get("stages") or ():
        calls, output = int(st["calls"]), int(st["output_tokens"])
        if calls < 1:
            continue
        work = StageWork(
            st["name"], calls, int(st["prompt_tokens"]), math.ceil(output / calls), output
        )
        out.append((work, NO_LOAD, float(st["seconds"]), plan.get(st["name"])))
    return out


SAME_WORK_PROMPT_TOLERANCE = 0.05
"""Two stages do the same engine work (whatever their method calls them) when their calls and
output tokens are equal and their prompt tokens within this share of each other (stuff:1 and
map_rerank:1 read one chunk through templates a few tokens apart)."""


@dataclass(frozen=True)
class TimingNoise:
    """How far apart the grid's solo delays are for cells that did the same work: the floor
    under any delay model's error, and the noise in every delay ratio read off the grid."""

    pairs: int
    """Pairs of one query's cells whose stages did the same work."""
    median_gap: float | None
    """Median over the pairs of how much longer the slower one took (slower / faster - 1)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def timing_noise(store: GridStore, query_ids: Iterable[str]) -> TimingNoise:
    """`TimingNoise` over the cells of `query_ids`: within each query, every pair of answered
    cells whose stages match one for one in calls and output tokens, with prompt tokens within
    `SAME_WORK_PROMPT_TOLERANCE`."""
    by_query: dict[str, list[Mapping[str, Any]]] = {}
    for cell in store.rows(query_ids):
        if not cell.get("error") and cell.get("delay_s") and cell.get("stages"):
            by_query.setdefault(str(cell["query_id"]), []).append(cell)

    def shape(cell: Mapping[str, Any]) -> list[tuple[int, int]]:
        return [(int(st["calls"]), int(st["output_tokens"])) for st in cell["stages"]]

    def same_work(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        return shape(a) == shape(b) and all(
            abs(x["prompt_tokens"] - y["prompt_tokens"])
            <= SAME_WORK_PROMPT_TOLERANCE * max(x["prompt_tokens"], y["prompt_tokens"])
            for x, y in zip(a["stages"], b["stages"], strict=True)
        )

    gaps = [
        max(a["delay_s"], b["delay_s"]) / min(a["delay_s"], b["delay_s"]) - 1.0
        for cells in by_query.values()
        for i, a in enumerate(cells)
        for b in cells[i + 1 :]
        if same_work(a, b)
    ]
    return TimingNoise(len(gaps), statistics.median(gaps) if gaps else None)


def answer_scores(card: DatasetCard, query: Query, answer: Answer) -> dict[str, float | None]:
    """The dataset's answer scores and the evidence scores of the chunks the answer used."""
    return {
        **metrics.score(card, answer.text, query),
        **metrics.evidence_scores(card, query, [c.doc_id for c in answer.chunks]),
    }


async def answer_cell(
    controller: Controller, card: DatasetCard, query: Query, config: Config
) -> dict[str, Any]:
    """Answer one (query, configuration) and return its cell; a failure is a cell too (its
    `error` set), so it is not retried on every run."""
    base = {
        "query_id": query.id,
        "config": config.label,
        "primary": metrics.primary_metric(card),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    t = time.perf_counter()
    try:
        answer = await controller.aask(query.question, config)
    except RagctlError as e:
        failed = {"error": f"{type(e).__name__}: {e}", "answer": None, "scores": {}}
        delay = round(time.perf_counter() - t, 4)
        return {**base, **failed, "tokens": None, "stages": [], "delay_s": delay}
    return {
        **base,
        "error": None,
        "answer": answer.text,
        "scores": answer_scores(card, query, answer),
        "tokens": answer.tokens,
        "stages": [
            {
                "name": s.name,
                "calls": s.calls,
                "prompt_tokens": s.prompt_tokens,
                "output_tokens": s.output_tokens,
                "seconds": round(s.seconds, 4),
            }
            for s in answer.stages
        ],  # fmt: skip
        "chunk_ids": list(answer.chunk_ids),
        "retrieve_s": round(answer.timings.get("retrieve", 0.0), 4),
        "ttft_s": _rounded(answer.timings.get("ttft")),
        "delay_s": round(answer.timings.get("total", time.perf_counter() - t), 4),
    }


async def answer_cold(
    controller: Controller, card: DatasetCard, query: Query, config: Config
) -> dict[str, Any]:
    """`answer_cell` from an empty prefix cache where the engine can empty it (`cold_cache`)."""
    cold = await controller.engine.reset_prefix_cache()
    return {**await answer_cell(controller, card, query, config), "cold_cache": cold}


async def build(
    controller: Controller,
    card: DatasetCard,
    store: GridStore,
    queries: Sequence[Query],
    configs: Sequence[Config],
    *,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Answer every cell `store` lacks, one at a time (closed loop, one in flight: each delay
    is a solo delay); returns how many were built."""
    built = 0
    for query, config in store.missing(queries, configs):
        cell = await answer_cold(controller, card, query, config)
        store.add(cell)
        built += 1
        if on_cell is not None:
            on_cell(cell)
    return built


@dataclass(frozen=True)
class CellSummary:
    """One configuration's means over some queries of a grid."""

    config: str
    n: int
    errors: int
    quality: float | None
    evidence_recall: float | None
    delay_s: float | None
    prompt_tokens: float | None


def summarize_cells(
    store: GridStore, query_ids: Sequence[str], configs: Sequence[Config], primary: str
) -> list[CellSummary]:
    """Per configuration, the means over `query_ids` of its cells (a failed cell scores 0 and
    counts no delay: it did not answer)."""
    out = []
    for c in configs:
        cells = [store.get(q, c) for q in query_ids]
        present = [x for x in cells if x is not None]
        ok = [x for x in present if x.get("error") is None]
        quality = [0.0 if x.get("error") else (x.get("scores") or {}).get(primary) for x in present]
        quality = [float(v) for v in quality if v is not None]
        recall = [
            float(v)
            for x in ok
            if (v := (x.get("scores") or {}).get("evidence_recall")) is not None
        ]
        out.append(
            CellSummary(
                config=c.label,
                n=len(present),
                errors=len(present) - len(ok),
                quality=_mean(quality),
                evidence_recall=_mean(recall),
                delay_s=_mean([float(x["delay_s"]) for x in ok]),
                prompt_tokens=_mean([float(x["tokens"]["prompt"]) for x in ok if x.get("tokens")]),
            )
        )
    return out


@dataclass(frozen=True)
class FrontierPoint:
    """A grid configuration's (or a system's) place on the quality–cost plane."""

    name: str
    quality: float | None
    delay_s: float | None
    prompt_tokens: float | None
    on_frontier: bool = False
    """No other grid configuration is at least as good and at least as fast, one strictly."""


def frontier(cells: Sequence[CellSummary]) -> list[FrontierPoint]:
    """The grid's configurations, flagged where they are Pareto-optimal in (quality, solo
    delay); cheapest first."""
    points = [c for c in cells if c.quality is not None and c.delay_s is not None]

    def dominated(c: CellSummary) -> bool:
        return any(
            o.quality >= c.quality
            and o.delay_s <= c.delay_s  # type: ignore[operator]
            and (o.quality > c.quality or o.delay_s < c.delay_s)  # type: ignore[operator]
            for o in points
        )

    out = [
        FrontierPoint(
            c.config, c.quality, c.delay_s, c.prompt_tokens, c in points and not dominated(c)
        )
        for c in cells
    ]
    return sorted(out, key=lambda p: (math.inf if p.delay_s is None else p.delay_s, p.name))


def frontier_delay_at(points: Sequence[FrontierPoint], quality: float) -> float | None:
    """The solo delay of the fastest grid configuration with at least `quality` (None: none
    reaches it)."""
    ok = [p.delay_s for p in points if p.quality is not None and p.delay_s is not None
          and p.quality >= quality]  # fmt: skip
    return min(ok) if ok else None


def grid_summary(
    store: GridStore, card: DatasetCard, queries: Sequence[Query], configs: Sequence[Config]
) -> list[FrontierPoint]:
    return frontier(
        summarize_cells(store, [q.id for q in queries], configs, metrics.primary_metric(card))
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
