"""eval/slo_hindsight.py: the hindsight fit finds the term a synthetic run's delays were made
of, tolerates an interrupted run's torn last line, and refuses a file that is not a run's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "slo_hindsight.py"


def hindsight():
    spec = importlib.util.spec_from_file_location("slo_hindsight", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_run(path: Path) -> None:
    """Arrivals at irregular times; each delay is 0.5 s + 0.4 s per request that arrived while
    it ran (solved in arrival order: a later arrival only lengthens those still running)."""
    arrivals = [0.0, 0.3, 0.5, 2.0, 2.1, 2.15, 5.0, 7.0, 7.2, 7.3, 7.35, 9.0]
    ends = [a + 0.5 for a in arrivals]
    for _ in range(50):  # fixed point: delays grow with arrivals during them
        ends = [
            a + 0.5 + 0.4 * sum(a < b < e for b in arrivals)
            for a, e in zip(arrivals, ends, strict=True)
        ]
    rows = [
        {"rate": 1.0, "arrival_s": a, "end_s": e, "delay_s": e - a,
         "tokens": {"output": 10 + i % 3}}
        for i, (a, e) in enumerate(zip(arrivals, ends, strict=True))
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"rate": 1.0, "arri')


def test_arrivals_during_a_request_explain_delays_made_of_them(tmp_path: Path) -> None:
    mod = hindsight()
    synthetic_run(tmp_path / "samples.jsonl")  # with a torn last line: skipped
    cols, y = mod.rows_of([str(tmp_path / "samples.jsonl")])
    assert len(y) == 12
    fits = mod.fit(cols, y)
    mape, coef = fits["+ arrivals while it ran"]
    assert mape < 1e-6 and coef[-1] == pytest.approx(0.4)
    assert fits["output tokens"][0] > 0.1  # the load is what the delays were made of


def test_a_file_that_is_not_a_runs_samples_is_refused(tmp_path: Path) -> None:
    mod = hindsight()
    other = tmp_path / "notes.jsonl"
    other.write_text('{"a": 1}\n')
    for path in (other, tmp_path / "missing.jsonl"):
        with pytest.raises(SystemExit, match="not an eval run's samples.jsonl"):
            mod.rows_of([str(path)])
