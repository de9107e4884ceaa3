"""The one sync/async bridge: the event loop an engine runs on (its home), and hand-offs to it.

An engine belongs to the event loop it runs on. Blocking callers (scripts, notebooks, sync
LangChain) and async callers on other loops or threads hand their coroutines to that loop and
wait; callers already on it run them directly. The home is a private loop on a daemon thread
(anyio's blocking portal runs it, and stops it cleanly), a loop the caller's engine already runs
on, or not chosen yet: then async calls run where they are awaited and the first blocking call
from plain code starts a private loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from anyio.from_thread import start_blocking_portal

from ragctl.errors import InvalidRequest

T = TypeVar("T")
Sink = Callable[[str], None]
"""Receives text deltas; called on the engine's loop (maybe another thread's)."""
_DONE = object()


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Bridge:
    """Hand-offs to one home event loop (`loop`; None: not chosen yet, see the module notes).
    `hint` ends the error of a blocking call made where it would block the loop forever."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        hint: str = "use the async form (await controller.aask(...) / abatch(...))",
    ) -> None:
        self.loop = loop
        self.hint = hint
        self._portal: contextlib.AbstractContextManager[Any] | None = None

    @classmethod
    def private(cls, **kwargs: Any) -> Bridge:
        """A bridge whose home is a new private loop on a daemon thread."""
        bridge = cls(**kwargs)
        bridge._start()
        return bridge

    def _start(self) -> None:
        self._portal = start_blocking_portal()
        portal = self._portal.__enter__()
        self.loop = portal.call(asyncio.get_running_loop)

    @property
    def is_private(self) -> bool:
        return self._portal is not None

    def is_home(self) -> bool:
        """Whether the caller is running on the home loop."""
        return self.loop is not None and running_loop() is self.loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the home loop and block until it is done. Refused (`InvalidRequest`)
        inside a running loop that is home or may be: it would block that loop forever.
        Interrupting the wait (Ctrl-C) cancels the coroutine, so its engine calls are aborted."""
        future = self.spawn(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coro` on the home loop and return its future at once (cancelling the future
        cancels it); refused where `run` is, since waiting on it there would block forever."""
        if self.is_home() or (self.loop is None and running_loop() is not None):
            coro.close()
            raise InvalidRequest(
                "a blocking call was made on the event loop the engine runs on, which it would "
                f"block forever; {self.hint}"
            )
        if self.loop is None:
            self._start()
        return self._submit(coro)

    def iterate(self, run: Callable[[Sink], Coroutine[Any, Any, T]]) -> Iterator[str | T]:
        """Blocking streaming: start `run(sink)` on the home loop and yield what it sends to
        `sink` as it comes, then its result. Closing the iterator early cancels it."""
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        future = self.spawn(run(items.put))
        future.add_done_callback(lambda _: items.put(_DONE))
        try:
            while (item := items.get()) is not _DONE:
                yield item
            yield future.result()
        finally:
            future.cancel()  # a no-op once done

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the home loop (directly when on it or none is chosen); cancelling
        the awaiter cancels it."""
        if self.loop is None or self.is_home():
            return await coro
        return await asyncio.wrap_future(self._submit(coro))

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        loop = self.loop
        assert loop is not None
        if loop.is_closed() or not (self.is_private or loop.is_running()):
            coro.close()
            raise InvalidRequest(
                "the event loop the engine runs on is not running any more; build it where "
                "it will be used (or on a private loop)"
            )
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def close(self) -> None:
        """Stop a private loop (its unfinished tasks are cancelled); a no-op for other homes
        and on the private loop itself (which cannot wait for its own end)."""
        if self._portal is None or self.is_home():
            return
        portal, self._portal = self._portal, None
        portal.__exit__(None, None, None)

    async def aclose(self) -> None:
        """`close` from async code (off the home loop, in a worker thread)."""
        if self._portal is not None and not self.is_home():
            await asyncio.to_thread(self.close)


def putter(queue: asyncio.Queue[T]) -> Callable[[T], None]:
    """`queue.put_nowait` for callers on any thread, for a queue of the running loop: at once
    on this loop (so a producer that finishes sees its items queued before its result), else
    through `call_soon_threadsafe` (queued ahead of the result, which crosses the same way)."""
    loop = asyncio.get_running_loop()

    def put(item: T) -> None:
        if running_loop() is loop:
            queue.put_nowait(item)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return put


async def stream_through(run: Callable[[Sink], Awaitable[T]]) -> AsyncIterator[str | T]:
    """Async streaming: run `run(sink)` and yield what it sends to `sink` as it comes (from
    any loop or thread), then its result. Closing the iterator early (or cancelling its
    consumer) cancels it, and so its engine calls."""
    deltas: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.ensure_future(run(putter(deltas)))
    try:
        while not task.done():
            getter = asyncio.ensure_future(deltas.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        while not deltas.empty():
            yield deltas.get_nowait()
        yield task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
