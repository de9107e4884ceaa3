"""`ragctl allocate` as a user runs it on the real engine (profile, fit, solve, write the plan),
then `ragctl eval run --plan` applying it with an SLO, and the SLO figures in results.json."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ragctl.allocation.plan import load_plan
from ragctl.settings import Settings
from ragctl.types import Query
from tests.integration.test_eval import ragctl, rows

pytestmark = pytest.mark.integration

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_allocate_then_eval_with_the_plan_and_an_slo(
    small_squad: tuple[Settings, list[Query]], model_path: str, vllm_server, tmp_path: Path
) -> None:
    settings, _ = small_squad

    def cli(args: list[str]) -> list[str]:
        return ragctl(args, settings, model_path, vllm_server.url)

    plan = tmp_path / "plan.yaml"
    alloc = ["allocate", "--dataset", "squad", "--out", str(plan), "--sample", "2",
             "--batch-sizes", "1,4,8", "--engine-batch-sizes", "1,2,4",
             "--repeats", "2"]  # fmt: skip
    done = subprocess.run(cli(alloc), capture_output=True, text=True,
                          env=ENV, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted throughput" in done.stdout.lower()
    doc = yaml.safe_load(plan.read_text())
    assert doc["predicted_throughput_qps"] > 0 and doc["concurrency"] >= 1
    assert doc["settings"]["max_num_seqs"] in (1, 2, 4)
    assert doc["settings"]["embed_batch_size"] in (1, 4, 8)
    components = {c["component"] for c in doc["curves"]}
    # Retrieval and profiling, and the synthesis stages the adaptive path chose for the sample
    # (which method depends on best-fit's objective: map_reduce's map, map_rerank's answer or
    # stuff's).
    assert {"embed", "search", "profile"} <= components
    assert components & {"map", "answer", "stuff"}
    assert (tmp_path / "plan.curves.json").exists() and (tmp_path / "plan.png").exists()
    allocation = load_plan(plan)
    assert allocation.settings_overrides() == doc["settings"]

    # The plan applies to a run; with an SLO every row carries it and results.json counts it.
    out = tmp_path / "run"
    base = ["eval", "run", "--dataset", "squad", "--systems", "ragctl,fixed:stuff:2",
            "--limit", "2"]  # fmt: skip
    run = [*base, "--out", str(out), "--plan", str(plan), "--slo-ms", "600000",
           "--slo-mitigation", "patchwork"]  # fmt: skip
    done = subprocess.run(cli(run), capture_output=True, text=True,
                          env=ENV, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "run.json").read_text())
    assert meta["plan"] == doc["settings"] and meta["concurrency"] == doc["concurrency"]
    assert meta["slo_ms"] == 600000 and meta["slo_mitigation"] == "patchwork"
    assert meta["slo"]["requests"] == 4 and meta["slo"]["prediction"]["n"] >= 1
    samples = rows(out / "samples.jsonl")
    assert len(samples) == 4
    for r in samples:
        assert r["slo_ms"] == 600000 and r["decision"]["slo"]["mitigation"] == "patchwork"
    results = json.loads((out / "results.json").read_text())
    (phase,) = results["rates"].values()
    slo = phase["systems"]["ragctl"]["slo"]
    assert slo["requests"] == 2 and slo["met"] + slo["violations"] == 2
    assert "SLO ragctl:" in done.stdout

    # A plan with a typo is a one-line error before the engine starts.
    bad = tmp_path / "bad.yaml"
    bad.write_text(plan.read_text().replace("max_num_seqs", "max_num_seq"))
    refused = subprocess.run(
        cli([*base, "--out", str(tmp_path / "other"), "--plan", str(bad)]),
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "max_num_seq" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
