"""An engine that dies mid-request: the caller gets a typed, clear error (never a hang, never a
silent empty answer), and `ragctl serve` in front of it says so in OpenAI error JSON. Each test
starts and kills its own engine, so the shared ones stay up."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest

from ragctl.engine.local import LocalEngine
from ragctl.engine.remote import RemoteEngine
from ragctl.errors import EngineUnavailable
from ragctl.settings import Settings
from ragctl.types import GenerationRequest, Message, Query

from .conftest import running_ragctl_server, running_vllm_server
from .test_server import assert_openai_error, chat_body, metric, post

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


async def test_remote_server_stalls_then_dies_mid_request(
    model_path: str, small_squad: tuple[Settings, list[Query]], tmp_path
) -> None:
    """One vLLM server of this test's own, behind `ragctl serve --engine-url` and a
    RemoteEngine of the test's: frozen (SIGSTOP), serve's engine call times out (504); resumed,
    then killed mid-request, the engine's call fails with EngineUnavailable naming the server
    and later calls fail fast; serve answers 502 and its /health 503. (One server start for
    both: each costs ~40 s of the suite.)"""
    settings, queries = small_squad
    with running_vllm_server(model_path, tmp_path / "vllm.log") as (server, proc):
        global_args = [
            "--data-dir", str(settings.data_dir), "--cache-dir", str(settings.cache_dir),
            "--golden-every", "0", "--answer-max-tokens", "16",
        ]  # fmt: skip
        serve_args = ["--dataset", "squad", "--engine-url", server.url]
        env = {"RAGCTL_ENGINE_TIMEOUT_S": "15"}
        with running_ragctl_server(global_args, serve_args, tmp_path / "serve.log", env) as rs:
            body = chat_body(queries[0].question, model="ragctl/stuff", num_chunks=1)

            def chat() -> httpx.Response:  # off the event loop: the engine's calls run on it
                return post(rs, "/v1/chat/completions", json=body)

            # A fresh server's first calls can be slow on a busy machine: warm it up first.
            codes = [(await asyncio.to_thread(chat)).status_code]
            while codes[-1] != 200 and len(codes) < 4:
                codes.append((await asyncio.to_thread(chat)).status_code)
            assert codes[-1] == 200, codes
            label = '{model="ragctl/stuff",outcome="error"}'
            errors_before = metric(rs, "ragctl_requests_total", label)
            os.killpg(proc.pid, signal.SIGSTOP)
            try:
                t = time.monotonic()
                assert_openai_error(await asyncio.to_thread(chat), 504, "engine_timeout")
                assert time.monotonic() - t < 60
            finally:
                os.killpg(proc.pid, signal.SIGCONT)

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
            proc.wait(timeout=30)

            err = assert_openai_error(await asyncio.to_thread(chat), 502)
            assert err["code"] in ("engine_unavailable", "engine_error"), err
            assert_openai_error(httpx.get(f"{rs.url}/health", timeout=30), 503)
            assert metric(rs, "ragctl_requests_total", label) == errors_before + 2


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
