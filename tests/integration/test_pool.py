"""An engine pool of two real vLLM servers on 127.0.0.1 (the session's shared server and one of
this module's own; the kill test runs last, kills its own and restarts it on the same port):
filling one engine sends plans to the other; a server killed mid-run loses no request (each is
answered on the other or fails with its clear error), leaves the pool, and rejoins it when it
is back.

The retriever and profiler are the unit tests' fakes (fixed chunks, a confident profile): the
engines, their KV state, the HTTP paths and the failures are real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ragctl.controller import Controller
from ragctl.engine import open_engine
from ragctl.engine.pool import EnginePool
from ragctl.errors import EngineError
from ragctl.policy import AdaptivePolicy
from ragctl.settings import Settings
from ragctl.types import Answer
from tests.unit.test_controller import RULES, FakeProfiler, FakeRetriever

from .conftest import VLLMServer, running_vllm_server

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@dataclass
class Pair:
    a: VLLMServer
    b: VLLMServer
    a_proc: object
    a_port: int
    logs: Path


@pytest.fixture(scope="module")
def pair(
    model_path: str, vllm_server: VLLMServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """Engine a: a server of this module's own (the kill test kills it); engine b: the
    session's shared server (one server start less, and one engine less alive at once)."""
    pytest.importorskip("vllm", reason="the pool tests start a vLLM server")
    logs = tmp_path_factory.mktemp("pool")
    with running_vllm_server(model_path, logs / "a.log") as (a, a_proc):
        yield Pair(a, vllm_server, a_proc, int(a.url.rsplit(":", 1)[1]), logs)


async def open_pool(pair: Pair, health_s: float = 0.5) -> tuple[EnginePool, Controller]:
    settings = Settings(
        engine_url=[pair.a.url, pair.b.url], engine_health_interval_s=health_s,
        engine_timeout_s=120,
    )  # fmt: skip
    pool = await open_engine(settings)
    assert isinstance(pool, EnginePool)
    ctl = Controller(
        pool, FakeRetriever(), rules=RULES, profiler=FakeProfiler(), answer_max_tokens=16,
        policy=AdaptivePolicy(golden_every=0), owns_engine=True,
    )  # fmt: skip
    return pool, ctl


async def test_filling_one_engine_sends_plans_to_the_other(pair: Pair) -> None:
    pool, ctl = await open_pool(pair)
    try:
        slot_a, slot_b = ctl.admission.slots
        assert (slot_a.name, slot_b.name) == (pair.a.url, pair.b.url)
        for full, other in ((slot_a, pair.b.url), (slot_b, pair.a.url)):
            kv = await full.kv_state()
            held = full.ledger.reserve(kv.total_blocks)  # as a long request would hold it
            try:
                answers = await asyncio.gather(
                    *(ctl.aask(f"Where was Super Bowl {50 + i} played?") for i in range(3))
                )
            finally:
                held.release()
            assert {x.decision.engine for x in answers} == {other}
            assert all(x.decision.reason in ("fit", "fallback") for x in answers)
        assert all(s.ledger.reserved == 0 for s in ctl.admission.slots)
    finally:
        await ctl.aclose()


async def test_a_killed_engine_loses_no_request_and_rejoins_when_back(
    pair: Pair, model_path: str
) -> None:
    pool, ctl = await open_pool(pair)
    member_a = pool.members[0]
    with contextlib.ExitStack() as stack:
        try:
            n = 8
            tasks = [
                asyncio.ensure_future(ctl.aask(f"Who played in Super Bowl {40 + i}?"))
                for i in range(n)
            ]
            slot_a = ctl.admission.slots[0]
            async with asyncio.timeout(120):
                while slot_a.ledger.held == 0:  # plans are running on engine a
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            os.killpg(pair.a_proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
            killed_at = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), timeout=300
            )
            answered = [r for r in results if isinstance(r, Answer)]
            failed = [r for r in results if not isinstance(r, Answer)]
            # None lost: each answered, or failed with the engine's clear error.
            assert len(answered) + len(failed) == n
            assert all(isinstance(e, EngineError) for e in failed), failed
            assert all(pair.a.url in str(e) for e in failed), failed
            # Engine a has left the pool; every new request is answered on b.
            async with asyncio.timeout(30):
                while member_a.healthy:
                    await asyncio.sleep(0.1)
            after = await asyncio.gather(
                *(ctl.aask(f"Where was Super Bowl {50 + i} played?") for i in range(4))
            )
            assert {x.decision.engine for x in after} == {pair.b.url}
            print(
                f"\nkill test: {len(answered)} answered, {len(failed)} failed with "
                f"{sorted({type(e).__name__ for e in failed})}, replanned "
                f"{ctl.counters['replanned']}; a left the pool "
                f"{(member_a.down_since or killed_at) - killed_at:.2f}s after the kill"
            )
            # The server comes back on the same port: the health check lets it rejoin.
            await asyncio.to_thread(
                stack.enter_context,
                running_vllm_server(model_path, pair.logs / "a-again.log", port=pair.a_port),
            )
            ready_at = time.monotonic()
            async with asyncio.timeout(30):
                while not member_a.healthy:
                    await asyncio.sleep(0.1)
            print(f"kill test: a rejoined {time.monotonic() - ready_at:.2f}s after it was ready")
            slot_b = ctl.admission.slots[1]
            held = slot_b.ledger.reserve((await slot_b.kv_state()).total_blocks)
            try:
                back = await ctl.aask("Where was Super Bowl 50 played?")
            finally:
                held.release()
            assert back.decision.engine == pair.a.url
            assert all(s.ledger.reserved == 0 for s in ctl.admission.slots)
        finally:
            await ctl.aclose()
