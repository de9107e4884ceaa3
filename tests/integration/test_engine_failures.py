"""An engine that dies mid-request: the caller gets a typed, clear error (never a hang, never a
silent empty answer). Each test starts and kills its own engine, so the shared ones stay up."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest

from ragctl.engine.local import LocalEngine
from ragctl.engine.remote import RemoteEngine
from ragctl.errors import EngineUnavailable
from ragctl.types import GenerationRequest, Message

from .conftest import running_vllm_server

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

# Long enough (1,500 decode steps, end-of-sequence ignored so greedy decoding cannot stop it
# early on a CPU whose kernels round differently) that the kill lands while it runs.
LONG = GenerationRequest(
    (Message("user", "Count from one to one thousand in words."),),
    max_tokens=1500,
    ignore_eos=True,
    tag="doomed",
)


async def wait_until_running(call: asyncio.Task, kv_state) -> None:
    """Until the engine holds KV blocks for `call`; fails at once if the call already ended."""
    for _ in range(1200):
        if call.done():
            raise AssertionError(f"the call ended before the kill: {call.result()!r:.200}")
        kv = await kv_state()
        if kv.free_blocks < kv.total_blocks:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the call never started")


async def test_remote_server_killed_mid_request(model_path: str, tmp_path) -> None:
    with running_vllm_server(model_path, tmp_path / "server.log") as (server, proc):
        engine = await RemoteEngine.connect(server.url, timeout_s=120)
        try:
            call = asyncio.create_task(engine.generate([LONG]))
            await wait_until_running(call, engine.kv_state)
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its engine core, at once
            with pytest.raises(EngineUnavailable, match=server.url):
                await asyncio.wait_for(call, timeout=60)
            # Later calls fail fast and say why.
            with pytest.raises(EngineUnavailable):
                await asyncio.wait_for(engine.generate([LONG]), timeout=60)
        finally:
            await engine.aclose()


async def test_in_process_engine_core_killed_mid_request(model_path: str) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = LocalEngine.start(model_path, kv_cache_gib=1)
    try:
        # The engine core and its workers; not multiprocessing's resource tracker, which the
        # rest of the session still needs.
        core = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and "EngineCore" in " ".join([p.name(), *p.cmdline()])
        ]
        assert core, "vLLM should run its engine core in a child process"
        doomed = core + [c for p in core for c in p.children(recursive=True)]
        call = asyncio.create_task(engine.generate([LONG]))
        await wait_until_running(call, engine.kv_state)
        for p in doomed:
            p.kill()
        with pytest.raises(EngineUnavailable, match="died"):
            await asyncio.wait_for(call, timeout=60)
    finally:
        await engine.aclose()
