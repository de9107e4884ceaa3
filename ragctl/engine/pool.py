"""A pool of engines: any mix of remote vLLM servers and an in-process engine, each with its own
KV state, health and model name.

- `PoolMember` wraps one engine: every call is forwarded, and a call that finds the engine
  unreachable, gone or silent (`EngineUnavailable`, `EngineTimeout`) marks it unhealthy. Its
  health check (`check`: vLLM's `/health` for a remote server) marks it healthy again.
- `EnginePool` is itself an `Engine` (its calls go to the first healthy member, the primary:
  the profiler's and the fixed-configuration path's engine), holds the members and runs their
  periodic health checks. Where each adaptive plan runs is the admission queue's placement
  (`ragctl.scheduler.placement`), not the pool's: the controller sends a plan's calls to the
  member its admission names.

`open_pool(settings)` opens the members that `settings.engine_specs()` lists, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragctl.engine.base import Engine, StreamEvent
from ragctl.errors import EngineError, EngineTimeout, EngineUnavailable, InvalidSetting
from ragctl.types import Generation, GenerationRequest, KVState

log = logging.getLogger(__name__)

DOWN_ERRORS = (EngineUnavailable, EngineTimeout)
"""Errors that take a member out of the pool until its health check passes."""


class PoolMember(Engine):
    """One engine of a pool (see the module docstring). `label`: its URL, or `in-process`."""

    def __init__(self, engine: Engine, label: str) -> None:
        self.inner = engine
        self.label = label
        self.name = engine.name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.steps = engine.steps
        self.healthy = True
        self.last_error = ""
        self.down_since: float | None = None
        self.transitions = 0
        """Times the member left the pool or rejoined it."""

    def mark_down(self, error: BaseException | str) -> None:
        if self.healthy:
            self.healthy = False
            self.down_since = time.monotonic()
            self.transitions += 1
            log.warning("engine %s left the pool: %s", self.label, error)
        self.last_error = str(error)

    def mark_up(self) -> None:
        if not self.healthy:
            self.healthy = True
            self.transitions += 1
            down = time.monotonic() - (self.down_since or time.monotonic())
            log.warning("engine %s rejoined the pool after %.1fs", self.label, down)
        self.down_since = None

    async def check(self, timeout_s: float = 5.0) -> bool:
        """Run the engine's health check; mark the member up or down by its result."""
        try:
            await self.inner.check_health(timeout_s)
        except EngineError as e:
            self.mark_down(e)
            return False
        self.mark_up()
        return True

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        try:
            return await self.inner.generate(requests)
        except DOWN_ERRORS as e:
            self.mark_down(e)
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        try:
            async with contextlib.aclosing(self.inner.stream(request)) as events:
                async for event in events:
                    yield event
        except DOWN_ERRORS as e:
            self.mark_down(e)
            raise

    async def kv_state(self) -> KVState:
        try:
            return await self.inner.kv_state()
        except DOWN_ERRORS as e:
            self.mark_down(e)
            raise

    async def check_health(self, timeout_s: float = 5.0) -> None:
        await self.inner.check_health(timeout_s)

    async def reset_prefix_cache(self) -> bool:
        return await self.inner.reset_prefix_cache()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"PoolMember({self.label}, {'healthy' if self.healthy else 'down'})"


@dataclass
class PoolHealth:
    """How the pool's health checks run."""

    interval_s: float = 2.0
    """Seconds between two checks of every member (0: no periodic checks)."""
    timeout_s: float = 5.0
    """A member that does not pass its check within this many seconds is down."""


class EnginePool(Engine):
    """Several engines as one (see the module docstring). The members should serve the same
    model (one tokenizer sizes every plan: the first member's); the pool's context is the
    smallest member's."""

    def __init__(self, members: Sequence[PoolMember], health: PoolHealth | None = None) -> None:
        if not members:
            raise InvalidSetting("an engine pool needs at least one engine")
        labels = [m.label for m in members]
        if len(set(labels)) != len(labels):
            raise InvalidSetting(f"the engine pool names an engine twice: {labels}")
        self.members = tuple(members)
        first = self.members[0]
        self.name = first.name
        self.tokenizer = first.tokenizer
        self.max_model_len = min(m.max_model_len for m in self.members)
        self.health = health or PoolHealth()
        self._task: asyncio.Task[None] | None = None
        names = {m.name for m in self.members}
        if len(names) > 1:
            log.warning("the engine pool serves different model names: %s", sorted(names))

    @classmethod
    def of(
        cls, engines: Sequence[tuple[Engine, str]], health: PoolHealth | None = None
    ) -> EnginePool:
        """A pool of `(engine, label)` pairs."""
        return cls([PoolMember(e, label) for e, label in engines], health)

    @property
    def url(self) -> str:
        return ",".join(m.label for m in self.members)

    def healthy_members(self) -> list[PoolMember]:
        return [m for m in self.members if m.healthy]

    def primary(self) -> PoolMember:
        """The first healthy member (the first member when none is healthy)."""
        return next((m for m in self.members if m.healthy), self.members[0])

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return await self.primary().generate(requests)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        async with contextlib.aclosing(self.primary().stream(request)) as events:
            async for event in events:
                yield event

    async def kv_state(self) -> KVState:
        return await self.primary().kv_state()

    async def reset_prefix_cache(self) -> bool:
        """Every healthy member's; True when all of them could."""
        done = await asyncio.gather(*(m.reset_prefix_cache() for m in self.healthy_members()))
        return bool(done) and all(done)

    async def check_health(self, timeout_s: float = 5.0) -> None:
        if not await self.check_all(timeout_s):
            raise EngineUnavailable(
                "no engine of the pool is healthy: "
                + "; ".join(f"{m.label}: {m.last_error}" for m in self.members)
            )

    async def check_all(self, timeout_s: float | None = None) -> bool:
        """Check every member now (concurrently); True when at least one is healthy."""
        t = self.health.timeout_s if timeout_s is None else timeout_s
        results = await asyncio.gather(*(m.check(t) for m in self.members))
        return any(results)

    def start_health_checks(self) -> None:
        """Check every member every `health.interval_s` seconds, on the running event loop,
        until `aclose` (idempotent; nothing with an interval of 0)."""
        if self._task is not None or self.health.interval_s <= 0:
            return
        self._task = asyncio.ensure_future(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health.interval_s)
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must outlive any one check
                log.exception("engine pool health check failed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for m in self.members:
            await m.aclose()

    def __repr__(self) -> str:
        return f"EnginePool({', '.join(map(repr, self.members))})"


def members_of(engine: Engine) -> tuple[Engine, ...]:
    """The engines a plan may be placed on: a pool's members, or the engine itself."""
    return engine.members if isinstance(engine, EnginePool) else (engine,)


def label_of(engine: Engine) -> str:
    """How a Decision names the engine: a member's label, a remote engine's URL, else
    `in-process`."""
    if isinstance(engine, PoolMember):
        return engine.label
    url = getattr(engine, "url", None)
    return url if isinstance(url, str) and url else "in-process"


def is_healthy(engine: Engine) -> bool:
    return engine.healthy if isinstance(engine, PoolMember) else True


@dataclass(frozen=True)
class EngineSpec:
    """One engine of a pool as the settings name it."""

    url: str | None
    """A vLLM server's base URL; None: an in-process engine."""
    max_num_seqs: int | None = None
    """In-process engine: most sequences it runs at once (None: the settings' value)."""

    @property
    def label(self) -> str:
        return self.url or "in-process"


def parse_pool_file(text: str, where: str = "pool file") -> list[EngineSpec]:
    """A pool file's engines: one per line, `URL` or `local`, then optional `max_num_seqs=N`;
    blank lines and `#` comments are skipped."""
    specs = []
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        target, *options = words
        seqs = None
        for opt in options:
            key, _, value = opt.partition("=")
            if key != "max_num_seqs" or not value.isdigit() or int(value) < 1:
                raise InvalidSetting(
                    f"{where}:{n}: unknown option {opt!r} (expected max_num_seqs=N, N >= 1)"
                )
            seqs = int(value)
        specs.append(EngineSpec(None if target == "local" else target, seqs))
    return specs


def pool_specs(settings: Any) -> list[EngineSpec]:
    """The engines the settings name: `engine_url`'s, then the pool file's; an in-process
    engine when they name none."""
    specs = [EngineSpec(None if u == "local" else u) for u in settings.engine_urls()]
    path = settings.engine_pool_file
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InvalidSetting(f"cannot read the engine pool file {path}: {e}") from None
        specs += parse_pool_file(text, str(path))
    if sum(s.url is None for s in specs) > 1:
        raise InvalidSetting("an engine pool can hold at most one in-process engine")
    return specs or [EngineSpec(None)]
