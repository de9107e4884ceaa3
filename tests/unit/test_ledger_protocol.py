"""The ledger protocol the admission queue uses (`total`, `try_reserve`): the local `KVLedger`
answers it at once, and a queue over a ledger shared with other processes decides again when
another process took the blocks between its decision and its reservation."""

from __future__ import annotations

import asyncio

import pytest

from ragctl.scheduler import AdmissionQueue, KVLedger, Reservation, choose
from ragctl.scheduler.admission import fits
from ragctl.types import ConfigSpace, KVState, Plan


def kv(total: int = 100, free: int = 100) -> KVState:
    return KVState(total, free, 16)


def fixed(need: int):
    def decide(state: KVState, reserved: int) -> Plan:
        space = ConfigSpace(("stuff",), (1, 1))
        return choose(space, state, reserved, lambda c: need, joint_reasoning=True, max_chunks=1)

    return decide


def test_fits_counts_only_reservations_the_engine_does_not_show() -> None:
    # Nothing used: every reserved block is unshown.
    assert fits(60, 40, kv(100, 100)) and not fits(60, 41, kv(100, 100))
    # 30 blocks of the 60 reserved are already in use on the engine (free 70): 30 unshown.
    assert fits(60, 40, kv(100, 70)) and not fits(60, 41, kv(100, 70))
    assert fits(0, 0, kv(100, 0)) and not fits(0, 1, kv(100, 0))


async def test_local_try_reserve_compares_and_reserves() -> None:
    ledger = KVLedger()
    a = await ledger.try_reserve(70, kv())
    assert isinstance(a, Reservation) and await ledger.total() == 70
    assert await ledger.try_reserve(31, kv()) is None  # 70 + 31 > 100: nothing reserved
    assert await ledger.total() == 70
    b = await ledger.try_reserve(30, kv())
    assert b is not None and ledger.reserved == 100
    assert a.release() and not a.release()  # exactly once
    assert ledger.reserved == 30
    with pytest.raises(ValueError):
        await ledger.try_reserve(-1, kv())


async def test_local_protocol_never_suspends() -> None:
    """The single-process guarantee: total() and try_reserve() complete without yielding to the
    event loop, so a decision and its reservation happen in one step."""
    ledger = KVLedger()
    for coro in (ledger.total(), ledger.try_reserve(5, kv())):
        with pytest.raises(StopIteration):
            coro.send(None)


class RacingLedger(KVLedger):
    """A ledger shared with another process, which reserves `steal` blocks just before this
    one's first compare-and-reserve (after the decision was taken)."""

    def __init__(self, steal: int) -> None:
        super().__init__()
        self.steal = steal
        self.attempts = 0
        self.stolen: list[Reservation] = []

    async def try_reserve(self, blocks: int, kv: KVState) -> Reservation | None:
        self.attempts += 1
        await asyncio.sleep(0)  # a remote call suspends
        if self.steal:
            self.stolen.append(self.reserve(self.steal))  # the other process wins the race
            self.steal = 0
        return await super().try_reserve(blocks, kv)


class Engine:
    def __init__(self, total: int = 100) -> None:
        self.total = total

    async def kv_state(self) -> KVState:
        return kv(self.total, self.total)


async def test_a_plan_that_lost_the_race_is_decided_again() -> None:
    ledger = RacingLedger(steal=50)
    queue = AdmissionQueue(ledger, Engine().kv_state, maxsize=4, poll_s=10)
    # 60 fit when decided; the other process takes 50 first; the retry sees 50 reserved and
    # 60 no longer fits: the query waits (nothing over-committed) until the 50 are released.
    task = asyncio.create_task(queue.admit(fixed(60)))
    async with asyncio.timeout(1):
        while queue.waiting == 0:
            await asyncio.sleep(0.001)
    assert ledger.reserved == 50 and not task.done()
    ledger.stolen[0].release()  # the other process finishes (here: the same ledger object)
    adm = await asyncio.wait_for(task, 1)
    assert adm.queued and adm.reservation.blocks == 60 and ledger.reserved == 60
    assert ledger.attempts == 2


async def test_a_lost_race_is_decided_again_with_the_new_total() -> None:
    ledger = RacingLedger(steal=50)
    queue = AdmissionQueue(ledger, Engine().kv_state, maxsize=4, poll_s=10)

    def decide(state: KVState, reserved: int) -> Plan:  # 1..6 chunks, 10 blocks each
        space = ConfigSpace(("stuff",), (1, 6))
        return choose(
            space, state, reserved, lambda c: 10 * c.num_chunks, joint_reasoning=True,
            max_chunks=6,
        )  # fmt: skip

    adm = await asyncio.wait_for(queue.admit(decide), 1)
    # Decided 60 on an empty ledger, lost it, re-decided 50 beside the other process's 50.
    assert adm.plan.need_blocks == 50 and ledger.reserved == 100 and ledger.attempts == 2
