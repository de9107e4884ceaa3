"""The learned profiler: per-field beliefs predicted from what the query path already has (the
query embedding and the retrieval score profile), at no LLM call.

Features (`query_features`, FEATURES_VERSION 1), in this order:

1. the L2-normalised query embedding (any dimension; 384 for the default embedder);
2. the retrieval score profile, scores sorted high to low and padded with 0 to ten:
   top-1, mean of the top 3, mean of the top 10, top-1 - top-2, top-2 - top-3, standard
   deviation of the top 10 (population);
3. log1p of the question's length in words, and how many words after the first start with a
   capital letter once punctuation ('?', quotes, ...) is stripped (a hint of named entities;
   the first word of a question is capitalised anyway).

Per field a logistic regression (sklearn `LogisticRegression`, lbfgs, class_weight="balanced",
C=1.0) on standardised features (`StandardScaler`): binary for joint and complexity,
multinomial for pieces (1..9) and summary (its buckets, fitted on the map_reduce labels only).
A field whose labels hold a single class is a constant: the Laplace-smoothed class frequencies
over the field's values ((count + 1) / (n + values)), so it never claims certainty from a
handful of samples. Held-out accuracy and held-out beliefs come from K-fold cross-validation
(stratified on the field's labels when every class has K members), so they can be compared
with the LLM profiler's accuracy and fed to `Calibration.fit` as they are.

`predict` runs in plain numpy from the exported coefficients (scaler mean and scale,
coefficients, intercepts, classes): tens of microseconds per query. The model is saved as
JSON (no pickle).
"""

from __future__ import annotations

import math
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ragctl.errors import InvalidRequest, ProfilerStateError
from ragctl.profiler import files
from ragctl.profiler.beliefs import PIECES_VALUES, SUMMARY_BUCKETS, FieldBeliefs
from ragctl.profiler.calibration import (
    DEFAULT_FOLDS,
    FIELDS,
    decision_confidence,
    field_target,
    kfold_splits,
)
from ragctl.profiler.labels import OutcomeLabel

FEATURES_VERSION = 1
SCORE_FEATURES = (
    "top1",
    "top3_mean",
    "top10_mean",
    "gap_1_2",
    "gap_2_3",
    "top10_std",
    "log1p_words",
    "capitalised_words",
)
"""The names of the features after the embedding, in order."""
TOP_K = 10
FORMAT = "ragctl-learned-profiler"
FORMAT_VERSION = 1
DEFAULT_C = 1.0
FIELD_SIZES: dict[str, int] = {
    "joint": 2,
    "complexity": 2,
    "pieces": len(PIECES_VALUES),
    "summary": len(SUMMARY_BUCKETS),
}
"""How many values each field has (class indices 0..size-1, as `calibration.field_target`)."""
_STRIP = str.maketrans("", "", string.punctuation + "\u201c\u201d\u2018\u2019")


# -- features -----------------------------------------------------------------------------------


def query_features(embedding: np.ndarray, scores: Sequence[float], question: str) -> np.ndarray:
    """The learned profiler's feature vector of one query (see the module doc for the order):
    `len(embedding) + len(SCORE_FEATURES)` floats."""
    e = np.asarray(embedding, dtype=float).ravel()
    norm = float(np.linalg.norm(e))
    e = e / norm if norm > 0 else np.zeros_like(e)
    top = sorted((float(s) for s in scores), reverse=True)[:TOP_K]
    top += [0.0] * (TOP_K - len(top))
    t = np.asarray(top)
    words = question.split()
    capitalised = sum(1 for w in words[1:] if (s := w.translate(_STRIP)) and s[0].isupper())
    extra = [
        t[0],
        t[:3].mean(),
        t.mean(),
        t[0] - t[1],
        t[1] - t[2],
        t.std(),
        math.log1p(len(words)),
        float(capitalised),
    ]
    return np.concatenate([e, np.asarray(extra, dtype=float)])


# -- one field ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldModel:
    """One field's fitted model, as numbers: `proba` needs numpy only."""

    name: str
    kind: Literal["logistic", "constant"]
    size: int
    """The field's number of values; `proba` returns that many probabilities."""
    classes: tuple[int, ...] = ()
    """The class indices the logistic model saw (its columns), increasing."""
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))
    coef: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """(1, d) for two classes (the second's log-odds), else (classes, d)."""
    intercept: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prior: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """A constant field's probabilities over all `size` values."""

    def proba(self, x: np.ndarray) -> np.ndarray:
        """P(each of the field's values) for one feature vector."""
        if self.kind == "constant":
            return self.prior.copy()
        z = self.coef @ ((x - self.mean) / self.scale) + self.intercept
        if len(self.classes) == 2:
            p1 = 1.0 / (1.0 + math.exp(-float(z[0])))
            p = np.array([1.0 - p1, p1])
        else:
            z = z - z.max()
            ez = np.exp(z)
            p = ez / ez.sum()
        out = np.zeros(self.size)
        out[list(self.classes)] = p
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "size": self.size,
            "classes": list(self.classes),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "prior": self.prior.tolist(),
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], dim: int, path: Path) -> FieldModel:
        where = f"fields.{name}"
        kind = files.field(path, d, "kind", str, where)
        size = files.field(path, d, "size", int, where)
        if kind not in ("logistic", "constant") or size != FIELD_SIZES[name]:
            raise ProfilerStateError(f"{path}: {where}: kind {kind!r} / size {size} is not valid")
        classes = tuple(files.field(path, d, "classes", lambda v: [int(c) for c in v], where))
        arrays = {
            key: files.field(path, d, key, lambda v: np.asarray(v, dtype=float), where)
            for key in ("mean", "scale", "coef", "intercept", "prior")
        }
        if kind == "constant":
            ok = arrays["prior"].shape == (size,)
        else:
            rows = 1 if len(classes) == 2 else len(classes)
            ok = (
                len(classes) >= 2
                and all(0 <= c < size for c in classes)
                and list(classes) == sorted(set(classes))
                and arrays["mean"].shape == (dim,)
                and arrays["scale"].shape == (dim,)
                and arrays["coef"].shape == (rows, dim)
                and arrays["intercept"].shape == (rows,)
                and bool(np.all(arrays["scale"] > 0))
            )
        if not ok or not all(np.all(np.isfinite(a)) for a in arrays.values()):
            raise ProfilerStateError(f"{path}: {where}: arrays of the wrong shape or not finite")
        return cls(name, kind, size, classes, **arrays)  # type: ignore[arg-type]


def fit_field_model(
    name: str, X: np.ndarray, y: np.ndarray, *, C: float = DEFAULT_C
) -> tuple[FieldModel, Pipeline | None]:
    """Fit one field on features `X` and class indices `y`: the exported model, and the sklearn
    pipeline it came from (None for a constant field)."""
    size = FIELD_SIZES[name]
    y = np.asarray(y, dtype=int)
    classes = np.unique(y)
    if len(classes) < 2:
        counts = np.bincount(y, minlength=size).astype(float)
        prior = (counts + 1.0) / (counts.sum() + size)
        return FieldModel(name, "constant", size, prior=prior), None
    pipe = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, class_weight="balanced", max_iter=2000),
    )
    pipe.fit(X, y)
    scaler: StandardScaler = pipe[0]
    lr: LogisticRegression = pipe[-1]
    model = FieldModel(
        name,
        "logistic",
        size,
        classes=tuple(int(c) for c in lr.classes_),
        mean=np.ascontiguousarray(scaler.mean_, dtype=float),
        scale=np.ascontiguousarray(scaler.scale_, dtype=float),
        coef=np.ascontiguousarray(lr.coef_, dtype=float),
        intercept=np.ascontiguousarray(lr.intercept_, dtype=float),
        prior=np.zeros(0),
    )
    return model, pipe


# -- the profiler -------------------------------------------------------------------------------


@dataclass
class LearnedProfiler:
    """Per-field models over `query_features`, with their held-out accuracy."""

    fields: dict[str, FieldModel]
    dim: int
    """Feature vector length (embedding dimension + len(SCORE_FEATURES))."""
    n_samples: int
    heldout_accuracy: dict[str, float | None]
    """Per field, the K-fold held-out accuracy of the argmax (None: too few samples)."""
    embedder: str = ""
    features_version: int = FEATURES_VERSION
    created: str = ""
    heldout_beliefs: tuple[FieldBeliefs, ...] = ()
    """The K-fold held-out beliefs of the fitted samples, in their order (not saved)."""
    estimators: dict[str, Pipeline | None] = field(default_factory=dict, repr=False)
    """The sklearn pipelines of a freshly fitted model (not saved)."""

    @property
    def embedding_dim(self) -> int:
        return self.dim - len(SCORE_FEATURES)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: Sequence[OutcomeLabel],
        *,
        folds: int = DEFAULT_FOLDS,
        seed: int = 0,
        embedder: str = "",
        C: float = DEFAULT_C,
        created: str | None = None,
    ) -> LearnedProfiler:
        """Fit every field on `features` (n x dim, `query_features` rows) and their labels."""
        X = np.asarray(features, dtype=float)
        if X.ndim != 2 or X.shape[0] != len(labels):
            raise InvalidRequest(
                f"features must be (n, dim) with one row per label: {X.shape} for {len(labels)}"
            )
        if not labels:
            raise InvalidRequest("a learned profiler needs at least one label")
        if X.shape[1] <= len(SCORE_FEATURES):
            raise InvalidRequest(f"feature vectors of {X.shape[1]} values hold no embedding")
        n = len(labels)
        models: dict[str, FieldModel] = {}
        estimators: dict[str, Pipeline | None] = {}
        accuracy: dict[str, float | None] = {}
        heldout = {name: np.zeros((n, FIELD_SIZES[name])) for name in FIELDS}
        for name in FIELDS:
            targets = [field_target(lab, name) for lab in labels]
            rows = np.array([i for i, t in enumerate(targets) if t is not None], dtype=int)
            y = np.array([targets[i] for i in rows], dtype=int)
            if len(rows) == 0:
                prior = np.full(FIELD_SIZES[name], 1.0 / FIELD_SIZES[name])
                models[name] = FieldModel(name, "constant", FIELD_SIZES[name], prior=prior)
                estimators[name], accuracy[name] = None, None
                heldout[name][:] = prior
                continue
            models[name], estimators[name] = fit_field_model(name, X[rows], y, C=C)
            # rows without a label of this field are held out of it already
            unlabelled = np.setdiff1d(np.arange(n), rows)
            for i in unlabelled:
                heldout[name][i] = models[name].proba(X[i])
            if len(rows) < 2:
                accuracy[name] = None
                heldout[name][rows] = models[name].proba(X[rows[0]])
                continue
            for train, test in kfold_splits(y, folds, seed):
                fold_model, _ = fit_field_model(name, X[rows[train]], y[train], C=C)
                for i in test:
                    heldout[name][rows[i]] = fold_model.proba(X[rows[i]])
            predicted = heldout[name][rows].argmax(axis=1)
            accuracy[name] = float(np.mean(predicted == y))
        beliefs = tuple(_beliefs({name: heldout[name][i] for name in FIELDS}) for i in range(n))
        return cls(
            fields=models,
            dim=int(X.shape[1]),
            n_samples=n,
            heldout_accuracy=accuracy,
            embedder=embedder,
            created=created if created is not None else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            heldout_beliefs=beliefs,
            estimators=estimators,
        )

    def predict(self, features: np.ndarray) -> FieldBeliefs:
        """The beliefs for one `query_features` vector (numpy only)."""
        x = np.asarray(features, dtype=float).ravel()
        if x.shape[0] != self.dim:
            raise InvalidRequest(
                f"learned profiler takes {self.dim} features, got {x.shape[0]} (embedder "
                f"{self.embedder or 'unknown'}, {self.embedding_dim}-d)"
            )
        return _beliefs({name: model.proba(x) for name, model in self.fields.items()})

    def confidence(self, beliefs: FieldBeliefs) -> float:
        """`calibration.decision_confidence`: the less certain binary decision's probability."""
        return decision_confidence(beliefs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "features_version": self.features_version,
            "embedder": self.embedder,
            "dim": self.dim,
            "n_samples": self.n_samples,
            "created": self.created,
            "heldout_accuracy": dict(self.heldout_accuracy),
            "fields": {name: m.to_dict() for name, m in self.fields.items()},
        }

    def save(self, path: str | Path) -> Path:
        return files.write_json(path, FORMAT, FORMAT_VERSION, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LearnedProfiler:
        """Read `save`'s file; ProfilerStateError when it is corrupt, of another format, or of
        another features version."""
        path = Path(path)
        data = files.read_json(path, FORMAT, FORMAT_VERSION)
        version = files.field(path, data, "features_version", int)
        if version != FEATURES_VERSION:
            raise ProfilerStateError(
                f"{path}: features version {version}, this ragctl computes version "
                f"{FEATURES_VERSION}: fit the learned profiler again"
            )
        dim = files.field(path, data, "dim", int)
        raw = files.field(path, data, "fields", dict)
        if set(raw) != set(FIELDS):
            raise ProfilerStateError(f"{path}: fields must be {', '.join(FIELDS)}")
        fields = {}
        for name in FIELDS:
            if not isinstance(raw[name], dict):
                raise ProfilerStateError(f"{path}: fields.{name} is not an object")
            fields[name] = FieldModel.from_dict(name, raw[name], dim, path)
        accuracy = files.field(
            path, data, "heldout_accuracy",
            lambda d: {str(k): files.optional_float(v) for k, v in d.items()},
        )  # fmt: skip
        return cls(
            fields=fields,
            dim=dim,
            n_samples=files.field(path, data, "n_samples", int),
            heldout_accuracy=accuracy,
            embedder=files.field(path, data, "embedder", str),
            features_version=version,
            created=files.field(path, data, "created", str),
        )


def time_predictions(model: LearnedProfiler, X: np.ndarray, n: int = 1000) -> tuple[float, float]:
    """(p50, p99) seconds of one `predict`, over `n` predictions cycling through the rows of
    `X` (for the benchmark; unit tests assert no timings)."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    times = np.empty(n)
    for i in range(n):
        x = X[i % len(X)]
        t = time.perf_counter()
        model.predict(x)
        times[i] = time.perf_counter() - t
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _beliefs(probs: Mapping[str, np.ndarray]) -> FieldBeliefs:
    def dist(v: np.ndarray) -> tuple[float, ...]:
        v = np.clip(v, 0.0, 1.0)
        return tuple(float(p) for p in v / v.sum())

    return FieldBeliefs(
        joint=float(np.clip(probs["joint"][1], 0.0, 1.0)),
        complexity_high=float(np.clip(probs["complexity"][1], 0.0, 1.0)),
        pieces=dist(probs["pieces"]),
        summary=dist(probs["summary"]),  # type: ignore[arg-type]
    )
