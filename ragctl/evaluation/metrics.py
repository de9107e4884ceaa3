"""Answer and evidence scores, and their means.

A dataset card's `metric` section says which answer scores a dataset gets (`em`, `f1`, `rouge1`,
`rouge2`, `rougeL`), how text is normalised, how several references combine and what is cut
from each reference first; its `evidence` section says when the used chunks hold enough
evidence. This module owns computing those scores for one prediction, and averaging them.

- EM and F1 follow the official SQuAD v1.1 script (MuSiQue's official `metrics/answer.py` is the
  same): lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace;
  F1 on whitespace tokens with multiplicity; the best over the references. One deviation, taken
  from the SQuAD 2.0 script that MuSiQue uses: when either side normalises to no tokens, F1 is 1
  if both do and 0 otherwise (v1.1 gives 0 even when EM is 1).
- ROUGE-1/2/L are rouge-score's F-measures with its own tokenizer and the Porter stemmer, so
  `normalize` applies to EM/F1 only. That tokenizer keeps only `[a-z0-9]` after lower-casing:
  non-ASCII letters are dropped (as in the original ROUGE).
- A query marked `answerable: false` (MuSiQue's full release has such; MuSiQue-Ans does not)
  scores 1 for an abstention ("unanswerable", "I don't know", an empty answer) and 0 for
  anything else; against real references an abstention is scored as the text it is.
- A query without references gets None for every score; `mean_scores` leaves Nones out.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, get_args

from ragctl.errors import InvalidRequest, MissingDependency
from ragctl.retrieval.collection import (
    DatasetCard,
    Evidence,
    Metric,
    Score,
    dataset_names,
    load_card,
)
from ragctl.types import Query

ANSWER_SCORES: tuple[str, ...] = get_args(Score)
EVIDENCE_SCORES = ("evidence_recall", "evidence_hit")
ROUGE_SCORES = ("rouge1", "rouge2", "rougeL")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ROUGE_NON_ALNUM = re.compile(r"[^a-z0-9]+")

ABSTENTION_PHRASES = (
    "unanswerable",
    "not answerable",
    "cannot be answered",
    "can't be answered",
    "no answer",
    "unknown",
    "i don't know",
    "i do not know",
    "not enough information",
    "insufficient information",
)
"""Answers that decline (the synthesis prompts ask for `unanswerable`); a prediction is an
abstention when it normalises to exactly one of them, so a hedged real answer is not."""


# -- normalisation and tokens ------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's `normalize_answer`: lower-case, remove ASCII punctuation, remove the
    articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str, normalize: str = "squad") -> list[str]:
    """The tokens EM and F1 compare: SQuAD-normalised words (`squad`), rouge-score's
    `[a-z0-9]+` tokens without stemming (`rouge`), or plain whitespace words (`none`)."""
    if normalize == "squad":
        return normalize_answer(text).split()
    if normalize == "rouge":
        return _ROUGE_NON_ALNUM.sub(" ", text.lower()).split()
    if normalize == "none":
        return text.split()
    raise InvalidRequest(f"unknown normalisation {normalize!r}; use squad, rouge or none")


def is_abstention(prediction: str) -> bool:
    """Whether `prediction` declines to answer: empty, or one of `ABSTENTION_PHRASES` (after
    SQuAD normalisation)."""
    normalized = normalize_answer(prediction)
    return not normalized or normalized in _ABSTENTIONS


_ABSTENTIONS = frozenset(normalize_answer(p) for p in ABSTENTION_PHRASES)


# -- single-reference scores -------------------------------------------------------------------


def exact_match(prediction: str, reference: str, normalize: str = "squad") -> float:
    """1.0 when both normalise to the same tokens, else 0.0."""
    return float(tokens(prediction, normalize) == tokens(reference, normalize))


def f1(prediction: str, reference: str, normalize: str = "squad") -> float:
    """Token-overlap F1 (bag of tokens with multiplicity), as in the SQuAD script."""
    pred, ref = tokens(prediction, normalize), tokens(reference, normalize)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise MissingDependency(
            "ROUGE scores need rouge-score: pip install 'ragctl[eval]'"
        ) from None
    return rouge_scorer.RougeScorer(list(ROUGE_SCORES), use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, Porter stemmer)."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_SCORES}


# -- a dataset's scores ------------------------------------------------------------------------


def resolve_metric(card_or_metric: DatasetCard | Metric | str) -> Metric:
    """The `metric` section to score with: a card's, a `Metric` as given, a dataset name's
    card's, or a one-score metric for a bare score name (`f1`: SQuAD normalisation; `rougeL`:
    ROUGE tokenisation; best over the references)."""
    if isinstance(card_or_metric, DatasetCard):
        return card_or_metric.metric
    if isinstance(card_or_metric, Metric):
        return card_or_metric
    if card_or_metric in ANSWER_SCORES:
        return Metric(
            scores=(card_or_metric,),  # type: ignore[arg-type]
            primary=card_or_metric,  # type: ignore[arg-type]
            normalize="rouge" if card_or_metric in ROUGE_SCORES else "squad",
            references="any",
            description=f"{card_or_metric} alone",
        )
    if card_or_metric in dataset_names():
        return load_card(card_or_metric).metric
    raise InvalidRequest(
        f"{card_or_metric!r} is neither a dataset ({', '.join(dataset_names())}) nor a score "
        f"({', '.join(ANSWER_SCORES)})"
    )


def primary_metric(card_or_metric: DatasetCard | Metric | str) -> str:
    """The score a dataset is optimised and reported on first (its card's `metric.primary`)."""
    return resolve_metric(card_or_metric).primary


def references(metric: Metric, query: Query) -> tuple[str, ...]:
    """The query's reference answers as scored: `strip_reference` removed, ends trimmed."""
    if metric.strip_reference is None:
        return tuple(query.answers)
    pattern = re.compile(metric.strip_reference)
    return tuple(pattern.sub("", ref).strip() for ref in query.answers)


def score(
    card_or_metric: DatasetCard | Metric | str, prediction: str, query: Query
) -> dict[str, float | None]:
    """The card's answer scores for `prediction`, in the card's order, each in [0, 1].

    Several references combine per score: the best (`references: any`) or the mean (`all`).
    A query marked `answerable: false` scores 1.0 for an abstention and 0.0 otherwise; a query
    with no references scores None (left out of means)."""
    metric = resolve_metric(card_or_metric)
    if query.extra.get("answerable") is False:
        return dict.fromkeys(metric.scores, float(is_abstention(prediction)))
    refs = references(metric, query)
    if not refs:
        return dict.fromkeys(metric.scores, None)
    per_ref = [_score_one(metric, prediction, ref) for ref in refs]
    combine = max if metric.references == "any" else _mean
    return {name: combine([s[name] for s in per_ref]) for name in metric.scores}


def _score_one(metric: Metric, prediction: str, reference: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if "em" in metric.scores:
        out["em"] = exact_match(prediction, reference, metric.normalize)
    if "f1" in metric.scores:
        out["f1"] = f1(prediction, reference, metric.normalize)
    if any(name in ROUGE_SCORES for name in metric.scores):
        out.update(rouge(prediction, reference))
    return out


# -- evidence ----------------------------------------------------------------------------------


def evidence_recall(gold_doc_ids: Iterable[str], used_doc_ids: Iterable[str]) -> float | None:
    """The fraction of gold documents among the documents of the chunks the configuration
    used (`Answer.chunks`, or their `doc_ids`); None when there are no gold documents."""
    gold = set(gold_doc_ids)
    if not gold:
        return None
    return len(gold & set(used_doc_ids)) / len(gold)


def evidence_scores(
    card_or_evidence: DatasetCard | Evidence | str, query: Query, used_doc_ids: Iterable[str]
) -> dict[str, float | None]:
    """`evidence_recall`, and `evidence_hit`: 1.0 when the used chunks hold what the card's
    `evidence.needs` asks (any one gold document, or all of them). Both None without gold."""
    if isinstance(card_or_evidence, DatasetCard):
        evidence = card_or_evidence.evidence
    elif isinstance(card_or_evidence, Evidence):
        evidence = card_or_evidence
    else:
        evidence = load_card(card_or_evidence).evidence
    recall = evidence_recall(query.gold_doc_ids, used_doc_ids)
    if recall is None:
        return dict.fromkeys(EVIDENCE_SCORES, None)
    hit = recall == 1.0 if evidence.needs == "all" else recall > 0.0
    return {"evidence_recall": recall, "evidence_hit": float(hit)}


# -- aggregation -------------------------------------------------------------------------------


def mean_scores(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float]:
    """The mean of every score over the rows that have it (None and missing keys are left
    out); keys in order of first appearance, a key no row has a value for is omitted."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, value in row.items():
            bucket = values.setdefault(name, [])
            if value is not None:
                bucket.append(float(value))
    return {name: _mean(v) for name, v in values.items() if v}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
