"""What an SLO benchmark's delays are made of, in hindsight: fit each answered request's delay
(relative least squares) against its output tokens (as generated: also known only after), the
requests in flight when it arrived (known when it is planned) and the requests that arrived
while it ran (known only after), and print each fit's mean absolute percentage error. If
arrivals during a request explain its delay far better than the load at its arrival,
admission-time predictions are bounded by what has not arrived yet.

    python eval/slo_hindsight.py eval/out/slo-NAME/s1/off/samples.jsonl [more samples.jsonl ...]
"""

from __future__ import annotations

import sys

import numpy as np

from ragctl.evaluation.writers import load_samples

FITS = {
    "output tokens": ["const", "output"],
    "+ in flight at arrival": ["const", "output", "inflight", "output x inflight"],
    "+ arrivals while it ran": ["const", "output", "during"],
    "all": ["const", "output", "inflight", "output x inflight", "during"],
}


def rows_of(paths: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    cols: dict[str, list[float]] = {k: [] for k in FITS["all"]}
    delays: list[float] = []
    for path in paths:
        try:
            rows = load_samples(path)  # a torn last line (an interrupted run) is skipped
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"{path}: not an eval run's samples.jsonl ({e})")
        if not rows or any("arrival_s" not in r for r in rows):
            sys.exit(f"{path}: not an eval run's samples.jsonl (no rows with arrival_s)")
        for rate in {r["rate"] for r in rows}:
            phase = [r for r in rows if r["rate"] == rate and r.get("delay_s") and r.get("tokens")]
            for r in phase:
                start, end = r["arrival_s"], r["end_s"]
                others = [o for o in phase if o is not r]
                inflight = sum(o["arrival_s"] <= start < o["end_s"] for o in others)
                during = sum(start < o["arrival_s"] < end for o in others)
                out = r["tokens"]["output"]
                values = {"const": 1, "output": out, "inflight": inflight,
                          "output x inflight": out * inflight, "during": during}  # fmt: skip
                for k, v in values.items():
                    cols[k].append(float(v))
                delays.append(float(r["delay_s"]))
    return {k: np.array(v) for k, v in cols.items()}, np.array(delays)


def fit(cols: dict[str, np.ndarray], y: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """Per fit of `FITS`: its MAPE and coefficients (relative least squares)."""
    out = {}
    for name, keys in FITS.items():
        X = np.column_stack([cols[k] for k in keys])
        coef, *_ = np.linalg.lstsq(X / y[:, None], np.ones_like(y), rcond=None)
        out[name] = (float(np.mean(np.abs(X @ coef - y) / y)), coef)
    return out


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit("usage: python eval/slo_hindsight.py SAMPLES.jsonl [SAMPLES.jsonl ...]")
    cols, y = rows_of(paths)
    if not len(y):
        sys.exit("no answered requests with token counts in these files")
    print(f"{len(y)} answered requests from {len(paths)} file(s); delay ~ linear in:")
    for name, (mape, coef) in fit(cols, y).items():
        terms = ", ".join(f"{k} {c:.3f}" for k, c in zip(FITS[name], coef, strict=True))
        print(f"  {name:<26} MAPE {mape:4.0%}   ({terms})")


if __name__ == "__main__":
    main(sys.argv[1:])
