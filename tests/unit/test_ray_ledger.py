"""The KV reservation ledger shared by replicas: the book's semantics (compare-and-reserve,
release exactly once, leases), then the same through a real local Ray actor: concurrent
replicas never over-commit, the admission queue runs over it, and a replica that dies loses its
reservations when its lease runs out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from ragctl.distributed.ledger import LedgerBook
from ragctl.scheduler import AdmissionQueue, choose
from ragctl.types import ConfigSpace, KVState, Plan

# -- the book (no Ray) -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_compare_and_reserve_per_engine() -> None:
    book = LedgerBook()
    # An engine with 100 blocks, all free (nothing shown as used).
    assert book.try_reserve("a", "r1", 60, 100, 100, 16, "x") == (True, 60)
    assert book.try_reserve("a", "r2", 41, 100, 100, 16, "y") == (False, 60)
    assert book.try_reserve("a", "r3", 40, 100, 100, 16, "y") == (True, 100)
    # Another engine has its own total.
    assert book.try_reserve("b", "r4", 90, 100, 100, 16, "x") == (True, 90)
    # The engine now shows 60 of the reserved blocks as used (free 40): 40 unshown, 0 more fit.
    assert book.try_reserve("a", "r5", 1, 100, 40, 16, "x") == (False, 100)
    assert book.total("a") == 100 and book.total("b") == 90
    # The same id twice is granted once.
    assert book.try_reserve("b", "r4", 1, 100, 100, 16, "x") == (False, 90)
    grants = book.grants()
    assert [g["granted"] for g in grants] == [True, False, True, True, False, False]


def test_release_exactly_once() -> None:
    book = LedgerBook()
    book.try_reserve("a", "r1", 30, 100, 100, 16, "x")
    book.reserve("a", "r2", 20, "x")  # unconditional
    assert book.total("a") == 50
    assert book.release("r1") is True
    assert book.release("r1") is False and book.release("never") is False
    assert book.total("a") == 20
    assert book.release("r2") is True and book.total("a") == 0


def test_a_silent_replica_loses_its_reservations() -> None:
    clock = Clock()
    book = LedgerBook(lease_s=10, clock=clock)
    book.try_reserve("a", "r1", 30, 100, 100, 16, "alive")
    book.try_reserve("a", "r2", 50, 100, 100, 16, "dead")
    for t in (4.0, 8.0, 12.0):  # "alive" heartbeats, "dead" is silent
        clock.now = t
        book.heartbeat("alive")
    assert book.total("a") == 30  # "dead" last called at 0: expired at 12
    snap = book.snapshot()
    assert snap["by_replica"] == {"alive": 30} and snap["expired"] == ["dead"]
    assert snap["replicas"] == ["alive"]
    assert book.release("r2", "dead") is False  # a late release of an expired one: no-op
    # A clean shutdown drops at once.
    assert book.drop_replica("alive") == 30 and book.total("a") == 0


# -- through a real Ray actor ----------------------------------------------------------------


try:
    import ray
except ImportError:  # the [ray] extra is not installed: the book's tests above still run
    ray = None

LEASE_S = 1.5


@pytest.fixture(scope="module")
def ledger() -> Iterator[object]:
    if ray is None:
        pytest.skip("needs the [ray] extra")
    from ragctl.distributed.ledger import get_or_create_ledger

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield get_or_create_ledger(LEASE_S, detached=False)
    finally:
        ray.shutdown()


@pytest.fixture
def book(ledger: object) -> Iterator[object]:
    yield ledger
    # Leave no reservation to the next test.
    snap = ray.get(ledger.snapshot.remote())  # type: ignore[attr-defined]
    for replica in snap["by_replica"]:
        ray.get(ledger.drop_replica.remote(replica))  # type: ignore[attr-defined]


def kv(total: int = 100) -> KVState:
    return KVState(total, total, 16)


async def test_concurrent_replicas_never_over_commit(book: object) -> None:
    from ragctl.distributed.ledger import SharedKVLedger

    replicas = [SharedKVLedger(book, "engine-a", replica=f"r{i}") for i in range(4)]
    # 40 attempts of 7 blocks at once on a 100-block engine: exactly 14 fit.
    attempts = [r.try_reserve(7, kv()) for r in replicas for _ in range(10)]
    got = [r for r in await asyncio.gather(*attempts) if r is not None]
    assert len(got) == 14
    assert await replicas[0].total() == 98
    assert sum(r.own_reserved for r in replicas) == 98
    for g in ray.get(book.grants.remote()):  # type: ignore[attr-defined]
        if g["granted"]:
            assert g["reserved_before"] + g["blocks"] <= g["free_blocks"]
    for r in got:
        assert r.release() is True and r.release() is False  # exactly once
    assert await replicas[1].total() == 0


async def test_admission_queue_over_the_shared_ledger(book: object) -> None:
    from ragctl.distributed.ledger import SharedKVLedger

    class Engine:
        async def kv_state(self) -> KVState:
            return kv(100)

    def decide(state: KVState, reserved: int) -> Plan:
        space = ConfigSpace(("stuff",), (1, 1))
        return choose(space, state, reserved, lambda c: 60, joint_reasoning=True, max_chunks=1)

    a = AdmissionQueue(SharedKVLedger(book, "engine-q", replica="qa"), Engine().kv_state, 4)
    b = AdmissionQueue(
        SharedKVLedger(book, "engine-q", replica="qb"), Engine().kv_state, 4, poll_s=0.02
    )
    first = await a.admit(decide)
    # Replica b's query does not fit beside a's 60 blocks: it waits, then is admitted once a's
    # reservation is released (b learns of it by polling the shared ledger).
    second = asyncio.create_task(b.admit(decide))
    await asyncio.sleep(0.3)
    assert not second.done() and b.waiting == 1
    assert ray.get(book.total.remote("engine-q")) == 60  # type: ignore[attr-defined]
    first.reservation.release()
    adm = await asyncio.wait_for(second, 5)
    assert adm.queued and ray.get(book.total.remote("engine-q")) == 60  # type: ignore[attr-defined]
    adm.reservation.release()


async def test_cancelled_try_reserve_leaves_nothing_reserved(book: object) -> None:
    from ragctl.distributed.ledger import SharedKVLedger

    shared = SharedKVLedger(book, "engine-c", replica="rc")
    task = asyncio.create_task(shared.try_reserve(10, kv()))
    await asyncio.sleep(0)  # sent, not answered
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert await shared.total() == 0


def test_a_killed_replica_releases_its_reservations(book: object) -> None:
    """A real replica process (a Ray actor) reserves through its SharedKVLedger and keeps its
    lease alive; killed, its blocks come back once the lease runs out, and not before it."""

    def make_replica():  # defined here: Ray ships the class by value
        @ray.remote(num_cpus=0)
        class Replica:
            async def start(self, blocks: int) -> str:
                from ragctl.distributed.ledger import SharedKVLedger, find_ledger

                self.ledger = SharedKVLedger(find_ledger(), "engine-k", heartbeat_s=0.2)
                self.ledger.start()
                self.held = await self.ledger.try_reserve(blocks, KVState(100, 100, 16))
                assert self.held is not None
                return self.ledger.replica

        return Replica

    Replica = make_replica()
    alive, doomed = Replica.remote(), Replica.remote()
    alive_id = ray.get(alive.start.remote(30))
    doomed_id = ray.get(doomed.start.remote(50))
    assert ray.get(book.total.remote("engine-k")) == 80  # type: ignore[attr-defined]
    time.sleep(LEASE_S * 2)  # both heartbeat: nothing expires while they live
    assert ray.get(book.total.remote("engine-k")) == 80  # type: ignore[attr-defined]
    ray.kill(doomed)
    deadline = time.monotonic() + LEASE_S * 4
    while ray.get(book.total.remote("engine-k")) != 30:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the dead replica's reservation was never released"
        time.sleep(0.1)
    snap = ray.get(book.snapshot.remote())  # type: ignore[attr-defined]
    assert snap["by_replica"] == {alive_id: 30}
    assert doomed_id in snap["expired"] and alive_id not in snap["expired"]
    ray.kill(alive)
