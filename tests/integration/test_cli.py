"""The `ragctl` command as a user runs it: a subprocess, against the real vLLM server (so each
call does not start its own engine), with one-line errors and non-zero exits on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ragctl.settings import Settings

from .conftest import free_port

pytestmark = pytest.mark.integration


def run(*args: str, settings: Settings, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "RAGCTL_DATA_DIR": str(settings.data_dir),
        "RAGCTL_CACHE_DIR": str(settings.cache_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "ragctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def env(small_squad, vllm_server, model_path: str) -> tuple[Settings, list[str]]:
    settings, _ = small_squad
    # --model names the served folder's tokenizer; the server is reached over HTTP.
    return settings, ["--model", model_path, "--engine-url", vllm_server.url]


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_index_builds_once_then_reuses(env) -> None:
    settings, flags = env
    first = run(*flags, "index", "--dataset", "squad", settings=settings)
    assert first.returncode == 0, first.stderr
    second = run(*flags, "index", "--dataset", "squad", settings=settings)
    assert second.returncode == 0, second.stderr
    # Same folder both times: the fingerprint did not change, nothing was rebuilt.
    assert first.stdout.split()[-2] == second.stdout.split()[-2]


@pytest.mark.parametrize(
    "method_args",
    [
        # map_rerank is the same path as stuff here (test_pipeline runs every method).
        ["--method", "stuff"],
        ["--method", "map_reduce", "--intermediate-length", "24"],
    ],
)
def test_ask_json(env, small_squad, method_args: list[str]) -> None:
    settings, flags = env
    query = small_squad[1][2]
    proc = run(
        *flags,
        "ask",
        query.question,
        "--dataset",
        "squad",
        "--chunks",
        "3",
        *method_args,
        "--json",
        settings=settings,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["decision"]["method"] == method_args[1]
    assert len(out["chunk_ids"]) == 3 and isinstance(out["answer"], str)
    assert out["tokens"]["calls"] >= 1 and out["tokens"]["prompt"] > 0
    assert {"retrieve", "synthesis", "total"} <= set(out["timings"])


def test_ask_human_readable(env, small_squad) -> None:
    settings, flags = env
    proc = run(*flags, "ask", small_squad[1][0].question, "--method", "stuff", "--chunks", "2",
               settings=settings)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "config  stuff:2 (fixed)" in proc.stdout and "tokens" in proc.stdout


def test_ask_is_adaptive_by_default(env, small_squad) -> None:
    settings, flags = env
    query = small_squad[1][1]
    proc = run(*flags, "ask", query.question, "--dataset", "squad", "--json", settings=settings)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)["decision"]
    # One query on an idle engine: the pruned space's largest configuration fits the free cache.
    assert d["reason"] == "fit"
    assert d["profile"] is not None or d["profile_note"].startswith("profiler error")
    # A note exactly when the profile was not used (low confidence or a profiler error).
    assert d["profile_used"] == (d["profile_note"] == "")
    assert d["space"]["methods"] and d["need_blocks"] >= 1
    assert d["need_blocks"] <= d["kv"]["free_blocks"] - d["reserved_blocks"]
    # The default profiler: the field profiler (its prompt version), wrapped by `auto`.
    assert d["templates"]["profiler.fields"] == "v1" and d["templates"]["profiler.learned"]
    assert d["profiler"] == "llm" and d["profiler_note"] == ""
    if d["profile"] is not None:
        assert set(d["beliefs"]) == {"joint", "complexity_high", "pieces", "summary"}
    assert d["choice"]["objective"] == "balanced" and d["choice"]["candidates"]
    human = run(*flags, "ask", query.question, settings=settings)
    assert human.returncode == 0, human.stderr
    for line in ("profile ", "space   ", "config  "):
        assert line in human.stdout, human.stdout


def test_profile_command(env, small_squad) -> None:
    settings, flags = env
    q = small_squad[1][0].question
    proc = run(*flags, "profile", q, "--dataset", "squad", "--json", settings=settings)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["template"] == "v1" and out["space"]["methods"]
    if out["profile"] is not None:
        p = out["profile"]
        assert p["complexity"] in ("high", "low") and 1 <= p["pieces"] <= 10
        assert 0 <= p["confidence"] <= 1
    else:
        assert out["error"]
    human = run(*flags, "profile", q, settings=settings)
    assert human.returncode == 0 and "profile " in human.stdout and "space " in human.stdout


BAD_RULES = """version: 1
rules:
  - name: x
    when: {joint_reasoning: maybe}
    then: {methods: [stuff], num_chunks: [1, 3]}
default_space: {methods: [stuff], num_chunks: [3, 9]}
"""


def test_rules_commands(env, tmp_path: Path) -> None:
    settings, flags = env
    ok = run("rules", "validate", settings=settings)
    assert ok.returncode == 0 and "ok, 3 rules" in ok.stdout, ok.stderr
    listing = run("rules", "ls", settings=settings)
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in ("single-fact", "joint-simple", "joint-complex"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    one_line_error(run("rules", "validate", str(bad), settings=settings), 2, "bad.yaml:4:")
    # A broken rules file stops `ask` before any engine work.
    one_line_error(run(*flags, "--rules", str(bad), "ask", "q?", settings=settings), 2, ":4:")


def test_errors_are_one_line_and_non_zero(env, tmp_path: Path) -> None:
    settings, flags = env
    one_line_error(
        run(*flags, "ask", "q?", "--dataset", "nope", settings=settings), 2, "unknown dataset"
    )
    one_line_error(run(*flags, "ask", "   ", settings=settings), 2, "empty")
    one_line_error(run(*flags, "ask", "why " * 6000, settings=settings), 2, "context")
    one_line_error(run(*flags, "ask", "q?", "--method", "nope", settings=settings), 2, "method")
    one_line_error(
        run(
            *flags,
            "ask",
            "q?",
            "--method",
            "stuff",
            "--intermediate-length",
            "9",
            settings=settings,
        ),
        2,
        "does not apply to --method stuff",
    )
    one_line_error(
        run(*flags, "ask", "q?", "--intermediate-length", "9", settings=settings),
        2,
        "fixed --method only",
    )
    missing = settings.model_copy(update={"data_dir": tmp_path / "absent"})
    one_line_error(run(*flags, "ask", "q?", settings=missing), 2, "RAGCTL_DATA_DIR")
    port = free_port()
    dead = ["--model", flags[1], "--engine-url", f"http://127.0.0.1:{port}"]
    one_line_error(run(*dead, "ask", "q?", settings=settings), 1, f"127.0.0.1:{port}")


def test_model_prepare_reuses_the_prepared_folder(model_path: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ragctl", "model", "prepare"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "already prepared" in proc.stdout and model_path in proc.stdout


def test_demo_says_what_ragctl_is_for_then_answers_beside_a_fixed_config(env) -> None:
    settings, flags = env
    proc = run(*flags, "demo", "--dataset", "squad", "--questions", "1", "--learn", "0",
               settings=settings)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.lstrip().startswith("ragctl decides, per query")  # what it is for, first
    assert "ragctl (adaptive) next to fixed stuff:5" in proc.stdout
    assert "fixed stuff:5" in proc.stdout and "profile " in proc.stdout
    assert proc.stdout.count("gold:") == 1  # one question shown (the warm-up one is not)
    assert "in all, 1 question: ragctl" in proc.stdout  # the bottom line, last


def test_sigterm_mid_grid_shuts_the_in_process_engine_down(
    small_squad, model_path: str, tmp_path
) -> None:
    """`kill` (SIGTERM) of a command running its own engine: the engine's worker processes end
    with it, and the cells written so far are whole (the grid resumes from them)."""
    settings, _ = small_squad
    cache = tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "ragctl", "--model", model_path, "--kv-cache-gib", "1",
        "--golden-every", "0", "eval", "grid", "--dataset", "squad", "--limit", "3",
        "--calibration", "0", "--configs", "stuff:1,stuff:2,stuff:3,map_rerank:2",
    ]  # fmt: skip
    env = {
        **os.environ,
        "RAGCTL_DATA_DIR": str(settings.data_dir),
        "RAGCTL_CACHE_DIR": str(cache),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # The model folder is prepared already; the index is built in this cache.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 300
        cells: list[Path] = []
        while not cells or not cells[0].read_text().strip():  # the engine answers by now
            if proc.poll() is not None:
                raise AssertionError(f"the grid ended before it was killed: {proc.stderr.read()}")
            assert time.monotonic() < deadline, "no cell within 300 s"
            time.sleep(0.5)
            cells = list((cache / "grids" / "squad").glob("*/cells.jsonl"))
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert any("EngineCore" in " ".join([p.name(), *p.cmdline()]) for p in workers)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr.decode()[-3000:]
    assert "terminated" in stderr.decode().splitlines(), stderr.decode()[-3000:]
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"orphaned: {[p.cmdline() for p in alive]}"
    for line in cells[0].read_text().splitlines():
        assert json.loads(line)["config"]  # no torn line
