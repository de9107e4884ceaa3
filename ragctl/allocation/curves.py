"""Latency-versus-batch-size curves: measured points and their continuous piecewise-linear fit.

Pure (numpy, and the synthesis registry's names). A `Curve` is one component at one thread
count (engine components have no thread count): the median seconds to process a batch of each
measured size, and the fit the allocation MILP reads its latencies from. The fit is a
least-squares continuous piecewise-linear function whose breakpoints are searched over the
measured batch sizes; it uses fewer segments whenever they fit about as well (see
`fit_piecewise_linear`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragctl.synthesis import registry

CPU_COMPONENTS = ("embed", "search")
"""Run in this process on CPU threads (query embedding, FAISS search)."""
SYNTHESIS_COMPONENTS = tuple(registry.stage_components().values())
"""The synthesis calls of each kind (the built-in methods' stages: rerank, stuff, map, reduce)."""
ENGINE_COMPONENTS = ("profile", *SYNTHESIS_COMPONENTS)
"""Run as engine calls: the profiler call and the synthesis calls of each kind."""

MIN_GAIN = 0.5
"""An extra segment is kept only when it at least halves the squared error of the fit without
it: a line that is about as good as two segments wins."""


@dataclass(frozen=True)
class Segment:
    """`y = intercept + slope * x` on [x0, x1]."""

    x0: float
    x1: float
    slope: float
    intercept: float


@dataclass(frozen=True)
class PiecewiseLinear:
    """A continuous piecewise-linear function through `knots` (x ascending), extended past the
    first and last knot along its end segments. One knot: a constant."""

    knots: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.knots:
            raise ValueError("a piecewise-linear function needs at least one knot")
        xs = [x for x, _ in self.knots]
        if any(b <= a for a, b in itertools.pairwise(xs)):
            raise ValueError(f"knots must have strictly increasing x, got {xs}")

    @property
    def segments(self) -> tuple[Segment, ...]:
        out = []
        for (x0, y0), (x1, y1) in itertools.pairwise(self.knots):
            slope = (y1 - y0) / (x1 - x0)
            out.append(Segment(x0, x1, slope, y0 - slope * x0))
        return tuple(out)

    def __call__(self, x: float) -> float:
        if len(self.knots) == 1:
            return float(self.knots[0][1])
        segs = self.segments
        seg = segs[0]
        for s in segs:
            if x >= s.x0:
                seg = s
        return float(seg.intercept + seg.slope * x)

    def to_dict(self) -> dict[str, Any]:
        return {
            "knots": [[x, y] for x, y in self.knots],
            "segments": [vars(s) for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PiecewiseLinear:
        return cls(tuple((float(x), float(y)) for x, y in d["knots"]))


def fit_piecewise_linear(
    xs: Sequence[float], ys: Sequence[float], max_segments: int = 2
) -> PiecewiseLinear:
    """Least-squares continuous piecewise-linear fit of `ys` over `xs` with at most
    `max_segments` segments; breakpoints are searched over the measured x values (every
    combination of interior ones). The fewest segments win unless one more at least halves the
    squared error (`MIN_GAIN`), so data on a line gives a line. Repeated x values are fine."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"need equally long, non-empty xs and ys, got {x.shape} and {y.shape}")
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("xs and ys must be finite")
    ux = np.unique(x)
    if ux.size == 1:
        return PiecewiseLinear(((float(ux[0]), float(y.mean())),))
    # Numerical noise floor: fits this close to exact count as exact.
    floor = 1e-12 * float(np.sum(y * y)) + 1e-30
    interior = ux[1:-1]
    best: tuple[float, tuple[float, ...], np.ndarray] | None = None
    for k in range(0, min(max_segments - 1, interior.size) + 1):
        k_best: tuple[float, tuple[float, ...], np.ndarray] | None = None
        for bps in itertools.combinations(interior.tolist(), k):
            basis = np.column_stack([np.ones_like(x), x] + [np.maximum(0.0, x - t) for t in bps])
            coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
            sse = float(np.sum((basis @ coef - y) ** 2))
            if k_best is None or sse < k_best[0]:
                k_best = (sse, bps, coef)
        assert k_best is not None
        if best is None or (k_best[0] <= MIN_GAIN * best[0] and best[0] > floor):
            best = k_best
    assert best is not None
    _, bps, coef = best
    knot_x = [float(ux[0]), *bps, float(ux[-1])]

    def model(v: float) -> float:
        return float(
            coef[0]
            + coef[1] * v
            + sum(c * max(0.0, v - t) for c, t in zip(coef[2:], bps, strict=True))
        )

    return PiecewiseLinear(tuple((kx, model(kx)) for kx in knot_x))


@dataclass(frozen=True)
class Curve:
    """One component's measured latency against batch size (at one thread count for CPU
    components; `threads` is None for engine calls), with its fit."""

    component: str
    threads: int | None
    points: tuple[tuple[int, float], ...]
    """(batch size, median seconds to process one batch of that size), batch ascending."""
    fit: PiecewiseLinear
    repeats: int = 1
    """Measurements per point (the point is their median)."""

    @classmethod
    def fitted(
        cls,
        component: str,
        threads: int | None,
        points: Mapping[int, float] | Sequence[tuple[int, float]],
        *,
        repeats: int = 1,
        max_segments: int = 2,
    ) -> Curve:
        """A curve through `points` with its piecewise-linear fit."""
        items = sorted(dict(points).items())
        if not items:
            raise ValueError(f"no measured points for {component}")
        if any(b < 1 or s < 0 for b, s in items):
            raise ValueError(f"{component}: batch sizes must be >= 1 and seconds >= 0: {items}")
        fit = fit_piecewise_linear([b for b, _ in items], [s for _, s in items], max_segments)
        pts = tuple((int(b), float(s)) for b, s in items)
        return cls(component, threads, pts, fit, repeats)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(b for b, _ in self.points)

    def predict(self, batch: float) -> float:
        """Fitted seconds for one batch of `batch` (never below zero)."""
        return max(0.0, self.fit(batch))

    @property
    def max_rel_error(self) -> float:
        """Largest |fit - measured| / measured over the points (0 for a zero measurement that the
        fit matches)."""
        worst = 0.0
        for b, s in self.points:
            diff = abs(self.predict(b) - s)
            if s > 0:
                worst = max(worst, diff / s)
            elif diff > 0:
                worst = float("inf")
        return worst

    @property
    def label(self) -> str:
        return self.component if self.threads is None else f"{self.component}@{self.threads}t"

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "threads": self.threads,
            "points": [[b, s] for b, s in self.points],
            "repeats": self.repeats,
            "fit": self.fit.to_dict(),
            "max_rel_error": self.max_rel_error,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Curve:
        return cls(
            component=str(d["component"]),
            threads=None if d.get("threads") is None else int(d["threads"]),
            points=tuple((int(b), float(s)) for b, s in d["points"]),
            fit=PiecewiseLinear.from_dict(d["fit"]),
            repeats=int(d.get("repeats", 1)),
        )
