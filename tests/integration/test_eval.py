"""`ragctl eval` as a user runs it: a small run of every system on the real engine, interrupted
with Ctrl-C and resumed, then its report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragctl.settings import Settings
from ragctl.types import Query

pytestmark = pytest.mark.integration

SYSTEMS = "ragctl,fixed:map_rerank:2,fixed:stuff:2,adaptiverag,parrot,oracle"


def ragctl(args: list[str], settings: Settings, model_path: str, engine_url: str) -> list[str]:
    """The command line, on the session's vLLM server (`--model` names its tokenizer): these
    tests are about the CLI's runs and files, and an engine start per command costs minutes."""
    return [
        sys.executable, "-m", "ragctl", "--model", model_path, "--engine-url", engine_url,
        "--data-dir", str(settings.data_dir), "--cache-dir", str(settings.cache_dir),
        "--golden-every", "0", "--answer-max-tokens", "16", *args,
    ]  # fmt: skip


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_eval_run_interrupt_resume_report(
    small_squad: tuple[Settings, list[Query]], model_path: str, vllm_server, tmp_path: Path
) -> None:
    settings, _ = small_squad

    def cli(args: list[str]) -> list[str]:
        return ragctl(args, settings, model_path, vllm_server.url)

    out = tmp_path / "run"
    run = ["eval", "run", "--dataset", "squad", "--systems", SYSTEMS, "--limit", "3",
           "--calibration", "2", "--concurrency", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cli(run),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        # A test run started in the background (`make test &`) inherits SIGINT ignored; the
        # child must see Ctrl-C as a user's terminal delivers it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    samples = out / "samples.jsonl"
    deadline = time.monotonic() + 600
    while not (samples.exists() and len(rows(samples)) >= 2):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no samples written"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    kept = rows(samples)
    assert 2 <= len(kept) < 15  # 3 queries x 5 systems, interrupted part way
    assert (out / "calibration.jsonl").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["adaptiverag_table"]["*"]
    # The phase started from an empty prefix cache (the test server runs in vLLM's dev mode).
    assert meta["cold_phases"] == [True]

    # Same command without --resume: refused; with a different limit: refused; then resumed.
    again = subprocess.run(cli(run), capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    assert again.returncode == 2 and "--resume" in again.stderr
    other = [*run[:7], "4", *run[8:], "--resume"]  # --limit 4
    bad = subprocess.run(cli(other), capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "same run" in bad.stderr
    done = subprocess.run(cli([*run, "--resume"]), capture_output=True,
                          text=True, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    final = rows(samples)
    keys = [(r["system"], r["query_id"]) for r in final]
    assert len(keys) == len(set(keys)) == 15  # every job once: nothing lost, nothing twice
    assert final[: len(kept)] == kept
    assert not [r for r in final if r["error"]]
    for r in final:
        assert r["scores"]["f1"] is not None and r["config"] and r["delay_s"] > 0
        if r["system"] in ("ragctl", "adaptiverag", "parrot"):
            assert r["profile_s"] > 0
    results = json.loads((out / "results.json").read_text())
    phase = next(iter(results["rates"].values()))
    assert set(phase["systems"]) == {
        "ragctl", "fixed:map_rerank:2", "fixed:stuff:2", "adaptiverag", "parrot"
    }  # fmt: skip
    assert phase["oracle"]["n"] == 3 and "delay_ratio_vs_adaptiverag" in phase["ratios"]
    for name in ("summary.csv", "quality_vs_delay.png", "delay_cdf.png"):
        assert (out / name).stat().st_size > 0
    report = subprocess.run([sys.executable, "-m", "ragctl", "eval", "report", str(out)],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert report.returncode == 0 and "adaptiverag" in report.stdout and "oracle" in report.stdout


def test_an_open_loop_run_warms_up_and_cools_down_on_the_engine(
    small_squad: tuple[Settings, list[Query]], model_path: str, vllm_server, tmp_path: Path
) -> None:
    """The SLO benchmark's run: paced warm-up with the run's SLO, a measured phase, and a
    cool-down that goes on arriving until the measured queries finish, on the real engine."""
    settings, _ = small_squad
    out = tmp_path / "open"
    run = ["eval", "run", "--dataset", "squad", "--systems", "ragctl", "--limit", "2",
           "--rate", "10", "--warmup", "2", "--cooldown", "2", "--slo-ms", "60000",
           "--slo-mitigation", "admission", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    done = subprocess.run(ragctl(run, settings, model_path, vllm_server.url),
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    final = rows(out / "samples.jsonl")
    assert len(final) == 2 and not [r for r in final if r["error"]]
    assert all(r["rate"] == 10.0 and r["slo_ms"] == 60000 for r in final)
    meta = json.loads((out / "run.json").read_text())
    assert meta["warmup"] == meta["cooldown"] == 2
    # The SLO loop counts what it served after the warm-up: the 2 measured queries and the 2
    # of the cool-down, which arrive (0.02 and 0.09 s after the last measured one, seeded)
    # before a measured answer is done on this engine.
    assert meta["slo"]["requests"] == 4 and meta["slo"]["met"] == 4


def test_eval_ls_and_clear_errors(small_squad: tuple[Settings, list[Query]], tmp_path) -> None:
    settings, _ = small_squad
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ragctl", "--data-dir", str(settings.data_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    ls = cli("eval", "ls")
    assert ls.returncode == 0
    for word in ("squad", "musique", "qmsum", "finsec", "adaptiverag", "parrot", "oracle"):
        assert word in ls.stdout
    for args, message in [
        (["--systems", "ragctl,gpt4"], "unknown system 'gpt4'"),
        (["--rate", "fast"], "--rate takes numbers"),
        (["--rate", "0.1", "--concurrency", "2"], "not both"),
        (["--limit", "6", "--calibration", "2"], "exceed the 6 there are"),
    ]:
        r = cli("eval", "run", "--dataset", "squad", "--out", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = cli("eval", "run", "--dataset", "nope", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "unknown dataset" in r.stderr
    r = cli("eval", "report", str(tmp_path))
    assert r.returncode == 2 and "no evaluation run" in r.stderr


GRID = "stuff:1,stuff:2,map_rerank:2"


def test_eval_grid_builds_once_and_replay_reads_it(
    small_squad: tuple[Settings, list[Query]], model_path: str, vllm_server, tmp_path: Path
) -> None:
    # A grid of its own: eval run's calibration in this session answers into the shared cache.
    settings = small_squad[0].model_copy(update={"cache_dir": tmp_path / "cache"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(ragctl(list(args), settings, model_path, vllm_server.url),
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip

    sample = ["--dataset", "squad", "--limit", "2", "--calibration", "1", "--configs", GRID]
    bad = cli("eval", "grid", "--dataset", "squad", "--configs", "stuff:2,stuff")
    assert bad.returncode == 2 and "--configs" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    first = cli("eval", "grid", *sample)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "9 cells built" in first.stdout and "0 reused" in first.stdout
    [cells_file] = (settings.cache_dir / "grids" / "squad").glob("*/cells.jsonl")
    cells = rows(cells_file)
    assert len(cells) == 9 and not [c for c in cells if c["error"]]
    if not os.environ.get("RAGCTL_TEST_ENGINE_URL"):  # the fixture's server is in dev mode
        assert all(c["cold_cache"] is True for c in cells)  # each cell's delay is a cold one
    for c in cells:
        assert c["delay_s"] > 0 and c["tokens"]["prompt"] > 0 and c["stages"]
        assert c["scores"]["f1"] is not None and c["scores"]["evidence_recall"] is not None
    again = cli("eval", "grid", *sample)
    assert again.returncode == 0 and "0 cells built" in again.stdout and "9 reused" in again.stdout
    assert len(rows(cells_file)) == 9

    out = tmp_path / "replay"
    systems = "ragctl,fixed,adaptiverag,parrot,oracle"
    replay = cli("eval", "replay", *sample, "--systems", systems, "--out", str(out))
    assert replay.returncode == 0, replay.stderr[-3000:]
    replayed = rows(out / "samples.jsonl")
    assert len(replayed) == 2 * 6  # ragctl, three fixed, adaptiverag, parrot
    by_cell = {(c["query_id"], c["config"]): c for c in rows(cells_file)}
    for r in replayed:
        assert r["error"] is None and r["concurrency"] == 1
        cell = by_cell[(r["query_id"], r["config"])]  # every choice is a grid cell now
        assert r["scores"] == cell["scores"] and r["answer"] == cell["answer"]
        if r["system"].startswith("fixed:"):
            assert r["delay_s"] == cell["delay_s"] and r["profile_s"] is None
        else:
            assert r["profile_s"] > 0 and r["delay_s"] >= cell["delay_s"]
    for name in ("results.json", "summary.csv", "frontier.csv", "frontier.png"):
        assert (out / name).stat().st_size > 0
    assert "says nothing about load" in replay.stdout and "oracle" in replay.stdout

    # A second replay asks the profiler nothing and answers nothing live: the same rows.
    second = cli("eval", "replay", *sample, "--systems", systems, "--out", str(out))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 cells answered live" in second.stdout and " 0 asked" in second.stdout
    # ragctl's choices are grid cells now: the delay model learned their stages, once each,
    # after each query's decisions (the first replay learned them live, as they ran).
    learned = json.loads((out / "results.json").read_text())["meta"]["delay_model"]
    chosen = {(r["query_id"], r["config"]) for r in replayed if r["system"] == "ragctl"}
    stages = sum(len(by_cell[c]["stages"]) for c in chosen)
    assert learned["learned_on_test_queries"] == stages > 0
    noise = learned["timing_noise"]  # same-work cell pairs of the test queries, if any
    assert noise["pairs"] >= 0 and (noise["median_gap"] is None) == (noise["pairs"] == 0)
    # Cached profiles carry their first timings, so even the delays are the same. The recorded
    # candidates' predicted seconds are not: the first replay's delay model learned ragctl's
    # cells as they were answered live, the second's from the grid, after each decision.
    def settled(rs: list[dict]) -> list[dict]:
        return [{**r, "decision": {**r["decision"], "choice": None} if r["decision"] else None}
                for r in rs]  # fmt: skip

    assert settled(rows(out / "samples.jsonl")) == settled(replayed)


def test_profiler_train_status_and_bench(
    small_squad: tuple[Settings, list[Query]], model_path: str, vllm_server, tmp_path: Path
) -> None:
    """`ragctl profiler train` labels calibration queries from grid cells it answers, records
    the field profiler's beliefs and the learned profiler's features and fits; `status` shows
    the state; `bench` runs the four profilers side by side on other queries."""
    settings = small_squad[0].model_copy(update={"cache_dir": tmp_path / "cache"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = ragctl(["--objective", "latency", *args], settings, model_path, vllm_server.url)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    # golden agreement: the reference is the costlier configuration's answer, so every query
    # gets a label whatever the small model scores against the references.
    train = cli("profiler", "train", "--dataset", "squad", "--calibration", "3",
                "--configs", "stuff:1,map_rerank:2", "--agreement", "golden")  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "3 of 3 calibration queries labelled (6 cells answered)" in train.stdout
    status = cli("profiler", "status", "--dataset", "squad", "--json")
    assert status.returncode == 0, status.stderr[-3000:]
    st = json.loads(status.stdout)
    assert st["model"] == "SmolLM2-135M-Instruct" and st["collection"] == "squad"
    assert st["samples"] == 3 and st["with_features"] == 3 and st["with_beliefs"] >= 2
    assert st["learned_samples"] == 3 and st["in_use"] == "llm"  # too few labels to switch
    folder = Path(st["folder"])
    for name in ("labels.jsonl", "calibration.json", "learned.json"):
        assert (folder / name).stat().st_size > 0
    again = cli("profiler", "train", "--dataset", "squad", "--calibration", "3",
                "--configs", "stuff:1,map_rerank:2", "--agreement", "golden")  # fmt: skip
    assert "(0 cells answered)" in again.stdout  # the grid answers them
    assert len(rows(folder / "labels.jsonl")) == 6 and json.loads(
        cli("profiler", "status", "--dataset", "squad", "--json").stdout
    )["samples"] == 3  # a query labelled again replaces its label

    out = tmp_path / "bench"
    bench = cli("profiler", "bench", "--datasets", "squad", "--limit", "2", "--calibration", "3",
                "--out", str(out))  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    samples = rows(out / "samples.jsonl")
    assert len(samples) == 2 * 4 and not [s for s in samples if s["error"]]
    by = {(s["query_id"], s["profiler"]): s for s in samples}
    for (_, name), s in by.items():
        assert s["profile_s"] >= 0 and s["total_s"] > s["profile_s"]
        if name == "learned":  # the learned model answers, or says why the LLM did
            assert s["answered_by"] == "learned" or (s["answered_by"] == "llm" and s["note"])
        elif name == "auto":  # 3 labels: too few for the learned one to take any field
            assert s["answered_by"] == "llm"
        else:
            assert s["answered_by"] == name
        assert s["annotation"] is False  # SQuAD: single-fact
    res = json.loads((out / "results.json").read_text())
    profilers = res["per_dataset"]["squad"]["profilers"]
    assert set(profilers) == {"json", "llm", "learned", "auto"}
    assert all(p["seconds"]["n"] == 2 for p in profilers.values())
    assert res["learned_predict_s"]["n"] == 1000
    assert "AUC of P(joint)" in bench.stdout
