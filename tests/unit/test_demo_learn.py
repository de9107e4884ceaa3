"""`ragctl demo` learns a collection's profiler state on first use, and only then; it ends with
its bottom line beside the fixed configuration (`demo_summary`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ragctl.cli import query
from ragctl.profiler.labels import OutcomeLabel
from ragctl.profiler.store import LabelRecord, ProfilerState
from ragctl.settings import Settings
from ragctl.types import Config


@pytest.fixture
def trained(monkeypatch):
    calls = []

    def fake_train(settings, request, *, progress):
        calls.append(request)
        status = SimpleNamespace(in_use="learned")
        return SimpleNamespace(labelled=20, queries=request.calibration, seconds=1.0, status=status)

    monkeypatch.setattr("ragctl.evaluation.profiler_train.train_profiler", fake_train)
    return calls


def test_first_use_trains_on_the_feedback_budget(tmp_path, trained):
    settings = Settings(cache_dir=tmp_path)
    query._learn_first(settings, "squad", 24)
    [request] = trained
    assert (request.dataset, request.calibration, request.agreement) == ("squad", 24, "gold")
    assert request.configs == settings.feedback_configs


def test_a_collection_with_enough_labels_is_not_trained_again(tmp_path, trained):
    settings = Settings(cache_dir=tmp_path)
    state = ProfilerState.at(tmp_path, settings.profiler_model_key(), "squad")
    state.append(
        LabelRecord(OutcomeLabel.of(f"q{i}", Config("stuff", 3), 1.0, "gold"), "q")
        for i in range(20)
    )
    query._learn_first(settings, "squad", 24)
    assert trained == []


def test_the_json_profiler_and_an_empty_budget_learn_nothing(tmp_path, trained):
    query._learn_first(Settings(cache_dir=tmp_path, profiler="json"), "squad", 24)
    query._learn_first(Settings(cache_dir=tmp_path, feedback_configs=""), "squad", 24)
    assert trained == []


def _answer(text: str, seconds: float, *docs: str) -> SimpleNamespace:
    chunks = [SimpleNamespace(doc_id=d) for d in docs]
    return SimpleNamespace(text=text, timings={"total": seconds}, chunks=chunks)


def test_the_demo_ends_with_time_answer_score_and_evidence_beside_the_fixed_config() -> None:
    """`demo_summary` adds the rows up: seconds, the dataset's primary score (SQuAD: F1) and
    how often a gold document was in context, for each side, and the time ratio."""
    q1 = SimpleNamespace(answers=["Denver Broncos"], gold_doc_ids=["d1"], extra={})
    q2 = SimpleNamespace(answers=["Carolina Panthers"], gold_doc_ids=["d2"], extra={})
    rows = [
        (q1, _answer("The Panthers", 1.0, "d9"), _answer("Denver Broncos", 2.0, "d1", "d9")),
        (q2, _answer("Carolina Panthers", 0.5, "d2"), _answer("the Panthers", 2.0, "d2")),
    ]
    text = query.demo_summary("squad", "stuff:5", rows)
    assert text.startswith("in all, 2 questions: ragctl 1.5 s, f1 0.50, gold in context 1 of 2")
    assert "fixed stuff:5 4.0 s, f1 0.83, gold in context 2 of 2" in text
    assert text.endswith("(ragctl took 0.38x the fixed time)")


def test_the_demo_summary_leaves_out_what_a_collection_cannot_score() -> None:
    q = SimpleNamespace(answers=[], gold_doc_ids=[], extra={})
    rows = [(q, _answer("a", 1.0), _answer("b", 1.0))]
    text = query.demo_summary("squad", "stuff:5", rows)
    assert text == (
        "in all, 1 question: ragctl 1.0 s; fixed stuff:5 1.0 s (ragctl took 1.00x the fixed time)"
    )


def test_the_demo_counts_gold_evidence_as_the_card_does() -> None:
    """MuSiQue's card needs every gold paragraph (`evidence.needs: all`): one of two is not in
    context."""
    q = SimpleNamespace(answers=["x"], gold_doc_ids=["d1", "d2"], extra={})
    rows = [(q, _answer("x", 1.0, "d1"), _answer("x", 1.0, "d1", "d2"))]
    text = query.demo_summary("musique", "stuff:5", rows)
    assert "ragctl 1.0 s, f1 1.00, gold in context 0 of 1" in text
    assert "fixed stuff:5 1.0 s, f1 1.00, gold in context 1 of 1" in text
