"""The real vLLM OpenAI-compatible server, started once per test session.

`vllm_server` runs `python -m vllm.entrypoints.openai.api_server` on the embedded model with a
1 GiB KV cache and priority scheduling, waits for `/health`, and stops it at the end. Set
RAGCTL_TEST_ENGINE_URL (and RAGCTL_TEST_ENGINE_MODEL, default `ragctl-test`) to use a server that
is already running instead.
"""

from __future__ import annotations

import contextlib
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

    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
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
    ]  # fmt: skip
    env = {
        **os.environ,
        # A small cache keeps the server light beside other engines on the machine.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"vLLM server exited with {proc.returncode} before it was ready; log tail:\n"
                    + _tail(log)
                )
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM server not ready after {STARTUP_TIMEOUT_S:g}s; log tail:\n" + _tail(log)
                )
            time.sleep(1.0)
        yield VLLMServer(url, SERVED_NAME, log)
    finally:
        _stop(proc)
