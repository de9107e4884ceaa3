"""Calibration: ECE's known values, isotonic maps that fix miscalibrated beliefs (out of fold),
the identity when there is too little feedback, the categorical rescaling, the decision
confidence, and the JSON file's round trip and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragctl.errors import ProfilerStateError, UserError
from ragctl.profiler.beliefs import PIECES_VALUES, FieldBeliefs
from ragctl.profiler.calibration import (
    FIELDS,
    Calibration,
    decision_confidence,
    expected_calibration_error,
    fit_field,
    rescale,
)
from ragctl.profiler.labels import OutcomeLabel
from ragctl.types import Config


def beliefs(joint=0.5, complexity=0.5, pieces=None, summary=(1 / 3, 1 / 3, 1 / 3)):
    pieces = pieces or tuple([1 / 9] * 9)
    return FieldBeliefs(joint, complexity, tuple(pieces), tuple(summary))


def label(config: str, qid: str = "q") -> OutcomeLabel:
    return OutcomeLabel.of(qid, Config.parse(config), 1.0, "gold")


# -- ECE ------------------------------------------------------------------------------------------


def test_ece_known_values():
    assert expected_calibration_error([], []) == 0.0
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == 1.0
    # one bin [0.7, 0.8): mean p 0.75, positives 1/2 -> 0.25
    assert expected_calibration_error([0.75, 0.75], [1, 0]) == pytest.approx(0.25)
    # two bins: {0.2, 0.2} with 0 positives (|0 - 0.2| = 0.2), {0.9} with 1 (0.1); 2/3 and 1/3
    assert expected_calibration_error([0.2, 0.2, 0.9], [0, 0, 1]) == pytest.approx(
        2 / 3 * 0.2 + 1 / 3 * 0.1
    )
    # p = 1.0 falls in the last bin, p = 0.1 in the second
    assert expected_calibration_error([0.1, 1.0], [1, 1], bins=10) == pytest.approx(0.45)
    with pytest.raises(ValueError):
        expected_calibration_error([0.1], [1, 0])


def test_ece_of_calibrated_samples_is_small():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    y = rng.uniform(size=p.size) < p
    assert expected_calibration_error(p, y) < 0.02


# -- binary fields ---------------------------------------------------------------------------------


def miscalibrated(n: int, seed: int = 0):
    """Beliefs whose joint and complexity are true_p ** 3 (far too low), labels drawn from
    true_p."""
    rng = np.random.default_rng(seed)
    true_j, true_c = rng.uniform(size=n), rng.uniform(size=n)
    out_b, out_l = [], []
    for i in range(n):
        joint = rng.uniform() < true_j[i]
        high = joint and rng.uniform() < true_c[i]
        config = "map_reduce:6:50" if high else ("stuff:3" if joint else "map_rerank:3")
        out_b.append(beliefs(joint=true_j[i] ** 3, complexity=true_c[i] ** 3))
        out_l.append(label(config, f"q{i}"))
    return out_b, out_l


def test_isotonic_fit_improves_ece_out_of_fold():
    b, lab = miscalibrated(600)
    cal = Calibration.fit(b, lab, model="m", collection="c", created="t")
    joint = cal.fields["joint"]
    assert joint.calibrated and joint.n == 600
    assert joint.ece_before > 0.15
    assert joint.ece_after < joint.ece_before / 2
    assert joint.ece_after < 0.08
    # the saved map fixes new beliefs too
    b2, lab2 = miscalibrated(2000, seed=1)
    raw = np.array([x.joint for x in b2])
    fixed = np.array([cal.apply(x).joint for x in b2])
    y = np.array([x.joint for x in lab2])
    assert expected_calibration_error(fixed, y) < expected_calibration_error(raw, y) / 2
    assert "joint" in cal.calibrated_fields and "complexity" in cal.calibrated_fields


def test_transform_equals_sklearn_isotonic():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    p = rng.uniform(size=300)
    y = (rng.uniform(size=300) < p**0.5).astype(int)
    f = fit_field("joint", np.column_stack([1 - p, p]), y)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y)
    grid = np.linspace(-0.2, 1.2, 57)
    assert np.allclose([f.transform(v) for v in grid], iso.predict(grid), atol=1e-12)


def test_identity_with_too_few_samples_or_one_class():
    b, lab = miscalibrated(12)
    cal = Calibration.fit(b, lab)
    assert cal.calibrated_fields == ()
    assert "too few samples (12 < 20)" in cal.fields["joint"].note
    assert cal.fields["joint"].ece_before == cal.fields["joint"].ece_after
    for x in b:
        assert cal.apply(x) == x
    # enough samples, but every label is joint: nothing to calibrate joint against
    same = [beliefs(joint=0.3 + 0.005 * i) for i in range(30)]
    labels = [label("stuff:3", f"q{i}") for i in range(30)]
    cal = Calibration.fit(same, labels)
    assert not cal.fields["joint"].calibrated
    assert "one outcome" in cal.fields["joint"].note
    assert cal.fields["joint"].accuracy == 0.0  # every raw decision (p < 0.5) was wrong


def test_identity_default():
    cal = Calibration.identity(model="m", collection="c")
    assert cal.calibrated_fields == ()
    assert set(cal.fields) == set(FIELDS)
    b = beliefs(joint=0.95, complexity=0.2)
    assert cal.apply(b) == b
    assert cal.confidence(b) == pytest.approx(0.8)


def test_decision_confidence_is_the_less_certain_binary_decision():
    assert decision_confidence(beliefs(joint=0.95, complexity=0.1)) == pytest.approx(0.9)
    assert decision_confidence(beliefs(joint=0.3, complexity=0.99)) == pytest.approx(0.7)
    assert decision_confidence(beliefs(joint=0.5, complexity=1.0)) == pytest.approx(0.5)


# -- categorical fields ----------------------------------------------------------------------------


def test_rescale_gives_the_argmax_its_confidence_and_shares_the_rest():
    out = rescale(np.array([0.1, 0.6, 0.3]), 0.8)
    assert out == pytest.approx([0.05, 0.8, 0.15])
    assert rescale(np.array([0.0, 1.0, 0.0]), 0.7) == pytest.approx([0.15, 0.7, 0.15])


def test_pieces_confidence_calibrated():
    """An overconfident pieces argmax (always 0.9, right 40% of the time) is brought down."""
    rng = np.random.default_rng(5)
    b, lab = [], []
    for i in range(200):
        top = int(rng.integers(0, 9))
        p = np.full(9, 0.1 / 8)
        p[top] = 0.9
        right = rng.uniform() < 0.4
        pieces = PIECES_VALUES[top] if right else PIECES_VALUES[(top + 1) % 9]
        b.append(beliefs(pieces=tuple(p)))
        lab.append(label(f"stuff:{3 * pieces}", f"q{i}"))
    cal = Calibration.fit(b, lab)
    f = cal.fields["pieces"]
    assert f.kind == "categorical" and f.calibrated and f.n == 200
    assert f.ece_before == pytest.approx(0.9 - f.accuracy, abs=1e-9)
    assert f.ece_after < 0.1 < f.ece_before
    applied = cal.apply(b[0])
    assert max(applied.pieces) == pytest.approx(f.transform(0.9))
    assert sum(applied.pieces) == pytest.approx(1.0)
    assert applied.joint == b[0].joint  # uncalibrated: every label was joint
    # summary: no map_reduce labels, so no samples
    assert cal.fields["summary"].n == 0 and not cal.fields["summary"].calibrated


# -- the file --------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    b, lab = miscalibrated(100)
    cal = Calibration.fit(b, lab, model="SmolLM2", collection="squad", created="2025")
    path = cal.save(tmp_path / "calibration.json")
    back = Calibration.load(path)
    assert back == cal
    assert back.confidence(b[0]) == cal.confidence(b[0])
    assert json.loads(path.read_text())["format"] == "ragctl-profiler-calibration"
    ident = Calibration.identity()
    assert Calibration.load(ident.save(tmp_path / "ident.json")) == ident


def corrupt(tmp_path, text: str) -> str:
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(ProfilerStateError) as info:
        Calibration.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(info.value, UserError)
    return message


def test_corrupt_files(tmp_path):
    good = Calibration.fit(*miscalibrated(40), created="t").to_dict()
    text = json.dumps({"format": "ragctl-profiler-calibration", "version": 1, **good})
    assert "not valid JSON" in corrupt(tmp_path, text[: len(text) // 2])
    assert "not valid JSON" in corrupt(tmp_path, "")
    assert "expected a JSON object" in corrupt(tmp_path, "[1, 2]")
    assert "version 2" in corrupt(tmp_path, text.replace('"version": 1', '"version": 2'))
    wrong = text.replace("ragctl-profiler-calibration", "ragctl-learned-profiler")
    assert "format is 'ragctl-learned-profiler'" in corrupt(tmp_path, wrong)
    missing = json.loads(text)
    del missing["fields"]["joint"]["x"]
    assert "missing key 'fields.joint.x'" in corrupt(tmp_path, json.dumps(missing))
    del missing["fields"]
    assert "missing key 'fields'" in corrupt(tmp_path, json.dumps(missing))
    bad = json.loads(text)
    bad["fields"]["joint"]["y"] = [0.5]
    assert "one length" in corrupt(tmp_path, json.dumps(bad))
    bad["fields"]["joint"]["x"] = "nope"
    assert "bad value for 'fields.joint.x'" in corrupt(tmp_path, json.dumps(bad))
    with pytest.raises(ProfilerStateError, match="no such file"):
        Calibration.load(tmp_path / "absent.json")
