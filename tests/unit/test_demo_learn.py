"""`ragctl demo` learns a collection's profiler state on first use, and only then."""

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
