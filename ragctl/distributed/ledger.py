"""The KV reservation ledger shared by ragctl replicas (Ray Serve): a named Ray actor holding the
blocks reserved on each engine, and `SharedKVLedger`, the replica's side of it, which the
admission queue uses in place of a local `KVLedger`.

- `LedgerBook` is the book itself (plain Python, no Ray): reservations by id, each tagged with
  its engine key and its replica. `try_reserve` is a compare-and-reserve: it grants only when
  the blocks fit beside what every replica holds on that engine (`admission.fits`, best-fit's
  own test, on the KV state the replica read), so two replicas cannot over-commit one engine.
- `KVLedgerActor` runs one book in a Ray actor. Its methods are synchronous and the actor runs
  one call at a time (Ray's default for a non-async actor), so every call is atomic; calls from
  one replica run in the order it sent them (so a release never overtakes its reservation).
- Replica leases: every call touches its replica's lease, and `SharedKVLedger` heartbeats while
  its replica lives. A replica silent for `lease_s` (killed, crashed, its node gone) loses its
  reservations at the next call of anyone. A replica that shuts down cleanly drops them at once.

The ledger actor is created by the process that deploys the application (`get_or_create_ledger`)
and found by name by the replicas (`find_ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ragctl.scheduler.admission import KVLedger, Reservation, fits
from ragctl.types import KVState

log = logging.getLogger(__name__)

LEDGER_NAME = "ragctl-kv-ledger"
NAMESPACE = "ragctl"
LEASE_S = 15.0
"""A replica that has not called the ledger for this long is presumed dead."""
HEARTBEAT_S = 3.0


@dataclass
class _Held:
    engine: str
    blocks: int
    replica: str


class LedgerBook:
    """Reserved blocks per engine key, by reservation id and replica; see the module docstring.
    `clock` is injectable for tests of the lease."""

    def __init__(self, lease_s: float = LEASE_S, clock: Callable[[], float] = time.monotonic):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._totals: dict[str, int] = {}
        self._seen: dict[str, float] = {}
        self._grants: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._expired: list[str] = []

    # -- calls ----------------------------------------------------------------------------------

    def heartbeat(self, replica: str) -> None:
        self._touch(replica)

    def total(self, engine: str, replica: str = "") -> int:
        self._touch(replica)
        return self._totals.get(engine, 0)

    def try_reserve(
        self, engine: str, rid: str, blocks: int, total_blocks: int, free_blocks: int,
        block_size: int, replica: str,
    ) -> tuple[bool, int]:  # fmt: skip
        """Reserve `blocks` on `engine` as `rid` if they fit beside every reservation held on
        it, judged on the KV state the replica read. (granted, the engine's total after)."""
        self._touch(replica)
        if blocks < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({blocks})")
        before = self._totals.get(engine, 0)
        kv = KVState(total_blocks, free_blocks, block_size)
        granted = rid not in self._held and fits(before, blocks, kv)
        self._grants.append({
            "engine": engine, "blocks": blocks, "reserved_before": before,
            "total_blocks": total_blocks, "free_blocks": free_blocks, "granted": granted,
            "replica": replica,
        })  # fmt: skip
        if granted:
            self._add(rid, _Held(engine, blocks, replica))
        return granted, self._totals.get(engine, 0)

    def reserve(self, engine: str, rid: str, blocks: int, replica: str) -> int:
        """Reserve unconditionally (plans that never wait); the engine's total after."""
        self._touch(replica)
        if blocks < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({blocks})")
        if rid not in self._held:
            self._add(rid, _Held(engine, blocks, replica))
        return self._totals.get(engine, 0)

    def release(self, rid: str, replica: str = "") -> bool:
        """Give `rid`'s blocks back: True the first time, False after (or for an id never
        granted, or dropped with its replica's lease)."""
        self._touch(replica)
        held = self._held.pop(rid, None)
        if held is None:
            return False
        self._totals[held.engine] -= held.blocks
        return True

    def drop_replica(self, replica: str) -> int:
        """Release everything `replica` holds (it is shutting down); the blocks released."""
        self._seen.pop(replica, None)
        return self._drop(replica)

    # -- inspection -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Totals per engine, blocks per replica, live replicas and the expired ones."""
        self._expire()
        by_replica: dict[str, int] = {}
        for h in self._held.values():
            by_replica[h.replica] = by_replica.get(h.replica, 0) + h.blocks
        return {
            "totals": dict(self._totals),
            "by_replica": by_replica,
            "reservations": len(self._held),
            "replicas": sorted(self._seen),
            "expired": list(self._expired),
        }

    def grants(self) -> list[dict[str, Any]]:
        """The last compare-and-reserve decisions (granted or not), oldest first."""
        return list(self._grants)

    # -- internals ------------------------------------------------------------------------------

    def _add(self, rid: str, held: _Held) -> None:
        self._held[rid] = held
        self._totals[held.engine] = self._totals.get(held.engine, 0) + held.blocks

    def _touch(self, replica: str) -> None:
        self._expire()
        if replica:
            self._seen[replica] = self._clock()

    def _expire(self) -> None:
        now = self._clock()
        for replica, last in list(self._seen.items()):
            if now - last > self.lease_s:
                del self._seen[replica]
                released = self._drop(replica)
                self._expired.append(replica)
                log.warning(
                    "ragctl ledger: replica %s silent for %.0fs; released its %d blocks",
                    replica, now - last, released,
                )  # fmt: skip

    def _drop(self, replica: str) -> int:
        released = 0
        for rid in [rid for rid, h in self._held.items() if h.replica == replica]:
            h = self._held.pop(rid)
            self._totals[h.engine] -= h.blocks
            released += h.blocks
        return released


class KVLedgerActor(LedgerBook):
    """The book as a Ray actor (see `get_or_create_ledger`)."""

    def ping(self) -> bool:
        return True


def get_or_create_ledger(lease_s: float = LEASE_S, *, detached: bool = True) -> Any:
    """The named ledger actor of this Ray cluster, created if missing (by the deploying process).
    Detached: it outlives the deploying driver, like the Serve application; `kill_ledger` ends
    it. Uses no CPU of the cluster's budget. Requires `ray.init` first."""
    import ray

    options: dict[str, Any] = {
        "name": LEDGER_NAME, "namespace": NAMESPACE, "get_if_exists": True, "num_cpus": 0,
        "max_concurrency": 1, "max_restarts": 0,
    }  # fmt: skip
    if detached:
        options["lifetime"] = "detached"
    actor = ray.remote(KVLedgerActor).options(**options).remote(lease_s)
    ray.get(actor.ping.remote())
    return actor


def find_ledger() -> Any:
    """The ledger actor the deploying process created (in a replica)."""
    import ray

    return ray.get_actor(LEDGER_NAME, namespace=NAMESPACE)


def kill_ledger() -> bool:
    import ray

    try:
        actor = ray.get_actor(LEDGER_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor)
    return True


def replica_id() -> str:
    """A name for this process in the ledger: host, pid and a random suffix (unique even when
    a restarted replica reuses a pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SharedKVLedger(KVLedger):
    """One engine's reservations, kept in the ledger actor; a drop-in for `KVLedger`.

    `total()` and `try_reserve()` ask the actor (they suspend); `reserve()` (plans that never
    wait) and `Reservation.release()` stay synchronous: they send the call and do not wait for
    its answer (the actor runs one replica's calls in order). `reserved` is the engine's total
    as of the last answer, adjusted by this replica's own reservations since (metrics). Release
    listeners fire on this replica's releases; the admission queue's polling notices the
    others'. Call `start()` on the replica's event loop to keep its lease alive, `aclose()` to
    drop its reservations and stop."""

    def __init__(
        self, actor: Any, engine: str, replica: str | None = None, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        super().__init__()
        self._actor = actor
        self.engine = engine
        self.replica = replica or replica_id()
        self.heartbeat_s = heartbeat_s
        self._shared_total = 0
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def reserved(self) -> int:
        return self._shared_total

    @property
    def own_reserved(self) -> int:
        """Blocks this replica holds now."""
        return self._reserved

    def reserve(self, blocks: int) -> Reservation:
        if blocks < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({blocks})")
        rid = uuid.uuid4().hex
        self._actor.reserve.remote(self.engine, rid, blocks, self.replica)
        self._reserved += blocks
        self._held += 1
        self._shared_total += blocks
        return Reservation(self, blocks, rid)

    async def total(self) -> int:
        self._shared_total = await self._actor.total.remote(self.engine, self.replica)
        return self._shared_total

    async def try_reserve(self, blocks: int, kv: KVState) -> Reservation | None:
        if blocks < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({blocks})")
        rid = uuid.uuid4().hex
        ref = self._actor.try_reserve.remote(
            self.engine, rid, blocks, kv.total_blocks, kv.free_blocks, kv.block_size,
            self.replica,
        )  # fmt: skip
        try:
            granted, self._shared_total = await ref
        except BaseException:
            # Cancelled (or failed) while the actor may have granted it: give it back. The
            # release runs after the reservation (same sender, in order); unknown ids are no-ops.
            self._actor.release.remote(rid, self.replica)
            raise
        if not granted:
            return None
        self._reserved += blocks
        self._held += 1
        return Reservation(self, blocks, rid)

    def _release(self, reservation: Reservation) -> None:
        self._actor.release.remote(reservation.id, self.replica)
        self._shared_total = max(0, self._shared_total - reservation.blocks)
        super()._release(reservation)

    # -- lease ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Heartbeat every `heartbeat_s` on the running loop while this replica lives."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                await self._actor.heartbeat.remote(self.replica)
            except Exception as e:  # the actor is gone or busy: keep trying, the lease decides
                log.warning("ragctl ledger heartbeat failed: %s", e)
            await asyncio.sleep(self.heartbeat_s)

    async def aclose(self) -> None:
        """Stop heartbeating and release whatever this replica still holds."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        with contextlib.suppress(Exception):
            await self._actor.drop_replica.remote(self.replica)
