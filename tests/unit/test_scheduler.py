"""Scheduler examples: the KV memory model, best-fit choice, and the admission queue over a
synthetic engine (expected values worked out by hand in the comments)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from ragctl.errors import ExceedsKVCache, InvalidRequest, QueueFull
from ragctl.scheduler import (
    AdmissionQueue,
    KVLedger,
    blocks_for,
    choose,
    config_need,
    fallback_configs,
    unshown_reserved,
)
from ragctl.synthesis.methods import CallEstimate, Synthesizer
from ragctl.types import Chunk, Config, ConfigSpace, KVState, Plan

# -- memory model ------------------------------------------------------------------------------


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(t, 16) for t in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert blocks_for(5, 1) == 5
    with pytest.raises(ValueError):
        blocks_for(10, 0)
    with pytest.raises(ValueError):
        blocks_for(-1, 16)


def test_config_need_is_the_peak_stage_plus_buffer() -> None:
    mappers = [CallEstimate("map", 100, 50)] * 3  # 150 tokens -> 10 blocks each, 30 together
    reducer = [CallEstimate("reduce", 400, 100)]  # 500 tokens -> 32 blocks
    assert config_need(mappers + reducer, 16, 2) == 32 + 2  # the reducer is the peak
    mappers = [CallEstimate("map", 100, 50)] * 5  # 50 blocks together
    assert config_need(mappers + reducer, 16, 2) == 50 + 2  # now the mapper stage is
    assert config_need(mappers + reducer, 16, 0) == 50


def test_config_need_rounds_each_call_not_the_stage() -> None:
    # Two 1-token sequences hold a block each: 2 blocks, not ceil(2 / 16) = 1.
    assert config_need([CallEstimate("rerank", 1, 0), CallEstimate("rerank", 0, 1)], 16, 0) == 2
    assert config_need([CallEstimate("answer", 10, 7)], 16, 0) == 2  # 17 tokens
    assert config_need([], 16, 3) == 3
    with pytest.raises(ValueError):
        config_need([], 16, -1)


def _chunk(i: int) -> Chunk:
    text = f"Passage {i} says " + " ".join(f"fact{i}_{w}" for w in range(60)) + "."
    return Chunk(id=f"d{i}::0", doc_id=f"d{i}", text=text)


def test_config_need_over_real_estimates_counts_mappers_together_not_with_the_reducer(
    tokenizer,
) -> None:
    synth = Synthesizer(tokenizer, max_model_len=4096, answer_max_tokens=32)
    chunks = [_chunk(i) for i in range(6)]
    calls = synth.estimate_calls(Config("map_reduce", 6, 100), "Which facts?", chunks)
    per_call = [blocks_for(c.prompt_tokens + c.max_tokens, 16) for c in calls]
    need = config_need(calls, 16, 0)
    # The six mappers are one stage (their blocks add up), the reducer comes after them.
    assert need >= sum(per_call[:6]) and need >= per_call[6]
    assert need < sum(per_call)
    rerank = synth.estimate_calls(Config("map_rerank", 6), "Which facts?", chunks)
    assert config_need(rerank, 16, 0) == sum(
        blocks_for(c.prompt_tokens + c.max_tokens, 16) for c in rerank
    )


# -- best-fit ----------------------------------------------------------------------------------

SPACE = ConfigSpace(("stuff", "map_reduce"), (3, 5), (50, 100))


def need_table(config: Config) -> int:
    """stuff: 10 per chunk; map_reduce: (5 + ilen/10) per chunk; map_rerank: 12 per chunk.
    So stuff:3..5 = 30, 40, 50; map_reduce @50 = 30, 40, 50; @100 = 45, 60, 75."""
    per_chunk = {"stuff": 10, "map_rerank": 12}.get(config.method)
    if per_chunk is None:
        per_chunk = 5 + (config.intermediate_length or 0) // 10
    return per_chunk * config.num_chunks


def kv(free: int, total: int = 200) -> KVState:
    return KVState(total_blocks=total, free_blocks=free, block_size=16)


def test_unshown_reserved_is_what_the_engine_does_not_show_yet() -> None:
    state = kv(free=60)  # 140 used
    assert unshown_reserved(150, state) == 10
    assert unshown_reserved(140, state) == 0
    assert unshown_reserved(20, state) == 0  # more used than reserved: nothing unshown
    assert unshown_reserved(0, kv(free=200)) == 0


def test_fit_picks_the_largest_need_that_fits() -> None:
    plan = choose(SPACE, kv(60), 0, need_table, joint_reasoning=True, max_chunks=10)
    assert plan == Plan(Config("map_reduce", 4, 100), "fit", 60, 60, 0)
    assert plan.available_blocks == 60
    plan = choose(SPACE, kv(500, total=500), 0, need_table, joint_reasoning=True, max_chunks=10)
    assert plan.config == Config("map_reduce", 5, 100) and plan.need_blocks == 75


def test_fit_subtracts_unshown_reservations() -> None:
    # 140 used, 150 reserved: 10 unshown, 50 available -> a need of 50 at most.
    plan = choose(SPACE, kv(60), 150, need_table, joint_reasoning=True, max_chunks=10)
    assert plan.reason == "fit" and plan.need_blocks == 50
    assert (plan.free_blocks, plan.reserved_blocks) == (60, 10)


def test_ties_go_to_more_chunks_then_richer_method_then_longer_summaries() -> None:
    # available 50: stuff:5 and map_reduce:5:50 both need 50 -> map_reduce wins the tie.
    plan = choose(SPACE, kv(50), 0, need_table, joint_reasoning=True, max_chunks=10)
    assert plan.config == Config("map_reduce", 5, 50)
    # All needs equal: most chunks, then map_reduce, then the longest intermediate_length.
    plan = choose(SPACE, kv(50), 0, lambda c: 7, joint_reasoning=True, max_chunks=10)
    assert plan.config == Config("map_reduce", 5, 100)
    space = ConfigSpace(("map_rerank", "stuff"), (2, 4))
    plan = choose(space, kv(50), 0, lambda c: 7, joint_reasoning=False, max_chunks=10)
    assert plan.config == Config("stuff", 4)


def test_space_is_clipped_to_the_chunks_retrieved() -> None:
    plan = choose(SPACE, kv(500, total=500), 0, need_table, joint_reasoning=True, max_chunks=4)
    assert plan.config == Config("map_reduce", 4, 100)
    # Fewer chunks than the space's lo: the range collapses to what was retrieved.
    plan = choose(SPACE, kv(500, total=500), 0, need_table, joint_reasoning=True, max_chunks=2)
    assert plan.reason == "fit" and plan.config == Config("map_reduce", 2, 100)
    with pytest.raises(InvalidRequest):
        choose(SPACE, kv(500), 0, need_table, joint_reasoning=True, max_chunks=0)


def test_fallback_when_joint_uses_fewer_chunks_with_stuff_or_map_reduce() -> None:
    # Nothing in the space fits 29 (the least is 30); stuff:2 = map_reduce:2:50 = 20 fit and tie.
    plan = choose(SPACE, kv(29), 0, need_table, joint_reasoning=True, max_chunks=10)
    assert plan == Plan(Config("map_reduce", 2, 50), "fallback", 20, 29, 0)
    stuff_only = ConfigSpace(("stuff",), (3, 5))
    plan = choose(stuff_only, kv(29), 0, need_table, joint_reasoning=True, max_chunks=10)
    assert plan.config == Config("stuff", 2) and plan.reason == "fallback"
    # map_reduce never falls back to a longer intermediate_length than the space's smallest.
    assert all(
        c.intermediate_length in (None, 50) for c in fallback_configs(SPACE, joint_reasoning=True)
    )


def test_fallback_without_joint_reasoning_is_map_rerank_over_what_fits() -> None:
    space = ConfigSpace(("map_rerank",), (4, 8))  # needs 48..96
    plan = choose(space, kv(40), 0, need_table, joint_reasoning=False, max_chunks=10)
    assert plan == Plan(Config("map_rerank", 3), "fallback", 36, 40, 0)
    assert fallback_configs(space, joint_reasoning=False) == tuple(
        Config("map_rerank", k) for k in (1, 2, 3)
    )


def test_no_fallback_while_something_in_the_space_fits() -> None:
    calls: Counter[Config] = Counter()

    def counting(config: Config) -> int:
        calls[config] += 1
        return need_table(config)

    plan = choose(SPACE, kv(30), 0, counting, joint_reasoning=True, max_chunks=10)
    assert plan.reason == "fit" and plan.need_blocks == 30
    assert set(calls) <= set(SPACE.configs())  # fallbacks were never even estimated
    assert max(calls.values()) == 1


def test_each_family_is_binary_searched_not_sized_whole() -> None:
    """30 chunk counts x 4 families: a handful of sizings per family, not all 120."""
    space = ConfigSpace(("stuff", "map_reduce"), (1, 30), (50, 75, 100))
    calls: Counter[Config] = Counter()

    def counting(config: Config) -> int:
        calls[config] += 1
        return config.num_chunks * (1 + (config.intermediate_length or 0) // 25)

    plan = choose(space, kv(100), 0, counting, joint_reasoning=True, max_chunks=30)
    # Best per family: stuff:30 (30), map_reduce:30:50 (90), :25:75 (100), :20:100 (100); the
    # two at 100 tie on need and the one with more chunks wins.
    assert plan.config == Config("map_reduce", 25, 75) and plan.need_blocks == 100
    assert sum(calls.values()) <= 4 * 6 and max(calls.values()) == 1


def test_wait_when_not_even_one_chunk_fits() -> None:
    calls: Counter[Config] = Counter()

    def counting(config: Config) -> int:
        calls[config] += 1
        return need_table(config)

    plan = choose(SPACE, kv(9), 0, counting, joint_reasoning=True, max_chunks=10)
    assert plan == Plan(None, "wait", 10, 9, 0)  # stuff:1 and map_reduce:1:50 need 10
    assert max(calls.values()) == 1
    # With exactly that much available, the same query is planned.
    assert choose(SPACE, kv(10), 0, need_table, joint_reasoning=True, max_chunks=10).config
    # A space already at one chunk has no fallback: wait for its own smallest configuration.
    one = ConfigSpace(("map_rerank",), (1, 3))
    plan = choose(one, kv(11), 0, need_table, joint_reasoning=False, max_chunks=10)
    assert plan.reason == "wait" and plan.need_blocks == 12


# -- ledger ------------------------------------------------------------------------------------


def test_reservation_releases_exactly_once() -> None:
    ledger = KVLedger()
    a, b = ledger.reserve(10), ledger.reserve(5)
    assert ledger.reserved == 15
    assert a.release() is True and a.released
    assert a.release() is False
    assert ledger.reserved == 5
    with pytest.raises(RuntimeError):
        with b:
            raise RuntimeError("synthesis failed")
    assert ledger.reserved == 0 and b.release() is False
    with pytest.raises(ValueError):
        ledger.reserve(-1)


# -- admission queue ---------------------------------------------------------------------------


class FakeEngine:
    """`total` blocks; `external` of them used by someone else. Reservations are never shown as
    used, so available = total - external - reserved."""

    def __init__(self, total: int = 100) -> None:
        self.total = total
        self.external = 0
        self.reads = 0

    async def kv_state(self) -> KVState:
        self.reads += 1
        return KVState(self.total, self.total - self.external, 16)


def fixed(need: int):
    """A decide() for a query whose only configuration needs `need` blocks."""

    def decide(state: KVState, reserved: int) -> Plan:
        space = ConfigSpace(("stuff",), (1, 1))
        return choose(space, state, reserved, lambda c: need, joint_reasoning=True, max_chunks=1)

    return decide


async def until(predicate, limit: float = 1.0) -> None:
    async with asyncio.timeout(limit):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_admitted_at_once_when_it_fits() -> None:
    engine, ledger = FakeEngine(), KVLedger()
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=4)
    adm = await queue.admit(fixed(30))
    assert adm.plan.reason == "fit" and adm.plan.config == Config("stuff", 1)
    assert not adm.queued and adm.queued_s == 0.0
    assert adm.reservation.blocks == 30 and ledger.reserved == 30
    assert adm.kv.free_blocks == 100
    adm.reservation.release()
    assert ledger.reserved == 0


async def test_waits_for_a_release_then_is_admitted() -> None:
    engine, ledger = FakeEngine(), KVLedger()
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=4, poll_s=10)  # no polling
    first = await queue.admit(fixed(80))
    task = asyncio.create_task(queue.admit(fixed(50)))
    await until(lambda: queue.waiting == 1)
    await asyncio.sleep(0.01)
    assert not task.done() and len(queue) == 1
    first.reservation.release()
    adm = await asyncio.wait_for(task, 1)
    assert adm.queued and adm.queued_s > 0 and adm.plan.need_blocks == 50
    assert ledger.reserved == 50 and queue.waiting == 0


async def test_polls_the_engine_when_memory_frees_without_a_release() -> None:
    engine, ledger = FakeEngine(), KVLedger()
    engine.external = 90  # another client's requests
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=4, poll_s=0.005)
    task = asyncio.create_task(queue.admit(fixed(50)))
    await until(lambda: engine.reads >= 3)  # it keeps re-reading while waiting
    assert not task.done()
    engine.external = 0
    adm = await asyncio.wait_for(task, 1)
    assert adm.queued and ledger.reserved == 50


async def test_a_newcomer_that_fits_does_not_overtake_the_queue() -> None:
    engine, ledger = FakeEngine(), KVLedger()
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=4, poll_s=10)
    first = await queue.admit(fixed(90))
    order: list[str] = []

    async def admit(name: str, need: int):
        adm = await queue.admit(fixed(need))
        order.append(name)
        return adm

    big = asyncio.create_task(admit("big", 50))
    await until(lambda: queue.waiting == 1)
    small = asyncio.create_task(admit("small", 5))  # 10 blocks are free, but big is first
    await until(lambda: queue.waiting == 2)
    await asyncio.sleep(0.01)
    assert order == [] and ledger.reserved == 90
    first.reservation.release()
    await asyncio.wait_for(asyncio.gather(big, small), 1)
    assert order == ["big", "small"] and ledger.reserved == 55
    assert small.result().queued


async def test_full_queue_refuses_and_reserves_nothing() -> None:
    engine, ledger = FakeEngine(), KVLedger()
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=1, poll_s=10)
    first = await queue.admit(fixed(100))
    waiting = asyncio.create_task(queue.admit(fixed(10)))
    await until(lambda: queue.waiting == 1)
    with pytest.raises(QueueFull):
        async with asyncio.timeout(1):  # a queued (not refused) query would wait forever
            await queue.admit(fixed(10))
    assert ledger.reserved == 100 and queue.waiting == 1
    first.reservation.release()
    assert (await asyncio.wait_for(waiting, 1)).plan.need_blocks == 10


async def test_a_query_that_can_never_fit_is_refused_with_the_numbers() -> None:
    engine, ledger = FakeEngine(total=100), KVLedger()
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=0)
    with pytest.raises(ExceedsKVCache) as info:
        async with asyncio.timeout(1):
            await queue.admit(fixed(150))
    assert "150" in str(info.value) and "100" in str(info.value)
    assert "\n" not in str(info.value)
    assert ledger.reserved == 0 and queue.waiting == 0


async def test_cancelled_waiter_leaves_without_disturbing_the_others() -> None:
    engine, ledger = FakeEngine(), KVLedger()
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=4, poll_s=10)
    first = await queue.admit(fixed(100))
    head = asyncio.create_task(queue.admit(fixed(40)))
    await until(lambda: queue.waiting == 1)
    second = asyncio.create_task(queue.admit(fixed(40)))
    third = asyncio.create_task(queue.admit(fixed(40)))
    await until(lambda: queue.waiting == 3)
    head.cancel()  # the head leaves: the next becomes head
    second.cancel()
    await asyncio.gather(head, second, return_exceptions=True)
    assert queue.waiting == 1 and ledger.reserved == 100
    first.reservation.release()
    adm = await asyncio.wait_for(third, 1)
    assert adm.plan.need_blocks == 40 and ledger.reserved == 40 and queue.waiting == 0
