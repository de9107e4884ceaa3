"""Outcome labels: the fields a configuration stands for, golden-mode agreement (token F1 with
the golden answer), gold-mode agreement (a fraction of the best quality), no label when every
configuration scored 0, the cheapest-first order and its tie-breaks, grid cell dicts."""

from __future__ import annotations

import pytest

from ragctl.errors import InvalidRequest
from ragctl.evaluation import metrics
from ragctl.profiler.labels import (
    GridCell,
    OutcomeLabel,
    f1_or_rouge_l,
    grid_cells,
    label_query,
    labels_from_grid,
    pieces_of,
    summary_bucket,
    token_f1,
)
from ragctl.types import Config

C = Config.parse


def cell(answer="x", quality=1.0, delay=1.0, tokens=100, failed=False) -> GridCell:
    return GridCell(answer=answer, quality=quality, delay_s=delay, prompt_tokens=tokens,
                    failed=failed)  # fmt: skip


def test_fields_of_a_configuration():
    rerank = OutcomeLabel.of("q", C("map_rerank:3"), 1.0, "gold")
    assert (rerank.joint, rerank.complexity_high, rerank.pieces, rerank.summary) == (
        False, False, 1, None,
    )  # fmt: skip
    stuff = OutcomeLabel.of("q", C("stuff:6"), 1.0, "gold")
    assert (stuff.joint, stuff.complexity_high, stuff.pieces, stuff.summary) == (
        True, False, 2, None,
    )  # fmt: skip
    mr = OutcomeLabel.of("q", C("map_reduce:9:100"), 1.0, "gold")
    assert (mr.joint, mr.complexity_high, mr.pieces, mr.summary) == (True, True, 3, 1)


@pytest.mark.parametrize(
    ("chunks", "pieces"), [(1, 1), (2, 1), (3, 1), (4, 2), (6, 2), (7, 3), (12, 4), (30, 9)]
)
def test_pieces_is_the_smallest_n_whose_range_holds_the_chunks(chunks, pieces):
    assert pieces_of(chunks) == pieces
    assert pieces <= chunks <= 3 * pieces or pieces == 9


@pytest.mark.parametrize(
    ("ilen", "bucket"), [(10, 0), (30, 0), (50, 0), (59, 0), (60, 1), (100, 1), (120, 2), (500, 2)]
)
def test_summary_buckets(ilen, bucket):
    assert summary_bucket(ilen) == bucket


def test_token_f1_is_the_evaluation_f1():
    pairs = [
        ("Santa Clara", "santa clara, California"),
        ("The Broncos", "Denver Broncos"),
        ("", ""),
        ("", "x"),
        ("a an the", "the"),
        ("1,000 people!", "1000 people"),
        ("x x y", "x y y"),
    ]
    for a, b in pairs:
        assert token_f1(a, b) == pytest.approx(metrics.f1(a, b))


def test_f1_or_rouge_l_is_at_least_token_f1():
    a, b = "the players were running quickly", "a player runs quickly"
    assert f1_or_rouge_l(a, b) >= token_f1(a, b)
    assert f1_or_rouge_l(a, b) > token_f1(a, b)  # the stemmer matches player/players
    assert f1_or_rouge_l("same", "same") == 1.0


# -- golden mode ----------------------------------------------------------------------------------

GOLDEN = C("stuff:12")


def test_golden_mode_the_cheapest_agreeing_configuration():
    cells = {
        GOLDEN: cell("Santa Clara, California", delay=5.0),
        C("map_rerank:1"): cell("Levi's Stadium", delay=0.5),  # disagrees
        C("stuff:3"): cell("Santa Clara", delay=1.0),  # F1 0.8
        C("stuff:6"): cell("in Santa Clara California", delay=2.0),
    }
    label = label_query("q1", cells, mode="golden", golden=GOLDEN)
    assert label is not None
    assert label.config == C("stuff:3")
    assert label.agreement == pytest.approx(0.8)
    assert label.source == "golden"
    assert label.query_id == "q1"


def test_golden_mode_the_golden_configuration_always_agrees():
    cells = {GOLDEN: cell("Santa Clara", delay=5.0), C("stuff:1"): cell("no idea", delay=0.1)}
    label = label_query("q", cells, mode="golden", golden=GOLDEN)
    assert label is not None and label.config == GOLDEN and label.agreement == 1.0


def test_golden_mode_threshold_and_failed_cells():
    cells = {
        GOLDEN: cell("Santa Clara California", delay=5.0),
        C("stuff:1"): cell("Santa Clara", delay=0.1),  # F1 0.8
        C("map_rerank:1"): cell(None, delay=0.01, failed=True),
    }
    assert label_query("q", cells, mode="golden", golden=GOLDEN).config == C("stuff:1")
    strict = label_query("q", cells, mode="golden", golden=GOLDEN, threshold=0.9)
    assert strict.config == GOLDEN


def test_golden_mode_no_label_without_an_answered_golden_cell():
    cells = {C("stuff:1"): cell("Santa Clara")}
    assert label_query("q", cells, mode="golden", golden=GOLDEN) is None
    failed = {**cells, GOLDEN: cell(None, failed=True)}
    assert label_query("q", failed, mode="golden", golden=GOLDEN) is None
    with pytest.raises(InvalidRequest):
        label_query("q", cells, mode="golden")


def test_golden_mode_custom_similarity():
    cells = {GOLDEN: cell("yes", delay=5.0), C("stuff:1"): cell("no", delay=0.1)}
    label = label_query("q", cells, mode="golden", golden=GOLDEN, similarity=lambda a, b: 1.0)
    assert label.config == C("stuff:1")


# -- gold mode ------------------------------------------------------------------------------------


def test_gold_mode_a_fraction_of_the_best_quality():
    cells = {
        C("map_rerank:1"): cell(quality=0.5, delay=0.1),
        C("stuff:3"): cell(quality=0.95, delay=1.0),
        C("stuff:12"): cell(quality=1.0, delay=4.0),
    }
    label = label_query("q", cells, mode="gold")  # threshold 0.9
    assert label.config == C("stuff:3")
    assert label.agreement == pytest.approx(0.95)
    assert label.source == "gold"
    lax = label_query("q", cells, mode="gold", threshold=0.5)
    assert lax.config == C("map_rerank:1") and lax.agreement == pytest.approx(0.5)


def test_gold_mode_no_label_when_every_configuration_scored_zero():
    cells = {C("stuff:1"): cell(quality=0.0), C("stuff:3"): cell(quality=0.0)}
    assert label_query("q", cells, mode="gold") is None
    unscored = {C("stuff:1"): cell(quality=None)}
    assert label_query("q", unscored, mode="gold") is None


def test_a_label_keeps_every_configuration_tried_and_whether_it_agreed():
    cells = {
        C("stuff:1"): cell(quality=0.9, delay=1.0),
        C("stuff:3"): cell(quality=1.0, delay=2.0),
        C("stuff:9"): cell(quality=0.0, delay=4.0),  # more context, a worse answer
        C("map_rerank:1"): cell(None, quality=0.0, failed=True),
        C("map_rerank:3"): cell(quality=None),  # unscored: says nothing of agreement
    }
    label = label_query("q", cells, mode="gold")
    assert label.config == C("stuff:1")
    assert dict(label.outcomes) == {
        C("stuff:1"): True, C("stuff:3"): True, C("stuff:9"): False, C("map_rerank:1"): False,
    }  # fmt: skip
    golden = label_query("q", {GOLDEN: cell("Denver"), C("stuff:1"): cell("Paris")},
                         mode="golden", golden=GOLDEN)  # fmt: skip
    assert dict(golden.outcomes) == {C("stuff:1"): False}  # the golden one is no evidence


def test_gold_mode_failed_cells_never_agree():
    cells = {
        C("stuff:1"): cell(None, quality=0.0, delay=0.01, failed=True),
        C("stuff:3"): cell(quality=0.4, delay=1.0),
    }
    assert label_query("q", cells, mode="gold", threshold=0.0).config == C("stuff:3")


# -- cheapest, ties --------------------------------------------------------------------------------


def test_ties_broken_by_prompt_tokens_then_config_string():
    cells = {
        C("stuff:3"): cell(delay=1.0, tokens=300),
        C("map_rerank:3"): cell(delay=1.0, tokens=200),
        C("map_rerank:2"): cell(delay=1.0, tokens=200),
    }
    assert label_query("q", cells, mode="gold").config == C("map_rerank:2")
    del cells[C("map_rerank:2")]
    assert label_query("q", cells, mode="gold").config == C("map_rerank:3")
    # a custom cost: prompt tokens only
    cells[C("stuff:3")] = cell(delay=9.0, tokens=10)
    label = label_query("q", cells, mode="gold", cost=lambda x: x.prompt_tokens)
    assert label.config == C("stuff:3")


# -- grid rows ------------------------------------------------------------------------------------


def grid_row(qid, config, answer, f1, delay, prompt=100, error=None):
    return {
        "query_id": qid,
        "config": config,
        "primary": "f1",
        "error": error,
        "answer": answer,
        "scores": {"f1": f1, "em": 0.0, "evidence_recall": 1.0},
        "tokens": None if error else {"calls": 1, "prompt": prompt, "output": 5},
        "stages": [],
        "delay_s": delay,
    }


def test_grid_rows_to_labels():
    rows = [
        grid_row("q1", "map_rerank:1", "Denver", 1.0, 0.2),
        grid_row("q1", "stuff:12", "Denver Broncos", 1.0, 3.0),
        grid_row("q2", "map_rerank:1", None, None, 0.1, error="EngineError: boom"),
        grid_row("q2", "stuff:3", "Paris", 0.0, 1.0),
        grid_row("q2", "map_reduce:6:50", "Lyon", 1.0, 2.0),
        grid_row("q2", "stuff:12", "Lyon France", 0.67, 3.0),
        grid_row("q3", "stuff:1", "x", 0.0, 0.1),
    ]
    cells = grid_cells(rows)
    assert set(cells) == {"q1", "q2", "q3"}
    assert cells["q2"][C("map_rerank:1")].failed
    assert cells["q2"][C("map_rerank:1")].quality == 0.0
    assert cells["q1"][C("stuff:12")].prompt_tokens == 100

    gold = labels_from_grid(cells, mode="gold")
    assert set(gold) == {"q1", "q2"}  # q3 scored 0 everywhere
    assert gold["q1"].config == C("map_rerank:1") and not gold["q1"].joint
    assert gold["q2"].config == C("map_reduce:6:50")
    assert gold["q2"].complexity_high and gold["q2"].summary == 0 and gold["q2"].pieces == 2

    golden = labels_from_grid(cells, mode="golden", golden=GOLDEN)
    assert set(golden) == {"q1", "q2"}  # q3 has no golden cell
    assert golden["q1"].config == C("map_rerank:1")  # F1("Denver", "Denver Broncos") = 0.67
    assert golden["q2"].config == C("map_reduce:6:50")  # "Lyon" vs "Lyon France": 0.67


def test_label_round_trip_and_mismatch():
    label = OutcomeLabel.of("q", C("map_reduce:9:100"), 0.75, "golden")
    assert OutcomeLabel.from_dict(label.to_dict()) == label
    bad = {**label.to_dict(), "pieces": 7}
    with pytest.raises(ValueError, match="pieces"):
        OutcomeLabel.from_dict(bad)
    with pytest.raises(ValueError, match="source"):
        OutcomeLabel.from_dict({**label.to_dict(), "source": "guess"})
    outcomes = {C("stuff:1"): True, C("stuff:9"): False}
    tried = OutcomeLabel.of("q", C("stuff:1"), 1.0, "gold", outcomes)
    assert OutcomeLabel.from_dict(tried.to_dict()) == tried
    assert tried.to_dict()["outcomes"] == {"stuff:1": True, "stuff:9": False}
    # A row kept before outcomes were recorded reads as none.
    old = {k: v for k, v in label.to_dict().items() if k != "outcomes"}
    assert OutcomeLabel.from_dict(old).outcomes == ()
    with pytest.raises(ValueError, match="true or false"):
        OutcomeLabel.from_dict({**tried.to_dict(), "outcomes": {"stuff:1": "yes"}})
    with pytest.raises(ValueError, match="among its disagreeing"):
        OutcomeLabel.from_dict({**tried.to_dict(), "outcomes": {"stuff:1": False}})
