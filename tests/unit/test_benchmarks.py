"""The pure parts of the benchmarks: sampling, agreement tables, percentiles, and the overhead
run over the real rules, tokenizer and scheduler (no engine)."""

from __future__ import annotations

import pytest

from ragctl.benchmarks import (
    AgreementRow,
    agreement_tables,
    annotated_class,
    overhead_run,
    percentile,
    spread_by_class,
)
from ragctl.rules import load_rules
from ragctl.synthesis.methods import Synthesizer
from ragctl.types import Chunk, Profile, Query


def q(i: int, hops: int) -> Query:
    return Query(f"q{i}", f"question {i}?", extra={"hops": hops})


def test_percentile_interpolates() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)
    assert percentile([5.0], 0.99) == 5.0


def test_spread_by_class_covers_every_class_in_file_order() -> None:
    queries = [q(i, 2) for i in range(10)] + [q(10 + i, 3) for i in range(3)] + [q(20, 4)]
    picked = spread_by_class("musique", queries, 6)
    assert [p.id for p in picked] == ["q0", "q10", "q20", "q1", "q11", "q2"]
    assert len(spread_by_class("musique", queries, 100)) == len(queries)


def test_agreement_tables_count_predictions_per_class() -> None:
    def profile(joint: bool, pieces: int) -> Profile:
        return Profile("high" if joint else "low", joint, pieces, (30, 60), 0.8)

    rows = [
        AgreementRow("a", "2-hop", profile(True, 2), None, 1.0),
        AgreementRow("b", "2-hop", profile(False, 1), None, 1.0),
        AgreementRow("c", "3-hop", profile(True, 5), None, 2.0),
        AgreementRow("d", "3-hop", None, "timeout: 30s", 3.0),
    ]
    t = agreement_tables("musique", rows)
    assert t["queries"] == 4 and t["failed"] == 1
    assert t["joint_agreement"] == pytest.approx(2 / 3) and t["joint_scored"] == 3
    assert t["tables"]["joint"] == {"2-hop": {"yes": 1, "no": 1}, "3-hop": {"yes": 1, "failed": 1}}
    assert t["tables"]["pieces"]["3-hop"] == {"4+": 1, "failed": 1}
    assert t["mean_seconds"] == pytest.approx(1.75)
    # SQuAD is single-fact: joint reasoning is the wrong answer there.
    squad = agreement_tables("squad", [AgreementRow("e", "single-fact", profile(True, 3), None, 1)])
    assert squad["joint_agreement"] == 0.0
    assert annotated_class("finsec", Query("x", "?", extra={"question_type": "Multi-Doc RAG"})) == (
        "Multi-Doc RAG"
    )


def test_overhead_run_decides_and_releases_everything(tokenizer) -> None:
    pool = [
        Chunk(f"d{i}::0", f"d{i}", f"Paragraph {i} about rivers and bridges. " * 5,
              title=f"Doc {i % 7}", n_tokens=60)
        for i in range(60)
    ]  # fmt: skip
    result = overhead_run(Synthesizer(tokenizer, 4096, 32), load_rules(), pool, decisions=60)
    assert sum(result["reasons"].values()) == 60
    assert result["ledger_reserved_after"] == 0
    assert result["chunks_per_decision"] == 30
    assert 0 < result["policy_ms"]["p50"] <= result["policy_ms"]["p99"]
