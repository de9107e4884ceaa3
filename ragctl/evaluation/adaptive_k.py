"""Retrieval-aware chunk counts against fixed ones (`ragctl bench adaptive-k`): per rule range
[lo, hi], the evidence recall and context tokens of taking `hi` chunks (what best-fit takes when
memory is free) against the gap cut inside [lo, hi] (`policy.gap_cut`). Retrieval only: no LLM,
so the figures hold for any serving model over the same index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragctl.evaluation.intervals import Interval, mean_ci, paired_diff_ci, ratio_ci
from ragctl.evaluation.metrics import evidence_scores
from ragctl.policy import gap_cut

if TYPE_CHECKING:
    from ragctl.retrieval.collection import DatasetCard
    from ragctl.types import Chunk, Query

DEFAULT_RANGES = ((1, 3), (2, 6), (3, 9), (4, 12))
"""[n, 3n] for n = 1..4 pieces: the default rules' ranges."""


@dataclass(frozen=True)
class KSide:
    recall: float
    recall_ci: Interval | None
    tokens: float
    tokens_ci: Interval | None
    chunks: float
    recall_per_1k_tokens: float | None
    recall_per_1k_tokens_ci: Interval | None


@dataclass(frozen=True)
class KRow:
    lo: int
    hi: int
    n: int
    """Queries with gold evidence."""
    fixed: KSide
    gap: KSide
    recall_diff_ci: Interval | None
    """Paired interval of gap recall - fixed recall."""


def _side(recalls: list[float], tokens: list[float], chunks: list[int]) -> KSide:
    total = sum(tokens)
    per = ratio_ci([r * 1000 for r in recalls], tokens)
    return KSide(
        recall=sum(recalls) / len(recalls),
        recall_ci=mean_ci(recalls),
        tokens=total / len(tokens),
        tokens_ci=mean_ci(tokens),
        chunks=sum(chunks) / len(chunks),
        recall_per_1k_tokens=1000 * sum(recalls) / total if total else None,
        recall_per_1k_tokens_ci=per,
    )


def compare(
    card: DatasetCard,
    queries: Sequence[Query],
    retrieved: Sequence[Sequence[Chunk]],
    ranges: Sequence[tuple[int, int]] = DEFAULT_RANGES,
) -> list[KRow]:
    """Per range, fixed `hi` against the gap cut, over the queries with gold evidence."""
    rows = []
    for lo, hi in ranges:
        sides: dict[str, tuple[list[float], list[float], list[int]]] = {
            "fixed": ([], [], []), "gap": ([], [], []),
        }  # fmt: skip
        for q, chunks in zip(queries, retrieved, strict=True):
            scores = [c.score or 0.0 for c in chunks]
            for name, k in (("fixed", min(hi, len(chunks))), ("gap", gap_cut(scores, lo, hi))):
                used = chunks[:k]
                recall = evidence_scores(card, q, [c.doc_id for c in used]).get("evidence_recall")
                if recall is None:
                    break  # no gold evidence (the same for both sides): the query is left out
                r, t, n = sides[name]
                r.append(float(recall))
                t.append(float(sum(c.n_tokens for c in used)))
                n.append(k)
        fixed, gap = sides["fixed"], sides["gap"]
        if not gap[0]:
            continue
        rows.append(KRow(lo, hi, len(gap[0]), _side(*fixed), _side(*gap),
                         paired_diff_ci(gap[0], fixed[0])))  # fmt: skip
    return rows


def write(out_dir: Path, dataset: str, rows: Sequence[KRow], meta: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    payload = {"dataset": dataset, "meta": meta, "ranges": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
