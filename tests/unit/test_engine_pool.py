"""The engine pool with fake engines: members leave on unreachable / timed-out calls and rejoin
when their health check passes; the controller places plans across the pool, records the
engine, and re-plans a query whose engine could not be reached."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from ragctl.controller import admission_for
from ragctl.engine.pool import (
    EnginePool,
    EngineSpec,
    PoolHealth,
    PoolMember,
    label_of,
    parse_pool_file,
    pool_specs,
)
from ragctl.errors import (
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    EngineUnreachable,
    InvalidSetting,
    PromptTooLong,
)
from ragctl.settings import Settings
from ragctl.types import Config, Generation, GenerationRequest, KVState
from tests.unit.test_controller import FakeEngine, controller

REQ = GenerationRequest(prompt="Hi", max_tokens=1)


class PoolFake(FakeEngine):
    """A FakeEngine with a KV cache of `total_blocks`, that can be `down` (every call and
    health check fails as a refused connection) or `broken` (calls fail mid-call)."""

    def __init__(self, total_blocks: int = 10_000) -> None:
        super().__init__(total_blocks)
        self.down = False
        self.broken = False
        self.calls = 0

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if self.down:
            raise EngineUnreachable("cannot reach the fake engine: connection refused")
        self.calls += 1
        if self.broken:
            raise EngineUnavailable("lost the connection to the fake engine mid-call")
        return await super().generate(requests)

    async def kv_state(self) -> KVState:
        if self.down:
            raise EngineUnreachable("cannot reach the fake engine: connection refused")
        return await super().kv_state()


def pool_of(*engines: PoolFake, interval_s: float = 0.0) -> EnginePool:
    return EnginePool.of(
        [(e, f"http://e{i}") for i, e in enumerate(engines)], PoolHealth(interval_s, 1.0)
    )


# -- members and health ------------------------------------------------------------------------


async def test_a_member_leaves_on_an_unreachable_call_and_rejoins_on_a_passing_check() -> None:
    fake = PoolFake()
    member = PoolMember(fake, "http://e0")
    fake.down = True
    with pytest.raises(EngineUnreachable):
        await member.generate([REQ])
    assert not member.healthy and "connection refused" in member.last_error
    assert not await member.check()  # still down
    fake.down = False
    assert await member.check() and member.healthy
    assert member.transitions == 2


@pytest.mark.parametrize(
    ("error", "leaves"),
    [
        (EngineTimeout("timed out"), True),
        (EngineUnavailable("lost"), True),
        (EngineError("HTTP 500"), False),
        (PromptTooLong("too long"), False),
    ],
)
async def test_which_errors_take_a_member_out(error, leaves) -> None:
    class Failing(PoolFake):
        async def generate(self, requests):
            raise error

    member = PoolMember(Failing(), "m")
    with pytest.raises(type(error)):
        await member.generate([REQ])
    assert member.healthy is (not leaves)


async def test_the_pool_routes_its_own_calls_to_the_first_healthy_member() -> None:
    a, b = PoolFake(), PoolFake()
    pool = pool_of(a, b)
    await pool.generate([REQ])
    assert (a.calls, b.calls) == (1, 0)
    pool.members[0].mark_down("test")
    await pool.generate([REQ])
    assert (a.calls, b.calls) == (1, 1)
    assert pool.primary() is pool.members[1]


async def test_periodic_health_checks_take_members_out_and_back() -> None:
    a, b = PoolFake(), PoolFake()
    pool = pool_of(a, b, interval_s=0.02)
    pool.start_health_checks()
    try:
        a.down = True
        async with asyncio.timeout(5):
            while pool.members[0].healthy:
                await asyncio.sleep(0.01)
        assert pool.healthy_members() == [pool.members[1]]
        a.down = False
        async with asyncio.timeout(5):
            while not pool.members[0].healthy:
                await asyncio.sleep(0.01)
    finally:
        await pool.aclose()
    assert a.closed and b.closed


async def test_pool_check_health_fails_only_when_every_member_is_down() -> None:
    a, b = PoolFake(), PoolFake()
    pool = pool_of(a, b)
    a.down = True
    await pool.check_health()
    b.down = True
    with pytest.raises(EngineUnavailable, match="no engine of the pool is healthy"):
        await pool.check_health()


def test_pool_specs_from_urls_and_a_pool_file(tmp_path) -> None:
    f = tmp_path / "pool.txt"
    f.write_text("# engines\nhttp://b:8001  max_num_seqs=4\n\nlocal max_num_seqs=2  # mine\n")
    s = Settings(engine_url=["http://a:8000", " http://c:8002 "], engine_pool_file=f)
    assert s.engine_url == "http://a:8000,http://c:8002"
    assert pool_specs(s) == [
        EngineSpec("http://a:8000"),
        EngineSpec("http://c:8002"),
        EngineSpec("http://b:8001", 4),
        EngineSpec(None, 2),
    ]
    assert pool_specs(Settings()) == [EngineSpec(None)]
    assert pool_specs(Settings(engine_url="http://a:8000")) == [EngineSpec("http://a:8000")]
    assert Settings(engine_url="").engine_url is None
    with pytest.raises(InvalidSetting, match="pool.txt:1"):
        parse_pool_file("http://x seqs=3", "pool.txt")
    with pytest.raises(InvalidSetting, match="at most one in-process"):
        pool_specs(Settings(engine_url="local,local"))


def test_a_pool_names_each_engine_once() -> None:
    with pytest.raises(InvalidSetting, match="twice"):
        EnginePool.of([(PoolFake(), "x"), (PoolFake(), "x")])


# -- the controller on a pool ------------------------------------------------------------------


async def test_a_pool_of_one_engine_is_todays_controller() -> None:
    ctl = controller()
    assert len(ctl.admission.slots) == 1
    answer = await ctl.aask("Where was Super Bowl 50 played?")
    assert answer.decision.engine == "in-process"
    assert answer.decision.to_dict()["engine"] == "in-process"


async def test_the_plan_goes_to_the_engine_with_room_for_the_better_configuration() -> None:
    small, big = PoolFake(total_blocks=6), PoolFake(total_blocks=10_000)
    pool = pool_of(small, big)
    ctl = controller(engine=pool)
    assert [s.name for s in ctl.admission.slots] == ["http://e0", "http://e1"]
    answer = await ctl.aask("Where was Super Bowl 50 played?")
    assert answer.decision.engine == "http://e1"
    assert (small.calls, big.calls) == (0, 1)
    assert all(s.ledger.reserved == 0 for s in ctl.admission.slots)


async def test_a_held_engine_sends_the_next_plans_to_the_other() -> None:
    a, b = PoolFake(total_blocks=40), PoolFake(total_blocks=40)
    ctl = controller(engine=pool_of(a, b))
    a_slot, b_slot = ctl.admission.slots
    held = a_slot.ledger.reserve(35)  # a long request holds most of engine a
    answers = await asyncio.gather(*(ctl.aask(f"question {i}?") for i in range(3)))
    assert {x.decision.engine for x in answers} == {"http://e1"}
    held.release()


async def test_an_unreachable_engine_is_left_and_the_query_replanned_on_another() -> None:
    a, b = PoolFake(), PoolFake(total_blocks=9_000)
    pool = pool_of(a, b)
    ctl = controller(engine=pool)
    # `a` is picked (more room), dies between admission and its first call: the KV read
    # passed, the call is refused.
    original = a.kv_state

    async def kv_then_die() -> KVState:
        kv = await original()
        a.down = True
        return kv

    a.kv_state = kv_then_die  # type: ignore[method-assign]
    answer = await ctl.aask("Where was Super Bowl 50 played?")
    assert answer.text == "Denver" and answer.decision.engine == "http://e1"
    assert ctl.counters["replanned"] == 1
    assert not pool.members[0].healthy and pool.members[1].healthy
    assert all(s.ledger.reserved == 0 for s in ctl.admission.slots)
    # Later queries skip the engine while it is out of the pool.
    answer = await ctl.aask("Who won Super Bowl 50?")
    assert answer.decision.engine == "http://e1" and ctl.counters["replanned"] == 1


async def test_a_call_that_fails_after_it_started_fails_with_its_error() -> None:
    a, b = PoolFake(), PoolFake(total_blocks=9_000)
    pool = pool_of(a, b)
    ctl = controller(engine=pool)
    a.broken = True
    with pytest.raises(EngineUnavailable, match="mid-call"):
        await ctl.aask("Where was Super Bowl 50 played?")
    assert ctl.counters["replanned"] == 0
    assert not pool.members[0].healthy
    assert all(s.ledger.reserved == 0 for s in ctl.admission.slots)
    answer = await ctl.aask("Where was Super Bowl 50 played?")
    assert answer.decision.engine == "http://e1"


async def test_every_engine_unreachable_fails_with_the_engines_error() -> None:
    a, b = PoolFake(), PoolFake()
    ctl = controller(engine=pool_of(a, b))
    a.down = b.down = True
    with pytest.raises(EngineUnreachable):
        await ctl.aask("Where was Super Bowl 50 played?")
    assert all(s.ledger.reserved == 0 for s in ctl.admission.slots)


async def test_fixed_configurations_go_to_the_least_busy_healthy_engine() -> None:
    a, b = PoolFake(), PoolFake()
    pool = pool_of(a, b)
    ctl = controller(engine=pool)
    held = ctl.admission.slots[0].ledger.reserve(1)
    answer = await ctl.aask("Who won?", Config("stuff", 1))
    assert answer.decision.engine == "http://e1" and answer.decision.reason == "fixed"
    held.release()
    pool.members[1].mark_down("test")
    answer = await ctl.aask("Who won?", Config("stuff", 1))
    assert answer.decision.engine == "http://e0"


def test_placement_strategies_reach_the_admission_queue() -> None:
    pool = pool_of(PoolFake(), PoolFake())
    assert admission_for(pool, 8, "round-robin").strategy == "round-robin"
    assert label_of(pool.members[1]) == "http://e1"


async def test_the_server_reports_each_engine_and_where_plans_ran() -> None:
    import httpx

    from ragctl.server import ServerOptions
    from ragctl.server.app import create_app
    from ragctl.service import Service
    from tests.unit.test_controller import RULES, FakeProfiler

    a, b = PoolFake(total_blocks=6), PoolFake()
    pool = pool_of(a, b)
    service = Service(Settings(), pool, FakeProfiler(), RULES)  # type: ignore[arg-type]
    ctl = controller(engine=pool, admission=service.admission)
    service.controllers["squad"] = ctl
    app = create_app(service, ServerOptions("squad"))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    body = {"model": "ragctl/auto", "messages": [{"role": "user", "content": "Who won?"}]}
    async with client:
        resp = await client.post("/v1/chat/completions", json=body)
        pool.members[0].mark_down("test")
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
    assert resp.status_code == 200
    assert resp.json()["ragctl"]["decision"]["engine"] == "http://e1"
    assert health["engines"][0] == {"engine": "http://e0", "healthy": False,
                                    "kv_reserved_blocks": 0}  # fmt: skip
    assert 'ragctl_engine_healthy{engine="http://e0"} 0.0' in metrics
    assert 'ragctl_engine_healthy{engine="http://e1"} 1.0' in metrics
    assert 'ragctl_engine_placements_total{engine="http://e1"} 1.0' in metrics
