"""SIGTERM unwinds a ragctl command as Ctrl-C does: async context managers (the engine's, in a
real command) close, and the exit says it was terminated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import contextlib, sys
    import anyio, typer
    from ragctl.cli.common import run_app

    app = typer.Typer()

    @contextlib.asynccontextmanager
    async def engine():
        try:
            yield
        finally:
            with open(sys.argv[1], "w") as f:
                f.write("closed")

    @app.command()
    def work() -> None:
        async def main() -> None:
            async with engine():
                print("ready", flush=True)
                await anyio.sleep(60)
        anyio.run(main)

    @app.command()
    def other() -> None:
        pass

    run_app(app, ["work"])
    """
)


def block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    "inherited",
    [None, block_sigterm, ignore_sigint],
    ids=["plain", "sigterm-blocked", "sigint-ignored"],
)
def test_sigterm_closes_what_is_open_and_exits_143(tmp_path: Path, inherited) -> None:
    """Also when the process starts with SIGTERM blocked (a mask passes to children: engine
    libraries in a test process block it) or SIGINT ignored (as a background job may): either
    would leave the SIGTERM without effect and the command running."""
    marker = tmp_path / "closed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(marker)],
        preexec_fn=inherited,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert marker.read_text() == "closed"  # the context manager's exit ran
    assert stderr.strip().splitlines()[-1] == "terminated"
    assert "Traceback" not in stderr
