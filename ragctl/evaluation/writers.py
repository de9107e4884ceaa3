"""A run's files: `samples.jsonl` (one row per query x system x phase, appended as each
finishes), `results.json` (the summaries and the run's description) and `summary.csv`."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ragctl.evaluation.metrics import ANSWER_SCORES, EVIDENCE_SCORES
from ragctl.evaluation.summaries import Evaluation, summarize

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
CALIBRATION_FILE = "calibration.jsonl"
SUMMARY_FILE = "summary.csv"
RESULTS_VERSION = 1


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
    "delay_mean_s", "delay_p50_s", "delay_p95_s", "queue_mean_s", "throughput_qps",
    "profiler_overhead", "top_config", "calls_mean", "prompt_tokens_mean", "output_tokens_mean",
)  # fmt: skip
_TOKEN_COLUMNS = {"calls_mean": "calls", "prompt_tokens_mean": "prompt",
                  "output_tokens_mean": "output"}  # fmt: skip


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
    evidence_hit, as present), then `SUMMARY_COLUMNS_TAIL`. Empty cells for None."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scores = _score_columns(evaluation)
    columns = [*SUMMARY_COLUMNS_HEAD, *scores, *SUMMARY_COLUMNS_TAIL]
    path = directory / SUMMARY_FILE
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for phase in evaluation.phases.values():
            for name, s in phase.with_oracle().items():
                quality, tokens = s.quality or {}, s.tokens or {}
                row = {
                    "rate": phase.rate,
                    "concurrency": phase.concurrency,
                    "system": name,
                    "n": s.n,
                    "errors": s.errors,
                    "primary": s.primary,
                    "quality": s.primary_value,
                    **{k: quality.get(k) for k in scores},
                    **{k: getattr(s, k) for k in SUMMARY_COLUMNS_TAIL if k not in _TOKEN_COLUMNS},
                    **{k: tokens.get(t) for k, t in _TOKEN_COLUMNS.items()},
                }
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path
