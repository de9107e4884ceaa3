"""Admission: turn best-fit decisions into KV reservations, and queue the queries that fit
nowhere yet.

- `KVLedger` counts the blocks that admitted plans hold; `Reservation` gives them back exactly
  once (explicitly or as a context manager). Its async side (`total`, `try_reserve`: an atomic
  compare-and-reserve) is the protocol the admission queue uses, so that a ledger shared by
  several processes (`ragctl.distributed.ledger`, a Ray actor) can stand in for it.
- `AdmissionQueue.admit(decide)` reads the engine's KV state, asks the caller's pure `decide`
  (a closure over `bestfit.choose`) for a plan and reserves its blocks; when the plan is `wait`
  (or others are already waiting) the query waits its turn, FIFO, and re-decides as memory frees.
  An accepted query is never dropped; the only refusals are a full queue (`QueueFull`) and a
  query that could not fit even in an idle engine (`ExceedsKVCache`).

Engine pool: the queue may hold several `EngineSlot`s (one ledger and KV state per engine).
Each decision then runs `decide` once per engine against that engine's state, and
`placement.place` picks the engine (best-fit across the pool by default); the `Admission`
names the slot its blocks are reserved on. A queue built from one ledger and one `kv_state` is
a pool of one and behaves exactly as before.

No I/O of its own: the KV state comes from the `kv_state` callables. Single event loop: reserve
and release from the loop's thread (the controller does). The local ledger's async methods never
suspend, so a decision and its reservation still happen in one event-loop step; a shared ledger
re-checks the fit atomically where the reservations live, and a plan that lost the race to
another process is decided again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ragctl.errors import EngineError, ExceedsKVCache, QueueFull
from ragctl.scheduler.bestfit import unshown_reserved
from ragctl.scheduler.placement import EngineOption, Strategy, place
from ragctl.types import KVState, Plan


class Reservation:
    """Blocks held for one admitted plan until its calls are done."""

    def __init__(self, ledger: KVLedger, blocks: int, id: str = "") -> None:
        self._ledger = ledger
        self.blocks = blocks
        self.id = id
        """The shared ledger's name for it ("" in a local ledger)."""
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> bool:
        """Give the blocks back. True the first time; later calls do nothing and return False
        (so error paths may release defensively without double-counting)."""
        if self._released:
            return False
        self._released = True
        self._ledger._release(self)
        return True

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()  # also on exceptions (and cancellation); the exception propagates

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Reservation({self.blocks} blocks, {state})"


class KVLedger:
    """Total KV blocks reserved by admitted, unfinished plans."""

    def __init__(self) -> None:
        self._reserved = 0
        self._held = 0
        self._listeners: list[Callable[[], None]] = []

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def held(self) -> int:
        """Reservations not yet released (plans in flight: the pool's load figure)."""
        return self._held

    def reserve(self, blocks: int) -> Reservation:
        """Reserve `blocks` unconditionally (plans that never wait: fixed configurations)."""
        if blocks < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({blocks})")
        self._reserved += blocks
        self._held += 1
        return Reservation(self, blocks)

    async def total(self) -> int:
        """Blocks reserved now, for a decision (never suspends here)."""
        return self._reserved

    async def try_reserve(self, blocks: int, kv: KVState) -> Reservation | None:
        """Compare-and-reserve: reserve `blocks` only if they fit beside the reservations held
        now, as best-fit counts them (`blocks <= kv.free_blocks - unshown_reserved`); None
        otherwise. Never suspends here, so it sees the total the decision saw and a plan that
        fits its decision always gets its blocks."""
        if blocks < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({blocks})")
        if not fits(self._reserved, blocks, kv):
            return None
        return self.reserve(blocks)

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after every release (the admission queue wakes its head)."""
        self._listeners.append(callback)

    def _release(self, reservation: Reservation) -> None:
        self._reserved -= reservation.blocks
        self._held -= 1
        for callback in self._listeners:
            callback()


def fits(reserved_total: int, blocks: int, kv: KVState) -> bool:
    """Whether `blocks` more fit `kv` beside `reserved_total` reserved blocks: best-fit's test
    (`need <= free - unshown reserved`), the one a shared ledger applies atomically."""
    return blocks <= kv.free_blocks - unshown_reserved(reserved_total, kv)


@dataclass(eq=False)
class EngineSlot:
    """One engine of the pool as admission sees it: its name, KV state and ledger, whether it
    is healthy now, and the engine object the plan's calls go to (opaque here)."""

    name: str
    kv_state: Callable[[], Awaitable[KVState]]
    ledger: KVLedger = field(default_factory=KVLedger)
    healthy: Callable[[], bool] = lambda: True
    engine: Any = None


@dataclass(frozen=True)
class Admission:
    """An admitted query: its final plan, the KV state it was decided on, and its blocks."""

    plan: Plan
    kv: KVState
    """The KV state read for the final decision."""
    reservation: Reservation
    queued_s: float
    """Seconds spent waiting in the queue (0 when admitted at once)."""
    queued: bool
    slot: EngineSlot | None = None
    """The engine of the pool the plan was placed on (its calls go there)."""


class _Waiter:
    __slots__ = ("wake",)

    def __init__(self) -> None:
        # Set when this waiter becomes the head, and (as head) when a reservation is released.
        self.wake = asyncio.Event()


class AdmissionQueue:
    """FIFO admission over one `KVLedger`; see the module docstring."""

    def __init__(
        self,
        ledger: KVLedger,
        kv_state: Callable[[], Awaitable[KVState]],
        maxsize: int,
        poll_s: float = 0.05,
        *,
        slots: Sequence[EngineSlot] = (),
        strategy: Strategy = "best-fit",
    ) -> None:
        """A queue over one engine (`ledger`, `kv_state`), or over the pool `slots` (then
        `ledger` and `kv_state` must be the first slot's: the pool's primary engine)."""
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.slots: tuple[EngineSlot, ...] = tuple(slots) or (EngineSlot("", kv_state, ledger),)
        self.ledger = ledger
        self._kv_state = kv_state
        self.maxsize = maxsize
        self.poll_s = poll_s
        self.strategy: Strategy = strategy
        self._turn = 0
        self._waiters: deque[_Waiter] = deque()
        for slot in self.slots:
            slot.ledger.on_release(self._wake_head)

    @classmethod
    def over(
        cls,
        slots: Sequence[EngineSlot],
        maxsize: int,
        poll_s: float = 0.05,
        strategy: Strategy = "best-fit",
    ) -> AdmissionQueue:
        """A queue over the engine pool `slots` (the first is the primary)."""
        first = slots[0]
        return cls(
            first.ledger, first.kv_state, maxsize, poll_s, slots=slots, strategy=strategy
        )

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def waiting(self) -> int:
        """Queries waiting for admission now."""
        return len(self._waiters)

    def _wake_head(self) -> None:
        if self._waiters:
            self._waiters[0].wake.set()

    async def _decide(
        self, decide: Callable[[KVState, int], Plan]
    ) -> tuple[EngineSlot, KVState, Plan]:
        if len(self.slots) == 1:
            slot = self.slots[0]
            kv = await slot.kv_state()
            # The local ledger's total() and try_reserve() never suspend: the total `decide`
            # sees is still the total when the plan's blocks are added to it. A shared
            # ledger's may; its try_reserve re-checks the fit atomically.
            return slot, kv, decide(kv, await slot.ledger.total())
        return await self._decide_pool(decide)

    async def _decide_pool(
        self, decide: Callable[[KVState, int], Plan]
    ) -> tuple[EngineSlot, KVState, Plan]:
        """`decide` on every engine (the unhealthy ones only when none is healthy), then
        `place` picks one. An engine whose KV state cannot be read is left out of this
        decision; when none can be read, the first error is raised."""
        slots = [s for s in self.slots if s.healthy()] or list(self.slots)
        read = await asyncio.gather(*(s.kv_state() for s in slots), return_exceptions=True)
        for r in read:  # an engine failing is expected; anything else is a bug: raise it
            if isinstance(r, BaseException) and not isinstance(r, EngineError):
                raise r
        live = [(s, kv) for s, kv in zip(slots, read, strict=True) if isinstance(kv, KVState)]
        if not live:
            raise next(e for e in read if isinstance(e, EngineError))
        # No suspension from here to the caller's reserve() with local ledgers (see above).
        totals = [await s.ledger.total() for s, _ in live]
        plans = [decide(kv, t) for (_, kv), t in zip(live, totals, strict=True)]
        options = [
            EngineOption(p, s.healthy(), s.ledger.held, kv.total_blocks)
            for (s, kv), p in zip(live, plans, strict=True)
        ]
        i = place(options, self.strategy, self._turn)
        assert i is not None
        return live[i][0], live[i][1], plans[i]

    async def _admitted(
        self, slot: EngineSlot, kv: KVState, plan: Plan, start: float | None
    ) -> Admission | None:
        """The plan's blocks reserved on its engine, or None when another process took them
        first (a shared ledger's compare-and-reserve refused)."""
        reservation = await slot.ledger.try_reserve(plan.need_blocks, kv)
        if reservation is None:
            return None
        if len(self.slots) > 1:
            self._turn += 1
        if start is None:
            return Admission(plan, kv, reservation, 0.0, False, slot)
        return Admission(plan, kv, reservation, time.monotonic() - start, True, slot)

    @staticmethod
    def _check_ever_fits(kv: KVState, plan: Plan) -> None:
        if plan.reason == "wait" and plan.need_blocks > kv.total_blocks:
            raise ExceedsKVCache(
                f"the smallest configuration needs {plan.need_blocks} KV blocks but the engine "
                f"has {kv.total_blocks} in total"
            )

    async def admit(self, decide: Callable[[KVState, int], Plan]) -> Admission:
        """Admit one query: decide its plan and reserve its blocks, waiting if needed.

        `decide(kv, reserved_total)` must be pure and quick (it runs on the event loop).
        Raises `ExceedsKVCache` when not even the smallest configuration fits the whole cache,
        and `QueueFull` when the query would have to wait and `maxsize` queries already do;
        neither reserves anything. Cancelling the call while it waits leaves the queue (the
        queries behind move up) and reserves nothing.
        """
        start = time.monotonic()
        slot, kv, plan = await self._decide(decide)
        # Admit at once only when nobody waits: a newcomer never overtakes a queued query,
        # even when it is smaller (checked after the await: someone may have queued meanwhile).
        if plan.reason != "wait" and not self._waiters:
            admitted = await self._admitted(slot, kv, plan, None)
            if admitted is not None:
                return admitted
        self._check_ever_fits(kv, plan)
        if len(self._waiters) >= self.maxsize:
            raise QueueFull(
                f"the admission queue is full ({self.maxsize} queries waiting for KV cache)"
            )
        me = _Waiter()
        self._waiters.append(me)
        # Alone in the queue, the decision just taken (`wait`) is current: wait before the next.
        # A plan that lost its blocks to another process is decided again at once.
        fresh = self._waiters[0] is me and plan.reason == "wait"
        try:
            while True:
                if self._waiters[0] is not me:
                    await me.wake.wait()  # set when the one ahead leaves the queue
                    continue
                if not fresh:
                    me.wake.clear()  # a release from here on triggers another decision
                    slot, kv, plan = await self._decide(decide)
                fresh = False
                if plan.reason != "wait":
                    admitted = await self._admitted(slot, kv, plan, start)
                    if admitted is not None:
                        return admitted
                    # Lost the race to another process: decide again after a release or poll_s
                    # (never a busy loop, even for a decision that disagrees with the ledger).
                else:
                    self._check_ever_fits(kv, plan)
                # Re-decide on a release, or after poll_s anyway: the engine may free blocks
                # without a release of ours (another client's requests finishing, a lagging
                # metrics gauge catching up).
                try:
                    async with asyncio.timeout(self.poll_s):
                        await me.wake.wait()
                except TimeoutError:
                    pass
        finally:
            # Admitted, cancelled or failed: leave the queue and hand the turn to the next one,
            # which decides at once (memory may suffice for it too).
            was_head = self._waiters[0] is me
            self._waiters.remove(me)
            if was_head:
                self._wake_head()
