"""95% bootstrap confidence intervals over queries (`scipy.stats.bootstrap`, percentile method,
`N_RESAMPLES` resamples from a generator seeded with `SEED`, so a report is reproducible).

Every function takes per-query values and returns `[lo, hi]` (a list, as `results.json` holds
it) or None: fewer than `MIN_N` values, a non-finite bound, or scipy not installed. Constant
data gives the degenerate `[v, v]` without calling scipy. The two-sample functions are paired:
`a[i]` and `b[i]` are the same query's, and one resample draws the same queries from both.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 20240614
MIN_N = 2

Interval = list[float]


@cache
def _bootstrap() -> Callable[..., Any] | None:
    try:
        from scipy.stats import bootstrap
    except ImportError as e:  # pragma: no cover - scipy comes with the eval extra
        log.warning("no confidence intervals: scipy is missing (pip install 'ragctl[eval]'): %s", e)
        return None
    return bootstrap  # type: ignore[no-any-return]


@cache
def _seed_keyword() -> str:
    """scipy >= 1.15 calls the generator `rng`; older releases `random_state`."""
    bootstrap = _bootstrap()
    params = inspect.signature(bootstrap).parameters if bootstrap else {}
    return "rng" if "rng" in params else "random_state"


def _arrays(*samples: Sequence[float]) -> tuple[np.ndarray, ...] | None:
    arrays = tuple(np.asarray(s, dtype=float) for s in samples)
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"paired samples differ in length: {[len(a) for a in arrays]}")
    if len(arrays[0]) < MIN_N or not all(np.isfinite(a).all() for a in arrays):
        return None
    return arrays


def _interval(lo: float, hi: float) -> Interval | None:
    lo, hi = float(lo), float(hi)
    return [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None


def _ci(
    arrays: tuple[np.ndarray, ...], statistic: Callable[..., Any], *, paired: bool = False
) -> Interval | None:
    if all(np.ptp(a) == 0 for a in arrays):  # constant: every resample gives the same value
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(statistic(*(a[None, :] for a in arrays), axis=-1)[0])
        return _interval(value, value)
    bootstrap = _bootstrap()
    if bootstrap is None:
        return None
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with a zero denominator
        result = bootstrap(
            arrays,
            statistic,
            n_resamples=N_RESAMPLES,
            vectorized=True,
            paired=paired,
            axis=-1,
            confidence_level=CONFIDENCE,
            method="percentile",
            **{_seed_keyword(): np.random.default_rng(SEED)},
        )
    return _interval(result.confidence_interval.low, result.confidence_interval.high)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _diff_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _ratio_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) / np.mean(b, axis=axis)


def mean_ci(values: Sequence[float]) -> Interval | None:
    """The interval of the mean."""
    arrays = _arrays(values)
    return None if arrays is None else _ci(arrays, _mean)


def percentile_ci(values: Sequence[float], q: float) -> Interval | None:
    """The interval of the q-quantile (0-1; linear interpolation, as `benchmarks.percentile`)."""
    arrays = _arrays(values)
    if arrays is None:
        return None

    def quantile(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.quantile(x, q, axis=axis)

    return _ci(arrays, quantile)


def paired_diff_ci(a: Sequence[float], b: Sequence[float]) -> Interval | None:
    """The interval of mean(a) - mean(b), a and b the same queries'."""
    arrays = _arrays(a, b)
    return None if arrays is None else _ci(arrays, _diff_of_means, paired=True)


def ratio_ci(a: Sequence[float], b: Sequence[float]) -> Interval | None:
    """The interval of mean(a) / mean(b) (a ratio of sums), a and b the same queries'. None
    when mean(b) is 0."""
    arrays = _arrays(a, b)
    if arrays is None or not np.mean(arrays[1]):
        return None
    return _ci(arrays, _ratio_of_means, paired=True)


def excludes(ci: Sequence[float] | None, value: float) -> bool | None:
    """Whether the interval lies wholly above or below `value` (None without an interval)."""
    if ci is None:
        return None
    lo, hi = ci
    return bool(lo > value or hi < value)
