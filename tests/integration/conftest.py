"""Integration fixtures: the real vLLM OpenAI-compatible server, started once per test session,
and a small real collection.

`vllm_server` runs `python -m vllm.entrypoints.openai.api_server` on the embedded model with a
1 GiB KV cache and priority scheduling, waits for `/health`, and stops it at the end. Set
RAGCTL_TEST_ENGINE_URL (and RAGCTL_TEST_ENGINE_MODEL, default `ragctl-test`) to use a server that
is already running instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ragctl.retrieval.collection import load_queries
from ragctl.settings import Settings
from ragctl.types import Query

SERVED_NAME = "ragctl-test"
STARTUP_TIMEOUT_S = 240.0
"""~35 s alone; much longer when another engine shares the two cores."""


@dataclass(frozen=True)
class VLLMServer:
    url: str
    model: str
    """The served model name."""
    log: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # The server leads its own process group (start_new_session): this also ends the engine
        # core process it spawned.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def vllm_server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    given = os.environ.get("RAGCTL_TEST_ENGINE_URL")
    if given:
        yield VLLMServer(given, os.environ.get("RAGCTL_TEST_ENGINE_MODEL", SERVED_NAME))
        return
    pytest.importorskip("vllm", reason="the vLLM server tests need vLLM installed")
    with running_vllm_server(model_path, tmp_path_factory.mktemp("vllm") / "server.log") as (
        server,
        _,
    ):
        yield server


@contextlib.contextmanager
def running_vllm_server(
    model_path: str, log: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[VLLMServer, subprocess.Popen[bytes]]]:
    """Start a vLLM server on `port` (default: a free loopback port), wait until it is
    healthy, stop it after. `extra_args` go last on its command line (so they override the
    defaults above)."""
    port = port or free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--max-model-len", "4096",
        "--enforce-eager",
        "--scheduling-policy", "priority",
        *extra_args,
    ]  # fmt: skip
    env = {
        **os.environ,
        # A small cache keeps the server light beside other engines on the machine.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # POST /reset_prefix_cache, which the outcome grid calls before each cell.
        "VLLM_SERVER_DEV_MODE": "1",
    }
    url = f"http://127.0.0.1:{port}"
    proc = _start_and_wait(cmd, env, log, url, "vLLM server")
    try:
        yield VLLMServer(url, SERVED_NAME, log), proc
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def small_squad(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, list[Query]]:
    """A data dir holding 80 SQuAD paragraphs plus the gold ones of 6 questions."""
    root = tmp_path_factory.mktemp("data")
    (root / "squad").mkdir()
    queries = load_queries(data_dir, "squad")[:6]
    gold = {g for q in queries for g in q.gold_doc_ids}
    keep_q = {q.id for q in queries}
    with open(data_dir / "squad" / "corpus.jsonl") as src:
        rows = [line for i, line in enumerate(src) if i < 80 or json.loads(line)["id"] in gold]
    (root / "squad" / "corpus.jsonl").write_text("".join(rows))
    with open(data_dir / "squad" / "queries.jsonl") as src:
        qrows = [line for line in src if json.loads(line)["id"] in keep_q]
    (root / "squad" / "queries.jsonl").write_text("".join(qrows))
    settings = Settings(data_dir=root, cache_dir=tmp_path_factory.mktemp("cache"))
    return settings, load_queries(root, "squad")


@dataclass(frozen=True)
class RagctlServer:
    url: str
    api_key: str | None
    log: Path
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def running_ragctl_server(
    global_args: list[str], serve_args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[RagctlServer]:
    """`ragctl <global_args> serve <serve_args>` on a free loopback port, as a user runs it;
    waits for /health, stops it after."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "ragctl", *global_args,
        "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args,
    ]  # fmt: skip
    full_env = {
        **os.environ,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    key = serve_args[serve_args.index("--api-key") + 1] if "--api-key" in serve_args else None
    url = f"http://127.0.0.1:{port}"
    proc = _start_and_wait(cmd, full_env, log, url, "ragctl serve")
    try:
        yield RagctlServer(url, key, log, proc)
    finally:
        _stop(proc)
        leftover = _group_alive(proc.pid)
        if leftover:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    # A stopped server must not leave its engine behind (each holds GiBs of memory).
    assert not leftover, "ragctl serve exited on SIGTERM but left processes behind"


def _start_and_wait(
    cmd: list[str], env: dict[str, str], log: Path, url: str, what: str
) -> subprocess.Popen[bytes]:
    """Start `cmd` as its own process group, logging to `log`; wait until `url`/health answers
    200 (fail with the log's tail if it exits or takes too long)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before it was ready:\n" + _tail(log))
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"{what} not ready after {STARTUP_TIMEOUT_S:g}s:\n" + _tail(log))
        time.sleep(1.0)


def _group_alive(pgid: int, wait_s: float = 15.0) -> bool:
    """Whether any process of group `pgid` is still running after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
