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

No I/O of its own: the KV state comes from the `kv_state` callable. Single event loop: reserve
and release from the loop's thread (the controller does). The local ledger's async methods never
suspend, so a decision and its reservation still happen in one event-loop step; a shared ledger
re-checks the fit atomically where the reservations live, and a plan that lost the race to
another process is decided again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from ragctl.errors import ExceedsKVCache, QueueFull
from ragctl.scheduler.bestfit import unshown_reserved
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
        self._listeners: list[Callable[[], None]] = []

    @property
    def reserved(self) -> int:
        return self._reserved

    def reserve(self, blocks: int) -> Reservation:
        """Reserve `blocks` unconditionally (plans that never wait: fixed configurations)."""
        if blocks < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({blocks})")
        self._reserved += blocks
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
        for callback in self._listeners:
            callback()


def fits(reserved_total: int, blocks: int, kv: KVState) -> bool:
    """Whether `blocks` more fit `kv` beside `reserved_total` reserved blocks: best-fit's test
    (`need <= free - unshown reserved`), the one a shared ledger applies atomically."""
    return blocks <= kv.free_blocks - unshown_reserved(reserved_total, kv)


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
    ) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.ledger = ledger
        self._kv_state = kv_state
        self.maxsize = maxsize
        self.poll_s = poll_s
        self._waiters: deque[_Waiter] = deque()
        ledger.on_release(self._wake_head)

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def waiting(self) -> int:
        """Queries waiting for admission now."""
        return len(self._waiters)

    def _wake_head(self) -> None:
        if self._waiters:
            self._waiters[0].wake.set()

    async def _decide(self, decide: Callable[[KVState, int], Plan]) -> tuple[KVState, Plan]:
        kv = await self._kv_state()
        # The local ledger's total() and try_reserve() never suspend: the total `decide` sees
        # is still the total when the plan's blocks are added to it. A shared ledger's may;
        # its try_reserve re-checks the fit atomically.
        return kv, decide(kv, await self.ledger.total())

    async def _reserve(self, kv: KVState, plan: Plan) -> Reservation | None:
        """The plan's blocks, or None when another process reserved them first."""
        return await self.ledger.try_reserve(plan.need_blocks, kv)

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
        kv, plan = await self._decide(decide)
        # Admit at once only when nobody waits: a newcomer never overtakes a queued query,
        # even when it is smaller (checked after the await: someone may have queued meanwhile).
        if plan.reason != "wait" and not self._waiters:
            reservation = await self._reserve(kv, plan)
            if reservation is not None:
                return Admission(plan, kv, reservation, 0.0, False)
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
                    kv, plan = await self._decide(decide)
                fresh = False
                if plan.reason != "wait":
                    reservation = await self._reserve(kv, plan)
                    if reservation is not None:
                        return Admission(plan, kv, reservation, time.monotonic() - start, True)
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
