"""Evaluation scores: SQuAD/MuSiQue EM and F1 against hand-computed values, ROUGE sanity, FinSec
reference cleaning, evidence recall edge cases, means, and properties (hypothesis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragctl.errors import InvalidRequest
from ragctl.evaluation.metrics import (
    ANSWER_SCORES,
    evidence_recall,
    evidence_scores,
    exact_match,
    f1,
    is_abstention,
    mean_scores,
    normalize_answer,
    primary_metric,
    references,
    resolve_metric,
    rouge,
    score,
    tokens,
)
from ragctl.retrieval.collection import load_card, load_queries
from ragctl.types import Query

# -- SQuAD normalisation, EM, F1 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Denver Broncos!", "denver broncos"),
        ("Denver Broncos", "denver broncos"),
        ("  a  Cat's   HAT. ", "cats hat"),
        ("an apple and the pear", "apple and pear"),  # "and" keeps its "an"
        ("Theatre anthem", "theatre anthem"),  # articles only as whole words
        ("24–10", "24–10"),  # the en dash is not ASCII punctuation
        ("Levi’s", "levi’s"),  # nor is the curly apostrophe (official behaviour)
        ("Zürich", "zürich"),
        ("", ""),
        ("The.", ""),
    ],
)
def test_normalize_answer_is_squads(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match_after_normalisation() -> None:
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    assert exact_match("ZÜRICH", "zürich") == 1.0
    assert exact_match("北京", "北京") == 1.0


def test_f1_by_hand() -> None:
    # pred {denver}, gold {denver, broncos}: P=1, R=1/2 -> 2/3
    assert f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    # pred {cat, sat, on, mat}, gold {cat, on, mat}: P=3/4, R=1 -> 6/7
    assert f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    # multiplicity: pred [x, x, y], gold [x, y]: 2 shared, P=2/3, R=1 -> 0.8
    assert f1("x x y", "x y") == pytest.approx(0.8)
    assert f1("Carolina Panthers", "Denver Broncos") == 0.0
    # curly vs straight apostrophe are different tokens in the official script
    assert f1("Levi’s Stadium", "Levi's Stadium") == pytest.approx(0.5)


def test_empty_sides() -> None:
    assert f1("", "Denver") == 0.0
    assert f1("Denver", "") == 0.0
    # SQuAD 2.0 / MuSiQue convention: both empty after normalisation agree fully
    assert f1("the", "a") == 1.0 and exact_match("the", "a") == 1.0


def test_other_normalisations() -> None:
    assert tokens("Net sales: $81,797 million", "rouge") == ["net", "sales", "81", "797", "million"]
    assert tokens("The Cat.", "none") == ["The", "Cat."]
    assert exact_match("The Cat", "the cat", "none") == 0.0
    with pytest.raises(InvalidRequest):
        tokens("x", "lower")


def test_squad_score_takes_the_best_annotator() -> None:
    query = Query(
        "56be4db0acb8001400a502ec",
        "Which NFL team won Super Bowl 50?",
        ("Denver Broncos", "Denver Broncos", "Broncos"),
    )
    assert score("squad", "The Broncos", query) == {"em": 1.0, "f1": 1.0}
    assert score("squad", "Denver", query) == {"em": 0.0, "f1": pytest.approx(2 / 3)}
    assert score("squad", "", query) == {"em": 0.0, "f1": 0.0}


def test_musique_scores_over_answer_and_aliases() -> None:
    # As in queries.jsonl: answers = answer + answer_aliases.
    query = Query(
        "2hop__x",
        "Who?",
        ("A.P.J. Abdul Kalam", "A. P. J. Abdul Kalam", "Abdul Kalam", "Kalam"),
        extra={"answer": "A.P.J. Abdul Kalam", "answerable": True},
    )
    assert score("musique", "Abdul Kalam", query) == {"em": 1.0, "f1": 1.0}
    only_answer = Query("2hop__x", "Who?", ("A.P.J. Abdul Kalam",))
    # {abdul, kalam} against {apj, abdul, kalam}: P=1, R=2/3 -> 0.8
    assert score("musique", "Abdul Kalam", only_answer) == {"em": 0.0, "f1": pytest.approx(0.8)}


def test_unanswerable_queries_reward_abstention() -> None:
    query = Query("q", "?", ("Stanley",), extra={"answerable": False})
    for said in ("unanswerable", "Unanswerable.", "I don't know", ""):
        assert score("musique", said, query) == {"em": 1.0, "f1": 1.0}, said
    assert score("musique", "Stanley", query) == {"em": 0.0, "f1": 0.0}
    # Against a real reference an abstention is just a wrong answer...
    assert score("squad", "unanswerable", Query("q", "?", ("Stanley",)))["f1"] == 0.0
    # ... and a hedged answer is no abstention.
    assert not is_abstention("unanswerable, but probably Stanley")
    assert is_abstention("  Unknown! ")


def test_a_query_without_references_is_not_scored() -> None:
    assert score("squad", "anything", Query("q", "?")) == {"em": None, "f1": None}


# -- ROUGE and the long-answer sets ------------------------------------------------------------


def test_rouge_known_values() -> None:
    assert rouge("alpha beta gamma delta", "alpha beta gamma delta") == {
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
    }
    assert rouge("alpha beta", "gamma delta") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # same unigrams; bigrams {ab, bd, dc} vs {ab, bc, cd}: 1/3; LCS 3 of 4: 0.75
    got = rouge("alpha beta delta gamma", "alpha beta gamma delta")
    assert got == {"rouge1": 1.0, "rouge2": pytest.approx(1 / 3), "rougeL": pytest.approx(0.75)}
    # Porter stemming: running/run, dogs/dog
    assert rouge("running dogs", "run dog")["rouge1"] == 1.0
    assert rouge("", "anything")["rougeL"] == 0.0


def test_qmsum_scores_are_rouge() -> None:
    query = Query(
        "Bmr005#specific0",
        "What was agreed?",
        ("The group agreed to mark overlapping speech only.",),
    )
    got = score("qmsum", "They agreed to mark overlapping speech.", query)
    assert list(got) == ["rouge1", "rouge2", "rougeL"]
    assert all(0.0 < v < 1.0 for v in got.values())
    assert score("qmsum", query.answers[0], query) == dict.fromkeys(got, 1.0)


FINSEC_REF = (
    "Apple's total net sales were $81,797 million. (SOURCE: 2023 Q3 AAPL.pdf)\n\n"
    "They decreased from the prior quarter.\n\n"
    'SOURCE(S): "2023 Q2 AAPL.pdf", "2023 Q3 AAPL.pdf"'
)


def test_finsec_strips_the_source_line() -> None:
    metric = resolve_metric("finsec")
    query = Query("finsec-000", "How did sales change?", (FINSEC_REF,))
    # The card's regex removes SOURCE(S) lines; inline "(SOURCE: ...)" citations stay.
    assert references(metric, query) == (
        "Apple's total net sales were $81,797 million. (SOURCE: 2023 Q3 AAPL.pdf)\n\n"
        "They decreased from the prior quarter.",
    )
    body = references(metric, query)[0]
    assert score("finsec", body, query) == {"f1": 1.0, "rougeL": 1.0}
    # A SOURCE(S) line in the middle (several sections) goes too.
    middle = Query("f", "?", ("A rose.\n  SOURCE(S): 2023 Q1 AAPL.pdf, Item 2\nB fell.",))
    assert references(metric, middle) == ("A rose.\n\nB fell.",)


def test_primary_metric_and_metric_resolution() -> None:
    assert {n: primary_metric(n) for n in ("squad", "musique", "qmsum", "finsec")} == {
        "squad": "f1",
        "musique": "f1",
        "qmsum": "rougeL",
        "finsec": "rougeL",
    }
    card = load_card("qmsum")
    assert primary_metric(card) == primary_metric(card.metric) == "rougeL"
    assert resolve_metric("rouge2").scores == ("rouge2",)
    assert score("em", "Broncos", Query("q", "?", ("the Broncos",))) == {"em": 1.0}
    with pytest.raises(InvalidRequest, match="neither a dataset"):
        resolve_metric("bleu")


def test_every_card_scores_its_own_references_perfectly(data_dir: Path) -> None:
    for name in ("squad", "musique", "qmsum", "finsec"):
        card = load_card(name)
        for query in load_queries(data_dir, name)[:5]:
            best = references(card.metric, query)[0]
            got = score(card, best, query)
            assert set(got) == set(card.metric.scores)
            assert got[primary_metric(card)] == 1.0, (name, query.id)


# -- evidence ----------------------------------------------------------------------------------


def test_evidence_recall_edge_cases() -> None:
    assert evidence_recall([], ["a"]) is None
    assert evidence_recall(["a", "b"], []) == 0.0
    assert evidence_recall(["a", "b"], ["a", "c", "a"]) == 0.5
    assert evidence_recall(["a", "a"], ["a"]) == 1.0  # gold ids are a set
    assert evidence_recall(("x",), iter(["x"])) == 1.0


def test_evidence_hit_follows_the_cards_needs() -> None:
    two = Query("q", "?", ("x",), gold_doc_ids=("p1", "p2"))
    assert evidence_scores("musique", two, ["p1"]) == {"evidence_recall": 0.5, "evidence_hit": 0.0}
    assert evidence_scores("musique", two, ["p2", "p1"])["evidence_hit"] == 1.0
    assert evidence_scores(load_card("squad"), two, ["p1"])["evidence_hit"] == 1.0
    assert evidence_scores("squad", two, ["p3"])["evidence_hit"] == 0.0
    assert evidence_scores("squad", Query("q", "?"), ["p1"]) == {
        "evidence_recall": None,
        "evidence_hit": None,
    }


# -- aggregation -------------------------------------------------------------------------------


def test_mean_scores_ignores_none() -> None:
    rows = [
        {"f1": 1.0, "em": 1.0, "evidence_recall": None},
        {"f1": 0.5, "em": 0.0, "evidence_recall": 0.5},
        {"f1": None, "em": None, "evidence_recall": 1.0},
        {"f1": 0.0, "em": 0.0, "only_none": None},
    ]
    assert mean_scores(rows) == {"f1": 0.5, "em": pytest.approx(1 / 3), "evidence_recall": 0.75}
    assert list(mean_scores(rows)) == ["f1", "em", "evidence_recall"]
    assert mean_scores([]) == {}


# -- properties --------------------------------------------------------------------------------

WORDS = ["the", "a", "An", "cat", "Cat!", "dog", "dogs", "running", "42", "Zürich", "北京", "’s"]
texts = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join),
    st.text(max_size=30),
)


@given(texts, texts)
def test_em_f1_bounds_symmetry_and_em_implies_f1(a: str, b: str) -> None:
    em, score_f1 = exact_match(a, b), f1(a, b)
    assert em in (0.0, 1.0)
    assert 0.0 <= score_f1 <= 1.0
    assert score_f1 == pytest.approx(f1(b, a))
    assert em == exact_match(b, a)
    if em == 1.0:
        assert score_f1 == 1.0
    assert f1(a, a) == 1.0 and exact_match(a, a) == 1.0


@given(st.text(max_size=40))
def test_normalisation_is_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@settings(max_examples=50, deadline=None)
@given(texts, texts)
def test_rouge_bounds_and_symmetry(a: str, b: str) -> None:
    ab, ba = rouge(a, b), rouge(b, a)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= ab[name] <= 1.0
        assert ab[name] == pytest.approx(ba[name])


@settings(max_examples=50, deadline=None)
@given(texts, st.lists(texts, min_size=1, max_size=3))
def test_several_references_score_their_best(prediction: str, refs: list[str]) -> None:
    got = score("squad", prediction, Query("q", "?", tuple(refs)))
    assert got["f1"] == max(f1(prediction, r) for r in refs)
    assert got["em"] == max(exact_match(prediction, r) for r in refs)
    assert set(ANSWER_SCORES) >= set(got)
