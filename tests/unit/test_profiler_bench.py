"""The profiler benchmark's pure parts: what the datasets annotate, AUC, confusion tables, one
profiler's figures, the pooled AUC (one score per query, whatever the profilers' rows), and the
training labels read from grid cells."""

from __future__ import annotations

import pytest

from ragctl.evaluation.profiler_bench import (
    auc,
    confusion,
    joint_annotation,
    results,
    summarize_profiler,
)
from ragctl.evaluation.profiler_train import grid_labels
from ragctl.retrieval.collection import load_card
from ragctl.types import Config, Query


def q(**extra) -> Query:
    return Query("id", "question?", extra=extra)


def test_joint_annotation_per_dataset() -> None:
    assert joint_annotation("squad", q()) is False
    assert joint_annotation("musique", q(hops=2)) is True
    assert joint_annotation("finsec", q(question_type="Single-Doc Single-Chunk RAG")) is False
    assert joint_annotation("finsec", q(question_type="Multi-Doc RAG")) is True
    assert joint_annotation("finsec", q()) is None
    assert joint_annotation("qmsum", q(query_type="general")) is True
    assert joint_annotation("qmsum", q(query_type="specific")) is None
    assert joint_annotation("other", q()) is None


def test_auc_and_confusion() -> None:
    assert auc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auc([0.5, 0.6], [True, True]) is None  # one class: undefined
    assert confusion([True, True, False, False], [True, False, True, False]) == {
        "tp": 1, "fp": 1, "fn": 1, "tn": 1,
    }  # fmt: skip


def row(profiler, query_id, *, joint, annotation, profile_s, total_s, scores, error=None):
    return {
        "dataset": "d", "query_id": query_id, "profiler": profiler, "annotation": annotation,
        "scores": scores, "error": error, "profile_s": profile_s, "total_s": total_s,
        "answered_by": profiler, "profile_used": True, "joint": joint, "config": "stuff:3",
        "note": "",
    }  # fmt: skip


def test_summarize_profiler_shares_agreement_and_errors() -> None:
    rows = [
        row("llm", "a", joint=True, annotation=True, profile_s=1.0, total_s=4.0, scores={}),
        row("llm", "b", joint=True, annotation=False, profile_s=1.0, total_s=2.0, scores={}),
        row("llm", "c", joint=None, annotation=None, profile_s=0.0, total_s=0.0, scores={},
            error="EngineError: down"),
    ]  # fmt: skip
    s = summarize_profiler(rows)
    assert s["errors"] == 1 and s["seconds"]["n"] == 2
    assert s["share"]["mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert s["joint_agreement"] == 0.5
    assert s["confusion"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 0}


def test_pooled_auc_counts_each_query_once() -> None:
    samples = []
    for i, (p, truth) in enumerate([(0.9, True), (0.8, True), (0.3, False), (0.1, False)]):
        scores = {"llm_raw": p, "learned": None}
        for name in ("json", "llm", "learned"):
            samples.append(row(name, f"q{i}", joint=not truth, annotation=truth, profile_s=0.1,
                               total_s=1.0, scores=scores))  # fmt: skip
    out = results(samples, [0.001, 0.002])
    assert out["auc_queries"] == 4  # not 12: three rows per query
    assert out["auc_joint"]["llm_raw"] == 1.0
    assert out["auc_joint"]["json"] == 0.0  # its yes/no was always wrong
    assert "learned" not in out["auc_joint"]
    assert out["learned_predict_s"]["n"] == 2


class FakeStore:
    def __init__(self, rows):
        self._rows = rows

    def rows(self, query_ids=None):
        return [r for r in self._rows if query_ids is None or r["query_id"] in set(query_ids)]


def cell(query_id, config, f1, delay, answer="x"):
    return {"query_id": query_id, "config": config, "error": None, "answer": answer,
            "scores": {"f1": f1}, "delay_s": delay, "tokens": {"prompt": 10},
            "primary": "f1"}  # fmt: skip


def test_grid_labels_take_the_cheapest_agreeing_configuration() -> None:
    card = load_card("squad")
    store = FakeStore([
        cell("a", "map_rerank:1", 0.0, 1.0), cell("a", "stuff:3", 1.0, 2.0),
        cell("a", "map_reduce:6:50", 1.0, 6.0), cell("a", "stuff:9", 1.0, 0.5),  # not asked
        cell("b", "map_rerank:1", 0.95, 1.0), cell("b", "stuff:3", 1.0, 2.0),
        cell("b", "map_reduce:6:50", 0.0, 6.0),
        cell("c", "map_rerank:1", 0.0, 1.0), cell("c", "stuff:3", 0.0, 2.0),
    ])  # fmt: skip
    configs = [Config.parse(c) for c in ("map_rerank:1", "stuff:3", "map_reduce:6:50")]
    queries = [Query(i, "?") for i in "abc"]
    labels = grid_labels(card, store, queries, configs, "gold")
    assert labels["a"].config == Config("stuff", 3)  # stuff:9 is cheaper but not a label config
    assert labels["b"].config == Config("map_rerank", 1)  # 0.95 >= 0.9 x best
    assert "c" not in labels  # nothing scored
    golden = grid_labels(card, store, queries, configs, "golden")
    # golden: map_reduce:6:50 (largest mean delay) is the reference; identical answers agree.
    assert golden["a"].config == Config("map_rerank", 1)


def test_profile_only_rows_have_seconds_and_agreement_but_no_share() -> None:
    rows = [
        {"error": None, "profile_s": 0.2, "total_s": None, "annotation": True, "joint": True,
         "answered_by": "llm", "profile_used": False, "config": None},
        {"error": None, "profile_s": 0.4, "total_s": None, "annotation": False, "joint": True,
         "answered_by": "llm", "profile_used": False, "config": None},
    ]  # fmt: skip
    s = summarize_profiler(rows)
    assert s["seconds"]["mean"] == pytest.approx(0.3) and s["seconds"]["n"] == 2
    assert s["share"]["n"] == 0 and s["share"]["mean"] is None
    assert s["delay_s"]["n"] == 0 and s["configs"] == {}
    assert s["joint_agreement"] == 0.5
    assert s["confusion"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 0}
