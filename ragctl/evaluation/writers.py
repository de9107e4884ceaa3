"""A run's files: `samples.jsonl` (one row per query x system x phase, appended as each
finishes), `results.json` (the summaries and the run's description) and `summary.csv`."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragctl.evaluation.metrics import ANSWER_SCORES, EVIDENCE_SCORES
from ragctl.evaluation.summaries import Evaluation, summarize

if TYPE_CHECKING:
    from ragctl.evaluation.grid import FrontierPoint

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
CALIBRATION_FILE = "calibration.jsonl"
SUMMARY_FILE = "summary.csv"
RESULTS_VERSION = 2
"""2: the summaries and ratios carry 95% bootstrap intervals and their n (`*_ci`, `quality_n`,
`delay_n`, `significant`, ...); a version 1 file reads with those None."""


# -- samples.jsonl -----------------------------------------------------------------------------


class SampleWriter:
    """Appends one JSON row per finished job and flushes it (kill -9 loses at most the row
    being written). A torn last line left by an interrupted run is ended first, so the first
    row of a resumed run starts a line of its own instead of being glued to it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if torn:
            self._f.write("\n")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a JSONL file in file order, and the numbers of the lines that are not a JSON
    object (the torn last line an interrupted run leaves, or one a resumed run appended to)."""
    rows: list[dict[str, Any]] = []
    torn: list[int] = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn.append(number)
    return rows, torn


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `samples.jsonl` (see `read_rows`); unreadable lines are skipped, their
    count and line numbers logged as a warning."""
    rows, torn = read_rows(path)
    if torn:
        log.warning(
            "%s: skipped %d unreadable line(s) (line %s); an interrupted run leaves a torn "
            "last line",
            path,
            len(torn),
            ", ".join(map(str, torn)),
        )
    return rows


# -- results.json ------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_results(directory: str | Path, evaluation: Evaluation, meta: Mapping[str, Any]) -> Path:
    """Write `results.json`: `{"version", "meta", "dataset", "primary", "rates"}`, `rates` the
    phases' `to_dict`. `meta` is the run's description (dataset, command line, model, settings,
    seed, limits); anything JSON cannot hold is written as its `str`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": RESULTS_VERSION,
        "meta": _clean(dict(meta)),
        "dataset": evaluation.dataset,
        "primary": evaluation.primary,
        "rates": _clean({key: phase.to_dict() for key, phase in evaluation.phases.items()}),
    }
    path = directory / RESULTS_FILE
    path.write_text(json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n")
    return path


def load_evaluation(directory: str | Path) -> Evaluation:
    """A run's summaries: from `results.json` when present, else recomputed from
    `samples.jsonl`."""
    directory = Path(directory)
    results = directory / RESULTS_FILE
    if results.exists():
        return Evaluation.from_dict(json.loads(results.read_text(encoding="utf-8")))
    if (directory / SAMPLES_FILE).exists():
        return summarize(load_samples(directory / SAMPLES_FILE))
    raise FileNotFoundError(f"{directory} holds neither {RESULTS_FILE} nor {SAMPLES_FILE}")


# -- summary.csv -------------------------------------------------------------------------------

SUMMARY_COLUMNS_HEAD = ("rate", "concurrency", "system", "n", "errors", "primary", "quality")
SUMMARY_COLUMNS_TAIL = (
    "delay_mean_s", "delay_p50_s", "delay_p95_s", "ttft_mean_s", "ttft_p50_s", "ttft_p95_s",
    "queue_mean_s", "throughput_qps", "profiler_overhead", "top_config", "calls_mean",
    "prompt_tokens_mean", "output_tokens_mean",
)  # fmt: skip
_TOKEN_COLUMNS = {"calls_mean": "calls", "prompt_tokens_mean": "prompt",
                  "output_tokens_mean": "output"}  # fmt: skip
_CI_COLUMNS = ("delay_mean_s", "delay_p50_s", "delay_p95_s", "ttft_mean_s", "ttft_p50_s",
               "ttft_p95_s", "queue_mean_s", "profiler_overhead")  # fmt: skip
"""The tail's figures followed by their interval (`_ci_lo`, `_ci_hi`)."""
_N_AFTER = {"quality": "quality_n", "delay_p95_s": "delay_n", "ttft_p95_s": "ttft_n"}
"""The n of the figures up to this column, after its interval."""


def _with_intervals(columns: list[str], with_ci: set[str]) -> list[str]:
    out: list[str] = []
    for c in columns:
        out.append(c)
        if c in with_ci:
            out += [f"{c}_ci_lo", f"{c}_ci_hi"]
        if c in _N_AFTER:
            out.append(_N_AFTER[c])
    return out


def _bounds(name: str, ci: list[float] | None) -> dict[str, float | None]:
    lo, hi = ci if ci else (None, None)
    return {f"{name}_ci_lo": lo, f"{name}_ci_hi": hi}


def _score_columns(evaluation: Evaluation) -> list[str]:
    seen: dict[str, None] = {}
    for phase in evaluation.phases.values():
        for s in phase.with_oracle().values():
            seen.update(dict.fromkeys(s.quality or {}))
    known = [n for n in (*ANSWER_SCORES, *EVIDENCE_SCORES) if n in seen]
    return known + [n for n in seen if n not in known]


def write_summary_csv(directory: str | Path, evaluation: Evaluation) -> Path:
    """Write `summary.csv`: one row per phase x system, the oracle included (`system` =
    `oracle`); columns `SUMMARY_COLUMNS_HEAD`, each score's mean (em, f1, ..., evidence_recall,
    evidence_hit, as present), then `SUMMARY_COLUMNS_TAIL`. Each quality and delay figure (and
    the profiler overhead) is followed by its 95% interval (`quality_ci_lo`, `quality_ci_hi`,
    `f1_ci_lo`, ..., `delay_mean_s_ci_lo`, ...); `quality_n` (rows with a primary score) follows
    quality's, `delay_n` (rows with a delay) delay_p95_s's, `ttft_n` ttft_p95_s's. Empty cells
    for None."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scores = _score_columns(evaluation)
    columns = _with_intervals(
        [*SUMMARY_COLUMNS_HEAD, *scores, *SUMMARY_COLUMNS_TAIL],
        {"quality", *scores, *_CI_COLUMNS},
    )
    path = directory / SUMMARY_FILE
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for phase in evaluation.phases.values():
            for name, s in phase.with_oracle().items():
                quality, tokens = s.quality or {}, s.tokens or {}
                quality_ci = s.quality_ci or {}
                tail_ci = [_bounds(c, getattr(s, f"{c}_ci")) for c in _CI_COLUMNS]
                row = {
                    "rate": phase.rate,
                    "concurrency": phase.concurrency,
                    "system": name,
                    "n": s.n,
                    "errors": s.errors,
                    "primary": s.primary,
                    "quality": s.primary_value,
                    **_bounds("quality", s.primary_value_ci),
                    "quality_n": s.primary_n,
                    **{k: quality.get(k) for k in scores},
                    **{k: v for c in scores for k, v in _bounds(c, quality_ci.get(c)).items()},
                    **{k: getattr(s, k) for k in SUMMARY_COLUMNS_TAIL if k not in _TOKEN_COLUMNS},
                    **{k: v for bounds in tail_ci for k, v in bounds.items()},
                    "delay_n": s.delay_n,
                    "ttft_n": s.ttft_n,
                    **{k: tokens.get(t) for k, t in _TOKEN_COLUMNS.items()},
                }
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


# -- frontier.csv ------------------------------------------------------------------------------

FRONTIER_FILE = "frontier.csv"


def write_frontier_csv(
    directory: str | Path, points: Sequence[FrontierPoint], systems: Sequence[FrontierPoint]
) -> Path:
    """Write `frontier.csv`: one row per grid configuration (`kind` = grid, `on_frontier`) and
    per replayed system (`kind` = system)."""
    path = Path(directory) / FRONTIER_FILE
    columns = ["kind", "name", "quality", "delay_s", "prompt_tokens", "on_frontier"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for kind, items in (("grid", points), ("system", systems)):
            for p in items:
                frontier = p.on_frontier if kind == "grid" else ""
                writer.writerow({"kind": kind, "name": p.name, "quality": p.quality,
                                 "delay_s": p.delay_s, "prompt_tokens": p.prompt_tokens,
                                 "on_frontier": frontier})  # fmt: skip
    return path
