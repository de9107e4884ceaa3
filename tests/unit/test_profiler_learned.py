"""The learned profiler: its features, learning a separable problem (held-out accuracy), numpy
predictions equal to sklearn's, constant fields, the JSON round trip and its errors; the state
store (labels.jsonl, torn lines, refit, status) and choose_profiler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ragctl.errors import InvalidRequest, ProfilerStateError
from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.profiler.calibration import Calibration, decision_confidence
from ragctl.profiler.labels import OutcomeLabel
from ragctl.profiler.learned import (
    FEATURES_VERSION,
    SCORE_FEATURES,
    LearnedProfiler,
    query_features,
    time_predictions,
)
from ragctl.profiler.store import (
    LABELS_FILE,
    LabelRecord,
    ProfilerState,
    choose_profiler,
    slug,
)
from ragctl.types import Config

DIM = 16
CONFIGS = ["map_rerank:3", "stuff:6", "map_reduce:9:100"]
"""Three kinds of query: one fact (pieces 1), joint-simple (pieces 2), joint-complex (pieces 3,
summary medium)."""


def separable(n: int, seed: int = 0) -> tuple[np.ndarray, list[OutcomeLabel]]:
    """Queries whose embedding sits near one of three centres, one per configuration."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, DIM)) * 3
    X, labels = [], []
    for i in range(n):
        k = i % 3
        emb = centres[k] + rng.normal(size=DIM) * 0.5
        scores = sorted(rng.uniform(0.2, 0.9, size=10), reverse=True)
        X.append(query_features(emb, scores, f"Who was Person {i}?"))
        labels.append(OutcomeLabel.of(f"q{i}", Config.parse(CONFIGS[k]), 1.0, "gold"))
    return np.array(X), labels


@pytest.fixture(scope="module")
def fitted() -> tuple[LearnedProfiler, np.ndarray, list[OutcomeLabel]]:
    X, labels = separable(150)
    return LearnedProfiler.fit(X, labels, folds=5, seed=0, embedder="test", created="t"), X, labels


# -- features -----------------------------------------------------------------------------------


def test_query_features_order_and_values():
    emb = np.array([3.0, 4.0])
    f = query_features(emb, [0.5, 0.9, 0.7], 'Where did "Barack Obama" study in New York?')
    assert f.shape == (2 + len(SCORE_FEATURES),)
    assert f[:2] == pytest.approx([0.6, 0.8])
    top = np.array([0.9, 0.7, 0.5] + [0.0] * 7)
    extra = dict(zip(SCORE_FEATURES, f[2:], strict=True))
    assert extra["top1"] == pytest.approx(0.9)
    assert extra["top3_mean"] == pytest.approx(0.7)
    assert extra["top10_mean"] == pytest.approx(0.21)
    assert extra["gap_1_2"] == pytest.approx(0.2)
    assert extra["gap_2_3"] == pytest.approx(0.2)
    assert extra["top10_std"] == pytest.approx(top.std())
    assert extra["log1p_words"] == pytest.approx(math.log1p(8))
    assert extra["capitalised_words"] == 4  # Barack, Obama, New, York (not Where)
    assert FEATURES_VERSION == 1


def test_query_features_edge_cases():
    f = query_features(np.zeros(4), [], "")
    assert np.all(f == 0.0) and f.shape == (4 + len(SCORE_FEATURES),)
    many = query_features(np.ones(4), list(range(20)), "what?")
    assert many[4] == 19.0  # top-1 of the sorted scores; only the top 10 count
    assert many[4 + 2] == pytest.approx(np.mean(range(10, 20)))


# -- fitting ------------------------------------------------------------------------------------


def test_learns_a_separable_problem(fitted):
    model, X, labels = fitted
    assert model.n_samples == 150 and model.dim == DIM + len(SCORE_FEATURES)
    for name in ("joint", "complexity", "pieces", "summary"):
        assert model.heldout_accuracy[name] is not None
        assert model.heldout_accuracy[name] > 0.9, name
    assert model.fields["summary"].kind == "constant"  # every map_reduce label is medium
    b = model.predict(X[2])
    assert b.joint > 0.5 and b.complexity_high > 0.5
    assert b.to_profile(None).pieces == 3
    assert b.to_profile(None).summary_length == (60, 120)
    assert len(model.heldout_beliefs) == 150
    acc = np.mean([(hb.joint >= 0.5) == lab.joint for hb, lab in
                   zip(model.heldout_beliefs, labels, strict=True)])  # fmt: skip
    assert acc == pytest.approx(model.heldout_accuracy["joint"])
    # held-out beliefs calibrate like the LLM's
    cal = Calibration.fit(model.heldout_beliefs, labels, profiler="learned")
    assert cal.fields["joint"].n == 150


def test_numpy_predict_equals_sklearn(fitted):
    model, X, _ = fitted
    rng = np.random.default_rng(1)
    probes = np.vstack([X[:20], rng.normal(size=(20, X.shape[1]))])
    for name in ("joint", "complexity", "pieces"):
        pipe = model.estimators[name]
        assert pipe is not None
        expected = pipe.predict_proba(probes)
        classes = list(pipe[-1].classes_)
        for x, want in zip(probes, expected, strict=True):
            got = model.fields[name].proba(x)
            assert np.allclose(got[classes], want, atol=1e-9, rtol=0)
            assert got.sum() == pytest.approx(1.0)
    p50, p99 = time_predictions(model, X, n=1000)
    assert 0 < p50 <= p99


def test_constant_class_field():
    X, _ = separable(30)
    labels = [OutcomeLabel.of(f"q{i}", Config.parse("stuff:6"), 1.0, "gold") for i in range(30)]
    model = LearnedProfiler.fit(X, labels, folds=3)
    joint = model.fields["joint"]
    assert joint.kind == "constant"
    assert joint.prior == pytest.approx([1 / 32, 31 / 32])  # Laplace-smoothed
    b = model.predict(X[0])
    assert b.joint == pytest.approx(31 / 32)
    assert b.pieces[1] == pytest.approx(31 / 39)
    assert b.summary == pytest.approx((1 / 3, 1 / 3, 1 / 3))  # no map_reduce label at all
    assert model.heldout_accuracy["joint"] == 1.0
    assert model.heldout_accuracy["summary"] is None
    assert model.confidence(b) == decision_confidence(b)


def test_fit_rejects_bad_shapes():
    X, labels = separable(10)
    with pytest.raises(InvalidRequest):
        LearnedProfiler.fit(X[:5], labels)
    with pytest.raises(InvalidRequest):
        LearnedProfiler.fit(np.zeros((0, 20)), [])
    model = LearnedProfiler.fit(X, labels, folds=2)
    with pytest.raises(InvalidRequest, match="takes 24 features, got 3"):
        model.predict(np.zeros(3))


# -- the file -----------------------------------------------------------------------------------


def test_round_trip(fitted, tmp_path):
    model, X, _ = fitted
    path = model.save(tmp_path / "learned.json")
    back = LearnedProfiler.load(path)
    assert back.dim == model.dim and back.n_samples == 150 and back.embedder == "test"
    assert back.heldout_accuracy == model.heldout_accuracy
    for x in X[:10]:
        assert back.predict(x) == model.predict(x)  # JSON floats round-trip exactly


def corrupt(tmp_path, text: str) -> str:
    path = tmp_path / "learned.json"
    path.write_text(text)
    with pytest.raises(ProfilerStateError) as info:
        LearnedProfiler.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_corrupt_files(fitted, tmp_path):
    model, _, _ = fitted
    text = model.save(tmp_path / "good.json").read_text()
    assert "not valid JSON" in corrupt(tmp_path, text[:-200])
    assert "version 9" in corrupt(tmp_path, text.replace('"version": 1', '"version": 9'))
    data = json.loads(text)
    data["features_version"] = 0
    assert "features version 0" in corrupt(tmp_path, json.dumps(data))
    data = json.loads(text)
    del data["dim"]
    assert "missing key 'dim'" in corrupt(tmp_path, json.dumps(data))
    data = json.loads(text)
    data["fields"]["joint"]["coef"] = [[1.0, 2.0]]
    assert "wrong shape" in corrupt(tmp_path, json.dumps(data))
    data = json.loads(text)
    del data["fields"]["pieces"]
    assert "fields must be" in corrupt(tmp_path, json.dumps(data))


# -- choose_profiler ----------------------------------------------------------------------------


def test_choose_profiler():
    assert choose_profiler(0.8, 0.85, learned_samples=50) == "learned"
    assert choose_profiler(0.8, 0.8, learned_samples=50) == "learned"  # ties go to the free one
    assert choose_profiler(0.9, 0.85, learned_samples=50) == "llm"
    assert choose_profiler(0.5, 0.99, learned_samples=10) == "llm"  # too few samples
    assert choose_profiler(0.5, 0.99, learned_samples=10, min_samples=5) == "learned"
    assert choose_profiler(None, 0.99, learned_samples=50) == "llm"  # nothing to compare with
    assert choose_profiler(0.8, None, learned_samples=0) == "llm"
    assert choose_profiler(0.1, 0.99, "llm", learned_samples=50) == "llm"
    assert choose_profiler(0.99, 0.1, "learned", learned_samples=50) == "learned"
    assert choose_profiler(0.99, None, "learned") == "llm"  # no learned model
    with pytest.raises(ValueError):
        choose_profiler(0.5, 0.5, "best")  # type: ignore[arg-type]


# -- the store ----------------------------------------------------------------------------------


def test_state_folder_and_slugs(tmp_path):
    state = ProfilerState.at(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", "squad")
    assert state.folder == tmp_path / "profiler" / "HuggingFaceTB-SmolLM2-135M-Instruct" / "squad"
    assert slug("a b//c") == "a-b-c" and slug("///") == "default"


def test_store_append_read_refit_status(tmp_path):
    X, labels = separable(60)
    rng = np.random.default_rng(2)
    records = []
    for i, (x, lab) in enumerate(zip(X, labels, strict=True)):
        right = i % 5 != 0  # the LLM gets one query in five wrong
        j = float(np.clip((0.75 if lab.joint == right else 0.35) + rng.normal() * 0.05, 0, 1))
        b = FieldBeliefs(j, 0.3, tuple([1 / 9] * 9), (0.2, 0.5, 0.3))
        records.append(LabelRecord(lab, f"question {lab.query_id}", tuple(x), b))
    state = ProfilerState.at(tmp_path, "m/x", "c")
    assert state.records() == []
    status = state.status()
    assert status.samples == 0 and status.in_use == "llm" and status.llm_calibrated == ()

    assert state.append(records[:30]) == 30
    with state.labels_path.open("a") as f:  # an interrupted append: a torn last line
        f.write('{"query_id": "q99", "conf')
    assert len(state.records()) == 30
    state.append(records[30:])
    assert [r.label.query_id for r in state.records()] == [r.label.query_id for r in records]
    assert state.records()[5] == records[5]

    calibration, learned, learned_cal = state.refit(embedder="test")
    assert learned is not None and learned_cal is not None
    assert state.calibration_path.exists() and state.learned_path.exists()
    status = state.status()
    assert status.samples == 60 and status.with_beliefs == 60 and status.with_features == 60
    joint = next(f for f in status.fields if f.name == "joint")
    assert joint.n == 60
    assert joint.llm_accuracy == pytest.approx(calibration.fields["joint"].accuracy)
    assert joint.llm_accuracy == pytest.approx(0.8)
    assert joint.learned_accuracy > 0.9
    assert status.in_use == "learned" and status.learned_samples == 60
    assert state.status(setting="llm").in_use == "llm"
    assert state.load_calibration() == calibration


def test_store_relabel_and_bad_rows(tmp_path):
    state = ProfilerState.at(tmp_path, "m", "c")
    first = OutcomeLabel.of("q1", Config.parse("stuff:3"), 1.0, "golden")
    again = OutcomeLabel.of("q1", Config.parse("map_rerank:1"), 0.7, "golden")
    state.append([LabelRecord(first), LabelRecord(again)])
    assert [r.label for r in state.records()] == [again]
    with (state.folder / LABELS_FILE).open("a") as f:
        f.write(json.dumps({"query_id": "q2"}) + "\n")
    with pytest.raises(ProfilerStateError, match=r"line 3 is not a label \(missing key"):
        state.records()
