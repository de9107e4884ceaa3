"""Calibrated trust in a profiler's beliefs, fitted from outcome labels (pure, plus a JSON file).

Per field, an isotonic map (sklearn `IsotonicRegression(out_of_bounds="clip", y_min=0,
y_max=1)`) from what the profiler said to how often it was right:

- binary fields (`joint`, `complexity`): the raw P(true) against the label;
- categorical fields (`pieces`, `summary`): the confidence of the most probable value (its
  probability) against whether it was the label. `apply` gives the argmax its calibrated
  confidence and lets the other values share the rest in proportion to their raw probabilities.

A field is calibrated only with >= `min_samples` labelled samples (default 20) holding both
outcomes; otherwise its map is the identity. `ece_before` is the raw beliefs' expected
calibration error on the labels; `ece_after` and `accuracy_after` come from K-fold
out-of-fold calibrated probabilities (each sample calibrated by a map fitted without it), so
they are honest estimates of what the saved map does to new queries. `accuracy` is the raw
decision's accuracy (nothing is fitted for it).

`confidence(beliefs)` is what the controller compares with its trust threshold: the calibrated
probability that the less certain of the two binary decisions is right,
min(max(j, 1 - j), max(c, 1 - c)) on the calibrated values. `Calibration.identity()` (no
feedback yet: no field calibrated) is the conservative default: the raw probabilities, judged
against the controller's own 0.9 threshold.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import KFold, StratifiedKFold

from ragctl.errors import ProfilerStateError
from ragctl.profiler import files
from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.profiler.labels import OutcomeLabel
from ragctl.profiler.prompts import LEGACY_FIELDS_TEMPLATE

FieldName = Literal["joint", "complexity", "pieces", "summary"]
Kind = Literal["binary", "categorical"]
BINARY_FIELDS: tuple[FieldName, ...] = ("joint", "complexity")
CATEGORICAL_FIELDS: tuple[FieldName, ...] = ("pieces", "summary")
FIELDS: tuple[FieldName, ...] = BINARY_FIELDS + CATEGORICAL_FIELDS
KINDS: dict[str, Kind] = {f: "binary" if f in BINARY_FIELDS else "categorical" for f in FIELDS}
MIN_SAMPLES = 20
DEFAULT_FOLDS = 5
FORMAT = "ragctl-profiler-calibration"
FORMAT_VERSION = 1


# -- fields of beliefs and labels -----------------------------------------------------------------


def field_probs(beliefs: FieldBeliefs, name: str) -> np.ndarray:
    """A field's probabilities: [P(false), P(true)] for a binary field, the value
    distribution for a categorical one (pieces 1..9, summary buckets)."""
    if name == "joint":
        return np.array([1.0 - beliefs.joint, beliefs.joint])
    if name == "complexity":
        return np.array([1.0 - beliefs.complexity_high, beliefs.complexity_high])
    if name == "pieces":
        return np.asarray(beliefs.pieces, dtype=float)
    if name == "summary":
        return np.asarray(beliefs.summary, dtype=float)
    raise KeyError(name)


def field_target(label: OutcomeLabel, name: str) -> int | None:
    """The label's class index in `field_probs`'s order (None: the field has no label, as
    summary for a configuration that is not map_reduce)."""
    if name == "joint":
        return int(label.joint)
    if name == "complexity":
        return int(label.complexity_high)
    if name == "pieces":
        return label.pieces - 1
    if name == "summary":
        return label.summary
    raise KeyError(name)


def decision_confidence(beliefs: FieldBeliefs) -> float:
    """The probability that the less certain binary decision is right:
    min(max(j, 1 - j), max(c, 1 - c))."""
    j, c = beliefs.joint, beliefs.complexity_high
    return float(min(max(j, 1.0 - j), max(c, 1.0 - c)))


def with_fields(beliefs: FieldBeliefs, probs: Mapping[str, np.ndarray]) -> FieldBeliefs:
    """`beliefs` with some fields replaced by `field_probs`-shaped vectors."""

    def get(name: str) -> np.ndarray:
        return probs[name] if name in probs else field_probs(beliefs, name)

    return FieldBeliefs(
        joint=_unit(get("joint")[1]),
        complexity_high=_unit(get("complexity")[1]),
        pieces=_distribution(get("pieces")),
        summary=_distribution(get("summary")),  # type: ignore[arg-type]
    )


def rescale(probs: np.ndarray, confidence: float) -> np.ndarray:
    """`probs` with its argmax set to `confidence` and the others sharing 1 - confidence in
    proportion to their own values (equally when they are all 0)."""
    probs = np.asarray(probs, dtype=float)
    k = int(np.argmax(probs))
    rest = float(probs.sum() - probs[k])
    out = np.empty_like(probs)
    if probs.size == 1:
        return np.ones(1)
    if rest > 0:
        out[:] = probs * ((1.0 - confidence) / rest)
    else:
        out[:] = (1.0 - confidence) / (probs.size - 1)
    out[k] = confidence
    return out


# -- ECE ----------------------------------------------------------------------------------------


def expected_calibration_error(
    probs: Sequence[float] | np.ndarray, labels: Sequence[int | bool] | np.ndarray, bins: int = 10
) -> float:
    """Binary ECE: over `bins` equal-width bins of the predicted probability ([0, 1/bins), ...,
    the last one closed), the sample-weighted mean |fraction of positives - mean probability|.
    0.0 for no samples."""
    p = np.asarray(probs, dtype=float).ravel()
    y = np.asarray(labels, dtype=float).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} labels")
    if p.size == 0:
        return 0.0
    idx = np.clip(np.floor(p * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in np.unique(idx):
        mask = idx == b
        total += mask.sum() * abs(float(y[mask].mean()) - float(p[mask].mean()))
    return float(total / p.size)


# -- one field ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldCalibration:
    """One field's calibration map and how well it does."""

    name: str
    kind: Kind
    x: tuple[float, ...] = ()
    """Isotonic thresholds (sklearn's X_thresholds_), increasing; empty: the identity."""
    y: tuple[float, ...] = ()
    """Calibrated values at `x` (y_thresholds_); linear in between, clipped outside."""
    n: int = 0
    """Labelled samples the field had."""
    ece_before: float | None = None
    """ECE of the raw beliefs (binary: P(true); categorical: the argmax's confidence)."""
    ece_after: float | None = None
    """ECE of out-of-fold calibrated beliefs (= ece_before when not calibrated)."""
    accuracy: float | None = None
    """How often the raw decision (P >= 0.5; the argmax) was the label."""
    accuracy_after: float | None = None
    """How often the out-of-fold calibrated decision was the label."""
    note: str = ""
    """Why the field is not calibrated (too few samples, one outcome only), or empty."""

    @property
    def calibrated(self) -> bool:
        return bool(self.x)

    def max_confidence(self) -> float:
        """The most confident binary decision, max(p, 1 - p), that this map can output for
        any raw probability (1 for the identity: a raw answer may say anything)."""
        if not self.calibrated:
            return 1.0
        return max(max(v, 1.0 - v) for v in (min(self.y), max(self.y)))

    def transform(self, p: float) -> float:
        """The calibrated value of a raw probability (binary) or confidence (categorical)."""
        if not self.calibrated:
            return float(p)
        return _unit(float(np.interp(p, self.x, self.y)))

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """A `field_probs`-shaped vector, calibrated."""
        if not self.calibrated:
            return probs
        if self.kind == "binary":
            p = self.transform(float(probs[1]))
            return np.array([1.0 - p, p])
        return rescale(probs, self.transform(float(np.max(probs))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "x": list(self.x),
            "y": list(self.y),
            "n": self.n,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "accuracy": self.accuracy,
            "accuracy_after": self.accuracy_after,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], path: Path) -> FieldCalibration:
        where = f"fields.{name}"
        kind = files.field(path, d, "kind", str, where)
        if kind != KINDS.get(name):
            raise ProfilerStateError(f"{path}: {where}.kind is {kind!r}, expected {KINDS[name]!r}")
        x = files.field(path, d, "x", files.floats, where)
        y = files.field(path, d, "y", files.floats, where)
        if len(x) != len(y) or any(b < a for a, b in zip(x, x[1:], strict=False)):
            raise ProfilerStateError(
                f"{path}: {where}: x and y must be lists of one length, x increasing"
            )
        return cls(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            x=x,
            y=y,
            n=files.field(path, d, "n", int, where),
            ece_before=files.field(path, d, "ece_before", files.optional_float, where),
            ece_after=files.field(path, d, "ece_after", files.optional_float, where),
            accuracy=files.field(path, d, "accuracy", files.optional_float, where),
            accuracy_after=files.field(path, d, "accuracy_after", files.optional_float, where),
            note=str(d.get("note", "")),
        )


def fit_field(
    name: str,
    probs: np.ndarray,
    targets: np.ndarray,
    *,
    min_samples: int = MIN_SAMPLES,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> FieldCalibration:
    """Calibrate one field from `probs` (n x classes, `field_probs` rows) and class indices."""
    kind = KINDS[name]
    n = int(len(targets))
    if n == 0:
        return FieldCalibration(name, kind, note="no labelled samples")
    probs = np.asarray(probs, dtype=float).reshape(n, -1)
    targets = np.asarray(targets, dtype=int)
    x, y = _pairs(kind, probs, targets)
    decisions = probs.argmax(axis=1) if kind == "categorical" else (probs[:, 1] >= 0.5)
    accuracy = float(np.mean(decisions.astype(int) == targets))
    ece = expected_calibration_error(x, y)
    base = FieldCalibration(
        name, kind, n=n, ece_before=ece, ece_after=ece, accuracy=accuracy,
        accuracy_after=accuracy,
    )  # fmt: skip
    if n < min_samples:
        return _replace(base, note=f"too few samples ({n} < {min_samples})")
    if len(np.unique(y)) < 2:
        what = "right" if kind == "categorical" and y[0] == 1 else "one outcome"
        return _replace(base, note=f"every sample has {what} only: nothing to calibrate against")
    iso = _isotonic().fit(x, y)
    fitted = _replace(
        base, x=tuple(float(v) for v in iso.X_thresholds_),
        y=tuple(float(v) for v in iso.y_thresholds_),
    )  # fmt: skip
    oof = np.empty(n)
    for train, test in kfold_splits(y, folds, seed):
        if len(np.unique(y[train])) < 2:
            oof[test] = float(y[train].mean())
        else:
            oof[test] = _isotonic().fit(x[train], y[train]).predict(x[test])
    calibrated = np.array([
        _oof_vector(kind, probs[i], oof[i]) for i in range(n)
    ])  # fmt: skip
    after_decisions = (
        calibrated.argmax(axis=1) if kind == "categorical" else (calibrated[:, 1] >= 0.5)
    )
    return _replace(
        fitted,
        ece_after=expected_calibration_error(oof, y),
        accuracy_after=float(np.mean(after_decisions.astype(int) == targets)),
    )


# -- all fields ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Every field's calibration, for one profiler on one (model, collection)."""

    fields: Mapping[str, FieldCalibration] = field(default_factory=dict)
    profiler: str = "llm"
    """The profiler the beliefs came from: `llm` (the field profiler) or `learned`."""
    model: str = ""
    collection: str = ""
    created: str = ""
    template: str = LEGACY_FIELDS_TEMPLATE
    """The fields template version the LLM's beliefs were asked with (`llm` only)."""

    @classmethod
    def identity(
        cls,
        profiler: str = "llm",
        model: str = "",
        collection: str = "",
        *,
        note: str = "no feedback",
    ) -> Calibration:
        """No field calibrated: beliefs pass through as they are (the controller then keeps
        its default trust threshold, 0.9)."""
        fields = {name: FieldCalibration(name, KINDS[name], note=note) for name in FIELDS}
        return cls(fields, profiler=profiler, model=model, collection=collection)

    @classmethod
    def fit(
        cls,
        beliefs: Sequence[FieldBeliefs],
        labels: Sequence[OutcomeLabel],
        *,
        profiler: str = "llm",
        model: str = "",
        collection: str = "",
        min_samples: int = MIN_SAMPLES,
        folds: int = DEFAULT_FOLDS,
        seed: int = 0,
        created: str | None = None,
        template: str = LEGACY_FIELDS_TEMPLATE,
    ) -> Calibration:
        """Fit every field from beliefs paired with their queries' labels."""
        if len(beliefs) != len(labels):
            raise ValueError(f"{len(beliefs)} beliefs but {len(labels)} labels")
        out: dict[str, FieldCalibration] = {}
        for name in FIELDS:
            rows = [(field_probs(b, name), t) for b, lab in zip(beliefs, labels, strict=True)
                    if (t := field_target(lab, name)) is not None]  # fmt: skip
            probs = np.array([r[0] for r in rows]) if rows else np.empty((0, 2))
            targets = np.array([r[1] for r in rows], dtype=int)
            out[name] = fit_field(
                name, probs, targets, min_samples=min_samples, folds=folds, seed=seed
            )
        return cls(
            out, profiler=profiler, model=model, collection=collection,
            created=created if created is not None else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            template=template,
        )  # fmt: skip

    @property
    def calibrated_fields(self) -> tuple[str, ...]:
        return tuple(n for n in FIELDS if n in self.fields and self.fields[n].calibrated)

    def apply(self, beliefs: FieldBeliefs, skip: Iterable[str] = ()) -> FieldBeliefs:
        """The calibrated beliefs (an uncalibrated field, or one in `skip`, passes through)."""
        skipped = set(skip)
        probs = {
            name: self.fields[name].calibrate(field_probs(beliefs, name))
            for name in self.calibrated_fields
            if name not in skipped
        }
        return with_fields(beliefs, probs) if probs else beliefs

    def confidence(self, beliefs: FieldBeliefs, skip: Iterable[str] = ()) -> float:
        """`decision_confidence` of the calibrated beliefs."""
        return decision_confidence(self.apply(beliefs, skip))

    def to_dict(self) -> dict[str, Any]:
        return {
            "profiler": self.profiler,
            "model": self.model,
            "collection": self.collection,
            "created": self.created,
            "template": self.template,
            "fields": {name: f.to_dict() for name, f in self.fields.items()},
        }

    def save(self, path: str | Path) -> Path:
        return files.write_json(path, FORMAT, FORMAT_VERSION, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read `save`'s file; ProfilerStateError when it is corrupt or of another format."""
        path = Path(path)
        data = files.read_json(path, FORMAT, FORMAT_VERSION)
        raw = files.field(path, data, "fields", dict)
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            raise ProfilerStateError(f"{path}: unknown field(s) {', '.join(unknown)}")
        fields: dict[str, FieldCalibration] = {}
        for name, d in raw.items():
            if not isinstance(d, dict):
                raise ProfilerStateError(f"{path}: fields.{name} is not an object")
            fields[name] = FieldCalibration.from_dict(name, d, path)
        return cls(
            fields,
            profiler=files.field(path, data, "profiler", str),
            model=files.field(path, data, "model", str),
            collection=files.field(path, data, "collection", str),
            created=files.field(path, data, "created", str),
            template=str(data.get("template") or LEGACY_FIELDS_TEMPLATE),
        )


# -- helpers ------------------------------------------------------------------------------------


def _isotonic() -> IsotonicRegression:
    return IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)


def _pairs(kind: Kind, probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) the isotonic map is fitted on."""
    if kind == "binary":
        return probs[:, 1].copy(), targets.astype(float)
    return probs.max(axis=1), (probs.argmax(axis=1) == targets).astype(float)


def _oof_vector(kind: Kind, probs: np.ndarray, value: float) -> np.ndarray:
    value = _unit(value)
    if kind == "binary":
        return np.array([1.0 - value, value])
    return rescale(probs, value)


def kfold_splits(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold splits, stratified on `y` when every class has `folds` members."""
    k = max(2, min(folds, len(y)))
    _, counts = np.unique(y, return_counts=True)
    splitter: KFold | StratifiedKFold
    if len(counts) > 1 and counts.min() >= k:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(y), 1)), y))


def _unit(p: float) -> float:
    return float(min(max(p, 0.0), 1.0))


def _distribution(values: np.ndarray) -> tuple[float, ...]:
    v = np.clip(np.asarray(values, dtype=float), 0.0, None)
    total = float(v.sum())
    v = v / total if total > 0 else np.full(v.size, 1.0 / v.size)
    return tuple(float(x) for x in v)


def _replace(f: FieldCalibration, **changes: Any) -> FieldCalibration:
    return replace(f, **changes)
