"""Outcome labels: what a query needed, read from the answers of many configurations (pure).

A query answered with several configurations (the evaluation grid, or the controller's online
golden runs) gets one `OutcomeLabel`: the cheapest configuration whose answer *agrees*, and the
profile fields that configuration stands for under the default rules (rules/default.yaml):

- `joint`: the method is not map_rerank (map_rerank reads every chunk on its own);
- `complexity_high`: the method is map_reduce (only the joint-complex rule allows it);
- `pieces`: ceil(num_chunks / 3) clipped to 1..9, the smallest n whose range [n, 3n] holds
  num_chunks;
- `summary`: the SUMMARY_BUCKETS index of map_reduce's intermediate_length (None otherwise).

Two ways to agree (`mode`):

- `golden` (production, no reference answers): the golden configuration's answer is the
  reference; a configuration agrees when `similarity(its answer, golden answer) >= threshold`
  (default 0.5). `similarity` defaults to `token_f1` (the SQuAD token F1 of
  `ragctl.evaluation.metrics.f1`, same normalisation); `f1_or_rouge_l` takes the larger of token
  F1 and ROUGE-L, kinder to long free-form answers that say the same in other words. The golden
  configuration agrees with itself (agreement 1.0), so a query whose golden cell answered always
  gets a label.
- `gold` (the evaluation's calibration split): a configuration agrees when its quality (the
  cell's primary metric) >= threshold x the best quality any configuration reached on the query
  (default threshold 0.9), and that best is > 0; a query where every configuration scored 0 (or
  none was scored) gets no label. The label's `agreement` is quality / best.

A failed cell (its `error` set, or no answer) never agrees. Cheapest = smallest `cost(cell)`
(default: the solo delay, `delay_s`), ties broken by total prompt tokens, then the config string.

This module imports nothing from `ragctl.evaluation` (the profiler sits below it in the layers),
so grid rows come in as plain mappings and `grid_cells` turns them into `GridCell`s.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol

from ragctl.errors import InvalidRequest, MissingDependency
from ragctl.profiler.beliefs import PIECES_VALUES, SUMMARY_BUCKETS
from ragctl.types import Config

Mode = Literal["golden", "gold"]
Source = Literal["golden", "gold"]
GOLDEN_THRESHOLD = 0.5
"""Default agreement threshold of `golden` mode: token F1 with the golden answer."""
GOLD_THRESHOLD = 0.9
"""Default agreement threshold of `gold` mode: the fraction of the query's best quality."""
CHUNKS_PER_PIECE = 3
"""The default rules give n pieces the chunk range [n, 3n]."""


class CellLike(Protocol):
    """What labelling reads of one (query, configuration) cell."""

    @property
    def answer(self) -> str | None: ...
    @property
    def quality(self) -> float | None: ...
    @property
    def delay_s(self) -> float: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def failed(self) -> bool: ...


@dataclass(frozen=True)
class GridCell:
    """One cell of the evaluation grid (`ragctl.evaluation.grid`'s cell dict), as labelling
    reads it."""

    answer: str | None
    quality: float | None
    """The primary metric's score; 0 for a failed cell (as `summarize_cells` counts it), None
    when the query has no references."""
    delay_s: float
    prompt_tokens: int = 0
    failed: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any], primary: str | None = None) -> GridCell:
        """Read a grid cell dict; `primary` defaults to the cell's own `primary` metric name."""
        failed = row.get("error") is not None or row.get("answer") is None
        metric = primary or row.get("primary")
        raw = (row.get("scores") or {}).get(metric) if metric else None
        quality = 0.0 if failed else (None if raw is None else float(raw))
        tokens = row.get("tokens") or {}
        return cls(
            answer=None if failed else str(row["answer"]),
            quality=quality,
            delay_s=float(row.get("delay_s") or 0.0),
            prompt_tokens=int(tokens.get("prompt") or 0),
            failed=failed,
        )


@dataclass(frozen=True)
class OutcomeLabel:
    """What one query needed: the cheapest agreeing configuration and its profile fields."""

    query_id: str
    config: Config
    """The cheapest configuration whose answer agrees."""
    joint: bool
    complexity_high: bool
    pieces: int
    """1..9 (9: nine or more)."""
    summary: int | None
    """SUMMARY_BUCKETS index of map_reduce's intermediate_length; None for other methods."""
    agreement: float
    """The agreement that qualified it: similarity to the golden answer (`golden`), or quality
    over the query's best (`gold`)."""
    source: Source
    outcomes: tuple[tuple[Config, bool], ...] = ()
    """Every configuration tried on the query and whether its answer agreed (empty in a label
    kept before they were recorded; never the golden configuration, which agrees with itself
    by definition): best-fit's quality model reads them."""

    @classmethod
    def of(
        cls,
        query_id: str,
        config: Config,
        agreement: float,
        source: Source,
        outcomes: Mapping[Config, bool] | None = None,
    ) -> OutcomeLabel:
        return cls(
            query_id=query_id,
            config=config,
            joint=config.method != "map_rerank",
            complexity_high=config.method == "map_reduce",
            pieces=pieces_of(config.num_chunks),
            summary=(
                summary_bucket(config.intermediate_length)
                if config.method == "map_reduce" and config.intermediate_length is not None
                else None
            ),
            agreement=float(agreement),
            source=source,
            outcomes=tuple(sorted((outcomes or {}).items(), key=lambda kv: kv[0].label)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_id": self.query_id,
            "config": self.config.label,
            "joint": self.joint,
            "complexity_high": self.complexity_high,
            "pieces": self.pieces,
            "summary": self.summary,
            "agreement": self.agreement,
            "source": self.source,
            "outcomes": {c.label: agreed for c, agreed in self.outcomes},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutcomeLabel:
        """Read `to_dict`'s output; the fields are re-derived from the configuration and checked
        against what was stored (ValueError / KeyError when malformed)."""
        source = d["source"]
        if source not in ("golden", "gold"):
            raise ValueError(f"source must be golden or gold, got {source!r}")
        config = Config.parse(str(d["config"]))
        raw = d.get("outcomes") or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"outcomes must map configurations to true/false, got {raw!r}")
        outcomes = {}
        for text, agreed in raw.items():
            if not isinstance(agreed, bool):
                raise ValueError(f"outcome of {text} must be true or false, got {agreed!r}")
            outcomes[Config.parse(str(text))] = agreed
        if outcomes.get(config) is False:
            raise ValueError(f"the label {config.label} is among its disagreeing outcomes")
        label = cls.of(str(d["query_id"]), config, float(d["agreement"]), source, outcomes)
        for name in ("joint", "complexity_high", "pieces", "summary"):
            if name in d and d[name] != getattr(label, name):
                raise ValueError(f"{name}={d[name]!r} does not match config {label.config.label}")
        return label


def pieces_of(num_chunks: int) -> int:
    """ceil(num_chunks / 3), clipped to 1..9."""
    n = math.ceil(num_chunks / CHUNKS_PER_PIECE)
    return min(max(n, PIECES_VALUES[0]), PIECES_VALUES[-1])


def summary_bucket(intermediate_length: int) -> int:
    """The SUMMARY_BUCKETS index holding `intermediate_length`: buckets are [lo, hi), the last
    one closed; below the first is short, above the last is long."""
    for i, (_, hi) in enumerate(SUMMARY_BUCKETS[:-1]):
        if intermediate_length < hi:
            return i
    return len(SUMMARY_BUCKETS) - 1


# -- answer similarity ---------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 (the same as `ragctl.evaluation.metrics.f1` with squad normalisation:
    lower-case, no punctuation, no articles; bag of tokens; 1 when both are empty)."""
    pred, ref = _squad_tokens(prediction), _squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_l() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise MissingDependency(
            "ROUGE-L agreement needs rouge-score: pip install 'ragctl[eval]'"
        ) from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def f1_or_rouge_l(prediction: str, reference: str) -> float:
    """The larger of token F1 and ROUGE-L's F-measure (rouge-score, Porter stemmer)."""
    f1 = token_f1(prediction, reference)
    if f1 >= 1.0:
        return f1
    return max(f1, float(_rouge_l().score(reference, prediction)["rougeL"].fmeasure))


# -- labelling ------------------------------------------------------------------------------------


def solo_delay(cell: CellLike) -> float:
    """The default cost: the cell's solo delay in seconds."""
    return float(cell.delay_s)


def label_query(
    query_id: str,
    cells: Mapping[Config, CellLike],
    *,
    mode: Mode,
    golden: Config | None = None,
    threshold: float | None = None,
    cost: Callable[[CellLike], float] = solo_delay,
    similarity: Callable[[str, str], float] = token_f1,
) -> OutcomeLabel | None:
    """The query's label, or None: `golden` mode without an answered golden cell, `gold` mode
    when no configuration scored above 0. `threshold` defaults to GOLDEN_THRESHOLD or
    GOLD_THRESHOLD by mode."""
    agreeing: dict[Config, float] = {}
    if mode == "golden":
        if golden is None:
            raise InvalidRequest("golden-mode labels need the golden configuration")
        t = GOLDEN_THRESHOLD if threshold is None else threshold
        ref = cells.get(golden)
        if ref is None or ref.failed or ref.answer is None:
            return None
        for config, cell in cells.items():
            if config == golden:
                agreeing[config] = 1.0
            elif not cell.failed and cell.answer is not None:
                a = float(similarity(cell.answer, ref.answer))
                if a >= t:
                    agreeing[config] = a
    elif mode == "gold":
        t = GOLD_THRESHOLD if threshold is None else threshold
        scored = {c: float(x.quality) for c, x in cells.items()
                  if not x.failed and x.quality is not None}  # fmt: skip
        best = max(scored.values(), default=0.0)
        if best <= 0.0:
            return None
        agreeing = {c: q / best for c, q in scored.items() if q >= t * best}
    else:
        raise InvalidRequest(f"unknown label mode {mode!r}; use golden or gold")

    def order(c: Config) -> tuple[float, int, str]:
        cell = cells[c]
        return (float(cost(cell)), int(cell.prompt_tokens), c.label)

    cheapest = min(agreeing, key=order)
    # Tried: every cell but the golden one (it agrees with itself by definition: no evidence)
    # and one with no reference to score it by (gold mode).
    tried = [
        c for c, x in cells.items()
        if c != golden and (mode == "golden" or x.failed or x.quality is not None)
    ]  # fmt: skip
    outcomes = {c: c in agreeing for c in tried}
    return OutcomeLabel.of(query_id, cheapest, agreeing[cheapest], mode, outcomes)


def labels_from_grid(
    cells: Mapping[str, Mapping[Config, CellLike]],
    *,
    mode: Mode,
    golden: Config | None = None,
    threshold: float | None = None,
    cost: Callable[[CellLike], float] = solo_delay,
    similarity: Callable[[str, str], float] = token_f1,
) -> dict[str, OutcomeLabel]:
    """`label_query` over `{query id: {config: cell}}`; queries without a label are left out."""
    out: dict[str, OutcomeLabel] = {}
    for query_id, by_config in cells.items():
        label = label_query(
            query_id, by_config, mode=mode, golden=golden, threshold=threshold, cost=cost,
            similarity=similarity,
        )  # fmt: skip
        if label is not None:
            out[query_id] = label
    return out


def grid_cells(
    rows: Iterable[Mapping[str, Any]], primary: str | None = None
) -> dict[str, dict[Config, GridCell]]:
    """Group grid cell dicts (`GridStore.rows()`) by query: `{query id: {config: GridCell}}`."""
    out: dict[str, dict[Config, GridCell]] = {}
    for row in rows:
        config = Config.parse(str(row["config"]))
        out.setdefault(str(row["query_id"]), {})[config] = GridCell.from_row(row, primary)
    return out
