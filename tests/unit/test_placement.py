"""Placement across an engine pool (pure policy, hypothesis over synthetic pools) and the
admission queue over several engines (fake KV states, one event loop per example)."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragctl.errors import EngineUnreachable, ExceedsKVCache
from ragctl.scheduler import AdmissionQueue, KVLedger, choose
from ragctl.scheduler.admission import EngineSlot
from ragctl.scheduler.objective import choose_objective
from ragctl.scheduler.placement import (
    STRATEGIES,
    EngineOption,
    objective_score,
    place,
    plan_rank,
)
from ragctl.types import Config, ConfigSpace, KVState, Plan

SPACE = ConfigSpace(("stuff", "map_reduce"), (1, 9), (30, 60))
REASONS = {"fit": 2, "fallback": 1, "wait": 0}


def need(config: Config) -> int:
    """Monotone in the chunk count, like real call sizes."""
    per = 3 if config.method == "stuff" else 2
    return per * config.num_chunks + (config.intermediate_length or 0) // 15 + 1


def decide_plain(kv: KVState, reserved: int) -> Plan:
    return choose(SPACE, kv, reserved, need, joint_reasoning=True, max_chunks=9)


def decide_objective(objective: str):
    def decide(kv: KVState, reserved: int) -> Plan:
        return choose_objective(
            SPACE, kv, reserved, need, joint_reasoning=True, max_chunks=9,
            objective=objective,  # type: ignore[arg-type]
            delay=lambda c: 0.5 + 0.2 * c.num_chunks + (0.3 if c.method == "map_reduce" else 0),
            quality=lambda c: min(1.0, 0.4 + 0.07 * c.num_chunks),
        )  # fmt: skip

    return decide


@st.composite
def engines(draw):
    """(kv, reserved, healthy, inflight) of one synthetic engine."""
    total = draw(st.integers(0, 80))
    free = draw(st.integers(0, total))
    return (
        KVState(total, free, 16),
        draw(st.integers(0, 60)),
        draw(st.booleans()),
        draw(st.integers(0, 5)),
    )


def options_for(pool, decide) -> list[EngineOption]:
    return [
        EngineOption(decide(kv, reserved), healthy, inflight, kv.total_blocks)
        for kv, reserved, healthy, inflight in pool
    ]


def available(kv: KVState, reserved: int) -> int:
    return kv.free_blocks - max(0, reserved - kv.used_blocks)


@settings(max_examples=300, deadline=None)
@given(
    pool=st.lists(engines(), min_size=1, max_size=5),
    objective=st.sampled_from(["plain", "quality", "balanced", "latency"]),
    strategy=st.sampled_from(STRATEGIES),
    turn=st.integers(0, 20),
)
def test_placement_properties(pool, objective, strategy, turn) -> None:
    decide = decide_plain if objective == "plain" else decide_objective(objective)
    options = options_for(pool, decide)
    i = place(options, strategy, turn)  # type: ignore[arg-type]
    assert i is not None and 0 <= i < len(pool)
    chosen = options[i]
    kv, reserved, healthy, _ = pool[i]
    # Never more than the engine has free (after what in-flight plans reserved there).
    if chosen.plan.config is not None:
        assert chosen.plan.need_blocks <= available(kv, reserved)
    # An unhealthy engine is never chosen while a healthy one exists.
    if any(h for _, _, h, _ in pool):
        assert healthy
    if strategy != "best-fit":
        return
    # best-fit: no healthy engine offers a better reason, or (same reason) a better score.
    eligible = [o for o in options if o.healthy] or options
    best_reason = max(REASONS[o.plan.reason] for o in eligible)
    assert REASONS[chosen.plan.reason] == best_reason
    if chosen.plan.config is not None:
        same = [o for o in eligible if REASONS[o.plan.reason] == best_reason]
        assert objective_score(chosen.plan) == max(objective_score(o.plan) for o in same)
        assert plan_rank(chosen) == max(plan_rank(o) for o in same)


@settings(max_examples=200, deadline=None)
@given(
    engine=engines(),
    objective=st.sampled_from(["plain", "quality", "balanced", "latency"]),
    strategy=st.sampled_from(STRATEGIES),
)
def test_a_pool_of_one_is_todays_choice(engine, objective, strategy) -> None:
    decide = decide_plain if objective == "plain" else decide_objective(objective)
    kv, reserved, healthy, inflight = engine
    options = options_for([engine], decide)
    assert place(options, strategy) == 0  # type: ignore[arg-type]
    assert options[0].plan == decide(kv, reserved)


def test_best_fit_prefers_the_engine_where_the_larger_configuration_fits() -> None:
    small, big = KVState(12, 12, 16), KVState(40, 40, 16)
    options = options_for([(small, 0, True, 0), (big, 0, True, 3)], decide_plain)
    assert place(options) == 1  # more room: a larger configuration, despite more in flight
    assert options[1].plan.need_blocks > options[0].plan.need_blocks
    # least-loaded ignores the room: fewer plans in flight wins; round-robin takes turns.
    assert place(options, "least-loaded") == 0
    assert [place(options, "round-robin", t) for t in range(3)] == [0, 1, 0]


def test_ties_go_to_the_least_loaded_engine() -> None:
    # Both engines fit the space's largest configuration: the one with more left after it wins.
    a, b = KVState(100, 60, 16), KVState(100, 90, 16)
    options = options_for([(a, 0, True, 0), (b, 0, True, 0)], decide_plain)
    assert options[0].plan.config == options[1].plan.config
    assert place(options) == 1


def test_waiting_everywhere_names_an_engine_that_could_ever_hold_it() -> None:
    tiny, full = KVState(3, 3, 16), KVState(40, 0, 16)
    options = options_for([(tiny, 0, True, 0), (full, 0, True, 0)], decide_plain)
    assert all(o.plan.reason == "wait" for o in options)
    for strategy in STRATEGIES:
        assert place(options, strategy) == 1  # type: ignore[arg-type]


def test_place_edge_cases() -> None:
    assert place([]) is None
    with pytest.raises(ValueError, match="placement strategy"):
        place(options_for([(KVState(10, 10, 16), 0, True, 0)], decide_plain), "random")  # type: ignore[arg-type]


# -- the admission queue over a pool -----------------------------------------------------------


class FakeKV:
    """An engine that shows its whole cache free (ragctl's reservations are all that is used),
    or raises `error`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.error: Exception | None = None
        self.healthy = True

    async def __call__(self) -> KVState:
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return KVState(self.total, self.total, 16)


def pool_queue(totals, strategy="best-fit", maxsize=1000):
    kvs = [FakeKV(t) for t in totals]
    slots = [
        EngineSlot(f"e{i}", kv, KVLedger(), (lambda kv=kv: kv.healthy), f"engine-{i}")
        for i, kv in enumerate(kvs)
    ]
    return AdmissionQueue.over(slots, maxsize, poll_s=0.01, strategy=strategy), kvs


def fixed_need(blocks: int):
    """A query whose one configuration needs `blocks` (map_rerank 1 chunk)."""

    def decide(kv: KVState, reserved: int) -> Plan:
        avail = available(kv, reserved)
        if blocks <= avail:
            return Plan(Config("map_rerank", 1), "fit", blocks, kv.free_blocks, reserved)
        return Plan(None, "wait", blocks, kv.free_blocks, reserved)

    return decide


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    totals=st.lists(st.integers(4, 40), min_size=2, max_size=4),
    needs=st.lists(st.integers(1, 12), min_size=1, max_size=25),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 1000),
)
def test_concurrent_admissions_never_overcommit_any_engine(totals, needs, strategy, seed) -> None:
    rng = random.Random(seed)
    needs = [n for n in needs if n <= max(totals)]  # the rest could never fit: tested apart

    async def run() -> None:
        queue, _ = pool_queue(totals, strategy)
        done = []

        async def one(n: int) -> None:
            admitted = await queue.admit(fixed_need(n))
            slot = admitted.slot
            assert slot is not None and slot.engine == f"engine-{queue.slots.index(slot)}"
            for s, total in zip(queue.slots, totals, strict=True):
                assert s.ledger.reserved <= total
            with admitted.reservation:
                await asyncio.sleep(rng.random() * 0.01)
            done.append(n)

        async with asyncio.timeout(30):
            await asyncio.gather(*(one(n) for n in needs))
        assert sorted(done) == sorted(needs)  # every accepted query admitted, none lost
        assert all(s.ledger.reserved == 0 and s.ledger.held == 0 for s in queue.slots)

    asyncio.run(run())


async def test_an_unhealthy_or_unreadable_engine_is_skipped() -> None:
    queue, kvs = pool_queue([10, 40, 30])
    kvs[1].healthy = False
    admitted = await queue.admit(fixed_need(5))
    assert admitted.slot is queue.slots[2]  # the biggest healthy one
    admitted.reservation.release()
    kvs[2].error = EngineUnreachable("gone")
    admitted = await queue.admit(fixed_need(5))
    assert admitted.slot is queue.slots[0]
    admitted.reservation.release()
    # Every engine unhealthy: they are all tried (the call fails with the engine's own error).
    kvs[0].healthy = kvs[2].healthy = False
    admitted = await queue.admit(fixed_need(5))
    assert admitted.slot is queue.slots[1]
    admitted.reservation.release()
    for kv in kvs:
        kv.error = EngineUnreachable("all gone")
    with pytest.raises(EngineUnreachable):
        await queue.admit(fixed_need(5))


async def test_a_query_larger_than_every_engine_is_refused_and_one_that_fits_somewhere_waits() -> (
    None
):
    queue, _ = pool_queue([10, 20])
    with pytest.raises(ExceedsKVCache):
        await queue.admit(fixed_need(21))
    first = await queue.admit(fixed_need(15))  # only the big engine holds it
    assert first.slot is queue.slots[1]
    waiting = asyncio.ensure_future(queue.admit(fixed_need(15)))
    await asyncio.sleep(0.05)
    assert not waiting.done() and queue.waiting == 1
    first.reservation.release()
    second = await asyncio.wait_for(waiting, 5)
    assert second.slot is queue.slots[1] and second.queued
    second.reservation.release()
