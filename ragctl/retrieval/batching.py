"""Opportunistic batching of the retrieval stages that concurrent requests share.

`Batcher` collects items submitted concurrently on an event loop into batches for one blocking
batch function: a batch runs when it holds `max_batch` items or when its oldest item has waited
`max_wait_s`, whichever comes first, in a worker thread (`asyncio.to_thread`) so the event loop
stays free. `max_batch=1` runs every item at once, alone: no batching and no added latency.

`BatchingRetriever` puts two of them in front of a `Retriever`: one for query embedding, one for
the FAISS search, so `embed_batch_size` / `search_batch_size` (and their waits) in `Settings` are
real knobs, as the engine's own batching of LLM calls is. `asearch(question, k)` returns what
`retriever.search(question, k)` does: bit for bit when the embedding is not batched (batch 1),
else the same chunks with scores that can differ by float rounding (a batch is padded to its
longest question and runs other matrix shapes). Everything else is passed through to the
retriever.

`apply_retrieval_threads(n)` sets the CPU threads that query embedding (torch) and FAISS use in
this process. The in-process vLLM engine runs its engine core in a child process, so this only
affects retrieval (and the little torch work of the engine's front end).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from ragctl.errors import InvalidRequest
from ragctl.types import Chunk

__all__ = ["Batcher", "BatchingRetriever", "apply_retrieval_threads"]

T = TypeVar("T")
R = TypeVar("R")


class _Pending(Generic[T, R]):
    """The batch being collected on one event loop."""

    __slots__ = ("items", "futures", "timer")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.futures: list[asyncio.Future[R]] = []
        self.timer: asyncio.Handle | None = None


class Batcher(Generic[T, R]):
    """Runs `fn(items) -> results` (blocking, one result per item, in order) over batches of
    items submitted concurrently with `await batcher.submit(item)`.

    A batch is run when it is full (`max_batch` items) or when its oldest item has waited
    `max_wait_s`; with `max_wait_s=0` and `max_batch > 1` it holds what was submitted in the same
    event-loop turn (e.g. by one `asyncio.gather`). `max_batch=1` is the pass-through case: each
    item runs at once, alone. Batches run in worker threads, so several may run at a time.

    An exception from `fn` is raised to every caller of that batch. A caller that is cancelled
    leaves the others alone: its item is dropped if its batch has not started, its result is
    discarded if it has. Usable from any event loop (one pending batch per loop)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 1,
        max_wait_s: float = 0.0,
        name: str = "batch",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._pending: dict[asyncio.AbstractEventLoop, _Pending[T, R]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Batches are counted from worker threads.
        self._lock = threading.Lock()
        self._batches = 0
        self._items = 0
        self._errors = 0
        self._cancelled = 0
        self._busy_s = 0.0
        self._sizes: Counter[int] = Counter()

    @property
    def passthrough(self) -> bool:
        """Whether every item runs at once, alone (`max_batch == 1`)."""
        return self.max_batch == 1

    def run(self, items: list[T]) -> list[R]:
        """Run the batch function on `items` now, in the calling thread, and count the batch."""
        start = time.perf_counter()
        try:
            results = list(self.fn(items))
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self.name}: the batch function gave {len(results)} results for "
                    f"{len(items)} items"
                )
        except BaseException:
            self._record(len(items), time.perf_counter() - start, error=True)
            raise
        self._record(len(items), time.perf_counter() - start)
        return results

    async def submit(self, item: T) -> R:
        """The result of `item`, computed in a batch with the items submitted around it."""
        if self.max_batch == 1:
            return (await asyncio.to_thread(self.run, [item]))[0]
        loop = asyncio.get_running_loop()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = _Pending()
            if self.max_wait_s > 0:
                pending.timer = loop.call_later(self.max_wait_s, self._flush, loop, pending)
            else:
                pending.timer = loop.call_soon(self._flush, loop, pending)
        future: asyncio.Future[R] = loop.create_future()
        pending.items.append(item)
        pending.futures.append(future)
        if len(pending.items) >= self.max_batch:
            self._flush(loop, pending)
        # Cancelling the caller cancels `future`; the batch skips or ignores it.
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop, pending: _Pending[T, R]) -> None:
        if self._pending.get(loop) is not pending:
            return  # already flushed (full before its timer fired)
        del self._pending[loop]
        if pending.timer is not None:
            pending.timer.cancel()
        live = [(i, f) for i, f in zip(pending.items, pending.futures, strict=True) if not f.done()]
        if len(live) < len(pending.items):
            with self._lock:
                self._cancelled += len(pending.items) - len(live)
        if not live:
            return
        task = loop.create_task(self._run_batch(live))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, live: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await asyncio.to_thread(self.run, [item for item, _ in live])
        except asyncio.CancelledError:
            # The loop is shutting down: the callers go with it.
            for _, future in live:
                future.cancel()
            raise
        except Exception as e:
            for _, future in live:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _record(self, size: int, seconds: float, *, error: bool = False) -> None:
        with self._lock:
            self._batches += 1
            self._items += size
            self._errors += error
            self._busy_s += seconds
            self._sizes[size] += 1

    def stats(self) -> dict[str, Any]:
        """Batches run, items in them, the histogram of batch sizes (size -> batches), seconds
        spent in the batch function, failed batches, and items dropped because their caller was
        cancelled before their batch ran."""
        with self._lock:
            return {
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_s * 1000.0,
                "batches": self._batches,
                "items": self._items,
                "mean_batch": self._items / self._batches if self._batches else 0.0,
                "batch_sizes": dict(sorted(self._sizes.items())),
                "busy_s": self._busy_s,
                "errors": self._errors,
                "cancelled": self._cancelled,
            }


# --- threads -----------------------------------------------------------------------------------

_threads: int | None = None
_local = threading.local()


def apply_retrieval_threads(n: int | None) -> None:
    """Use `n` CPU threads for query embedding (torch) and FAISS search in this process; None
    leaves the libraries' defaults. torch's setting is process-wide; FAISS's (OpenMP) is per
    thread, so it is set here and again in each worker thread that runs a retrieval batch."""
    global _threads
    if n is None:
        return
    if n < 1:
        raise InvalidRequest(f"retrieval threads must be >= 1, got {n}")
    _threads = n
    _local.threads = None
    _thread_setup(import_torch=True)


def _thread_setup(*, import_torch: bool = False) -> None:
    """Apply the configured thread count in the calling thread (once per thread)."""
    n = _threads
    if n is None or getattr(_local, "threads", None) == n:
        return
    _local.threads = n
    torch = sys.modules.get("torch")
    if torch is None and import_torch:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        torch.set_num_threads(n)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


# --- the retriever -----------------------------------------------------------------------------


class BatchingRetriever:
    """A `Retriever` whose `asearch` embeds queries in batches (one `Batcher`) and searches
    FAISS in batches (a second one). Everything else is the wrapped retriever's: `search`,
    `search_batch`, `card`, `chunks`, `len()`, and any other attribute."""

    def __init__(
        self,
        retriever: Any,
        *,
        embed_batch: int = 1,
        embed_wait_s: float = 0.0,
        search_batch: int = 1,
        search_wait_s: float = 0.0,
    ) -> None:
        self.inner = retriever
        """The wrapped retriever (a `ragctl.retrieval.index.Retriever`)."""
        self.embed_batcher: Batcher[str, np.ndarray] = Batcher(
            self._embed, max_batch=embed_batch, max_wait_s=embed_wait_s, name="embed"
        )
        self.search_batcher: Batcher[tuple[np.ndarray, int], list[Chunk]] = Batcher(
            self._search, max_batch=search_batch, max_wait_s=search_wait_s, name="search"
        )
        # A retriever without the two halves (e.g. a LangChain adapter) is searched whole.
        self._split = hasattr(retriever, "embed_queries") and hasattr(retriever, "search_vectors")

    @classmethod
    def from_settings(cls, retriever: Any, settings: Any) -> BatchingRetriever:
        """Batch sizes and waits from `settings` (`embed_batch_size`, `embed_batch_wait_ms`,
        `search_batch_size`, `search_batch_wait_ms`)."""
        return cls(
            retriever,
            embed_batch=settings.embed_batch_size,
            embed_wait_s=settings.embed_batch_wait_ms / 1000.0,
            search_batch=settings.search_batch_size,
            search_wait_s=settings.search_batch_wait_ms / 1000.0,
        )

    async def asearch(self, question: str, k: int) -> list[Chunk]:
        """`search(question, k)`, with the embedding and the search batched with concurrent
        calls. Bad requests fail here, alone, before they could fail a batch."""
        chunks, _ = await self.asearch_with_vector(question, k)
        return chunks

    async def asearch_with_vector(self, question: str, k: int) -> tuple[list[Chunk], Any]:
        """`asearch`, and the query embedding it searched with (None when the wrapped retriever
        searches whole): the learned profiler reads it, so it costs no second embedding."""
        if k < 1:
            raise InvalidRequest(f"the number of chunks to retrieve must be >= 1, got {k}")
        text = question.strip()
        if not text:
            raise InvalidRequest("the question is empty")
        if not self._split:
            return await asyncio.to_thread(self.search, text, k), None
        if self.embed_batcher.passthrough and self.search_batcher.passthrough:
            # Nothing to batch: both stages in one trip to a worker thread.
            return await asyncio.to_thread(self._search_now, text, k)
        vector = await self.embed_batcher.submit(text)
        return await self.search_batcher.submit((vector, k)), vector

    def _search_now(self, text: str, k: int) -> tuple[list[Chunk], np.ndarray]:
        vector = self.embed_batcher.run([text])[0]
        return self.search_batcher.run([(vector, k)])[0], vector

    def _embed(self, texts: list[str]) -> np.ndarray:
        _thread_setup()
        return self.inner.embed_queries(texts)

    def _search(self, items: list[tuple[np.ndarray, int]]) -> list[list[Chunk]]:
        """One FAISS search per distinct k in the batch (usually one: the adaptive path always
        retrieves the rules' largest k). Not one search at the largest k cut to each row's k:
        among chunks of equal score FAISS's choice and order depend on k, so the cut rows
        could differ from `search(question, k)`."""
        _thread_setup()
        by_k: dict[int, list[int]] = {}
        for pos, (_, k) in enumerate(items):
            by_k.setdefault(k, []).append(pos)
        out: list[list[Chunk]] = [[] for _ in items]
        for k, positions in by_k.items():
            rows = self.inner.search_vectors(np.stack([items[p][0] for p in positions]), k)
            for p, row in zip(positions, rows, strict=True):
                out[p] = row
        return out

    def stats(self) -> dict[str, Any]:
        """Per stage (`embed`, `search`): `Batcher.stats()`; plus the retrieval threads."""
        return {
            "embed": self.embed_batcher.stats(),
            "search": self.search_batcher.stats(),
            "threads": _threads,
        }

    # -- the wrapped retriever --------------------------------------------------------------------

    def search(self, question: str, k: int) -> list[Chunk]:
        _thread_setup()
        return self.inner.search(question, k)

    def search_batch(self, questions: Sequence[str], k: int) -> list[list[Chunk]]:
        _thread_setup()
        return self.inner.search_batch(questions, k)

    @property
    def card(self) -> Any:
        return self.inner.card

    @property
    def chunks(self) -> list[Chunk]:
        return self.inner.chunks

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        # Only called for what the wrapper lacks; never for dunders or before `inner` is set.
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        e, s = self.embed_batcher, self.search_batcher
        return (
            f"BatchingRetriever({self.inner!r}, embed={e.max_batch}/{e.max_wait_s * 1000:g}ms, "
            f"search={s.max_batch}/{s.max_wait_s * 1000:g}ms)"
        )
