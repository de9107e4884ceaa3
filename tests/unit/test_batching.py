"""Opportunistic batching: the generic `Batcher` with a fake batch function (batches fill, flush
on their wait, 1/0 passes through, errors reach every caller, a cancelled caller leaves the
others alone, stats), and `BatchingRetriever` over a small in-memory FAISS retriever."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from ragctl.errors import InvalidRequest
from ragctl.retrieval import batching
from ragctl.retrieval.batching import Batcher, BatchingRetriever, apply_retrieval_threads
from ragctl.retrieval.collection import load_card
from ragctl.retrieval.index import build_retriever
from ragctl.types import Chunk
from tests.unit.test_index import HashingEmbedder as IndexTestEmbedder


class Fake:
    """A blocking batch function: records its batches and threads, returns item * 10."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.delay_s = delay_s
        self.fail = fail
        self.started = threading.Event()
        self.release: threading.Event | None = None

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        self.started.set()
        if self.release is not None:
            self.release.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise ValueError(f"batch of {len(items)} failed")
        return [x * 10 for x in items]


async def test_batches_fill_to_max_batch_without_waiting() -> None:
    fake = Fake()
    batcher = Batcher(fake, max_batch=4, max_wait_s=30.0)
    start = time.perf_counter()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert fake.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert time.perf_counter() - start < 5.0  # full batches never wait for the 30 s


async def test_a_partial_batch_runs_when_its_oldest_item_has_waited() -> None:
    fake = Fake()
    batcher = Batcher(fake, max_batch=100, max_wait_s=0.2)

    async def late(i: int, after: float) -> tuple[int, float]:
        await asyncio.sleep(after)
        return await batcher.submit(i), time.perf_counter()

    start = time.perf_counter()
    (r0, t0), (r1, t1) = await asyncio.gather(late(0, 0.0), late(1, 0.1))
    assert (r0, r1) == (0, 10)
    assert fake.batches == [[0, 1]]
    # The wait runs from the first item, not the last: ~0.2 s, not 0.3 s.
    assert 0.19 <= t0 - start < 0.29 + 1.0
    assert abs(t1 - t0) < 0.05


async def test_batch_1_is_a_pass_through_in_a_worker_thread() -> None:
    fake = Fake()
    batcher = Batcher(fake, max_batch=1, max_wait_s=30.0)  # the wait cannot matter
    assert batcher.passthrough
    start = time.perf_counter()
    assert await batcher.submit(3) == 30
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert time.perf_counter() - start < 5.0
    assert results == [0, 10, 20, 30, 40]
    assert sorted(fake.batches) == [[0], [1], [2], [3], [3], [4]]
    assert threading.get_ident() not in fake.threads


async def test_wait_0_batches_what_arrives_in_the_same_loop_turn() -> None:
    fake = Fake()
    batcher = Batcher(fake, max_batch=8, max_wait_s=0.0)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert fake.batches == [[0, 1, 2, 3, 4]]
    assert await batcher.submit(7) == 70
    assert fake.batches[-1] == [7]


async def test_the_event_loop_stays_free_while_a_batch_runs() -> None:
    # A batch far longer than the test's own wait, so that a busy machine stalling the loop
    # for a second cannot pass for the loop being blocked behind the batch.
    fake = Fake(delay_s=3.0)
    batcher = Batcher(fake, max_batch=2, max_wait_s=0.0)
    job = asyncio.gather(batcher.submit(1), batcher.submit(2))
    start = time.perf_counter()
    await asyncio.sleep(0.05)
    assert time.perf_counter() - start < 2.0  # not blocked behind the 3 s batch
    assert not job.done()
    assert await job == [10, 20]


async def test_an_error_reaches_every_caller_of_its_batch_only() -> None:
    fake = Fake(fail=True)
    batcher = Batcher(fake, max_batch=3, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and "batch of 3" in str(r) for r in results)
    fake.fail = False
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 10, 20]
    stats = batcher.stats()
    assert stats["errors"] == 1 and stats["batches"] == 2


async def test_a_wrong_number_of_results_fails_the_batch() -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: items[:-1], max_batch=2, max_wait_s=0.05)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "1 results for 2" in str(r) for r in results)


async def test_a_caller_cancelled_before_its_batch_runs_is_dropped() -> None:
    fake = Fake()
    batcher = Batcher(fake, max_batch=10, max_wait_s=0.1)
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], asyncio.CancelledError)
    assert fake.batches == [[0, 2]]
    assert batcher.stats()["cancelled"] == 1


async def test_a_caller_cancelled_while_its_batch_runs_leaves_the_others_alone() -> None:
    fake = Fake()
    fake.release = threading.Event()
    batcher = Batcher(fake, max_batch=3, max_wait_s=0.05)
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    while not fake.started.is_set():
        await asyncio.sleep(0.01)
    tasks[0].cancel()
    fake.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [10, 20]
    assert fake.batches == [[0, 1, 2]]
    # A later batch is unaffected.
    assert await batcher.submit(5) == 50


async def test_stats_count_batches_items_sizes_and_busy_time() -> None:
    fake = Fake(delay_s=0.05)
    batcher = Batcher(fake, max_batch=3, max_wait_s=0.05, name="embed")
    await asyncio.gather(*(batcher.submit(i) for i in range(7)))
    await batcher.submit(9)
    stats = batcher.stats()
    assert stats["batches"] == 4 and stats["items"] == 8
    assert stats["batch_sizes"] == {1: 2, 3: 2}
    assert stats["mean_batch"] == 2.0
    assert stats["busy_s"] >= 4 * 0.05
    assert stats["max_batch"] == 3 and stats["max_wait_ms"] == pytest.approx(50.0)
    assert stats["errors"] == 0 and stats["cancelled"] == 0


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Batcher(Fake(), max_batch=0)
    with pytest.raises(ValueError):
        Batcher(Fake(), max_wait_s=-1.0)


# --- BatchingRetriever over a small in-memory index ----------------------------------------------


class HashingEmbedder(IndexTestEmbedder):
    """test_index's bag of hashed words, on fewer dimensions: more tied scores to batch over."""

    name = "test:hashing-32"
    dim = 32


WORDS = "super bowl denver broncos carolina panthers stadium santa clara levi halftime".split()


@pytest.fixture(scope="module")
def retriever():
    rng = np.random.default_rng(0)
    chunks = [
        Chunk(f"c{i}", f"d{i // 3}", " ".join(rng.choice(WORDS, size=6)), n_tokens=6)
        for i in range(40)
    ]
    return build_retriever(load_card("squad"), chunks, HashingEmbedder())


QUESTIONS = [" ".join(WORDS[i : i + 3]) for i in range(len(WORDS) - 2)]


@pytest.mark.parametrize("sizes", [(1, 0.0, 1, 0.0), (4, 0.02, 4, 0.02), (8, 0.0, 3, 0.01)])
async def test_asearch_returns_what_search_does(retriever, sizes) -> None:
    eb, ew, sb, sw = sizes
    wrapped = BatchingRetriever(
        retriever, embed_batch=eb, embed_wait_s=ew, search_batch=sb, search_wait_s=sw
    )
    ks = [1 + i % 5 for i in range(len(QUESTIONS))]  # different k in one search batch
    got = await asyncio.gather(*(wrapped.asearch(q, k) for q, k in zip(QUESTIONS, ks, strict=True)))
    for q, k, chunks in zip(QUESTIONS, ks, got, strict=True):
        assert chunks == retriever.search(q, k)
    stats = wrapped.stats()
    assert stats["embed"]["items"] == stats["search"]["items"] == len(QUESTIONS)
    if eb > 1:
        assert max(stats["embed"]["batch_sizes"]) > 1
    else:
        assert stats["embed"]["batch_sizes"] == {1: len(QUESTIONS)}


async def test_a_bad_request_fails_alone(retriever) -> None:
    wrapped = BatchingRetriever(retriever, embed_batch=4, embed_wait_s=0.02, search_batch=4)
    results = await asyncio.gather(
        wrapped.asearch("denver broncos", 2),
        wrapped.asearch("   ", 2),
        wrapped.asearch("super bowl", 0),
        wrapped.asearch("levi stadium", 100),
        return_exceptions=True,
    )
    assert results[0] == retriever.search("denver broncos", 2)
    assert isinstance(results[1], InvalidRequest) and isinstance(results[2], InvalidRequest)
    assert len(results[3]) == len(retriever)


async def test_the_wrapper_passes_the_retriever_through(retriever) -> None:
    wrapped = BatchingRetriever(retriever)
    assert wrapped.card is retriever.card and wrapped.chunks is retriever.chunks
    assert len(wrapped) == len(retriever)
    assert wrapped.metadata == retriever.metadata
    assert wrapped.embedder_name == retriever.embedder_name and wrapped.path is None
    assert wrapped.search("super bowl", 3) == retriever.search("super bowl", 3)
    assert wrapped.search_batch(["a b", "super"], 2) == retriever.search_batch(["a b", "super"], 2)
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute  # noqa: B018
    assert "BatchingRetriever(" in repr(wrapped)


async def test_a_retriever_without_the_halves_is_searched_whole() -> None:
    class Plain:
        def search(self, question: str, k: int) -> list[Chunk]:
            return [Chunk("x", "d", question)] * k

    wrapped = BatchingRetriever(Plain(), embed_batch=4, embed_wait_s=0.01)
    assert await wrapped.asearch(" q ", 2) == [Chunk("x", "d", "q")] * 2


def test_embed_and_search_halves_make_search_batch(retriever) -> None:
    questions = ["super bowl", "denver"]
    vectors = retriever.embed_queries(questions)
    assert vectors.shape == (2, retriever.index.d)
    assert retriever.search_vectors(vectors, 3) == retriever.search_batch(questions, 3)
    assert retriever.embed_queries([]).shape == (0, retriever.index.d)
    assert retriever.search_vectors(vectors[:0], 3) == []
    with pytest.raises(InvalidRequest):
        retriever.embed_queries(["ok", " "])
    with pytest.raises(InvalidRequest):
        retriever.search_vectors(vectors, 0)


def test_retrieval_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss
    import torch

    monkeypatch.setattr(batching, "_threads", None)
    before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    apply_retrieval_threads(None)  # leaves the defaults
    assert torch.get_num_threads() == before
    try:
        apply_retrieval_threads(1)
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        seen: list[int] = []

        def worker() -> None:
            batching._thread_setup()  # what each retrieval batch does first
            seen.append(faiss.omp_get_max_threads())

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen == [1]  # FAISS's OpenMP setting is per thread
        with pytest.raises(InvalidRequest):
            apply_retrieval_threads(0)
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(faiss_before)
        batching._local.threads = None
