"""Batched retrieval on the real retriever (all-MiniLM-L6-v2 over FAISS, a small real SQuAD
collection): concurrent `asearch` calls share embedding and search batches and get what `search`
gives each of them alone: the same chunks, and the same scores exactly when only the search is
batched; a batched embedding (padded, other matrix shapes) moves scores by float rounding only.
`controller_for` wires the wrapper from Settings."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ragctl.engine.tokenizer import Tokenizer
from ragctl.retrieval.batching import BatchingRetriever
from ragctl.retrieval.index import Retriever, open_retriever
from ragctl.settings import Settings
from ragctl.types import Query


@pytest.fixture(scope="module")
def retriever(small_squad: tuple[Settings, list[Query]], tokenizer: Tokenizer) -> Retriever:
    settings, _ = small_squad
    return open_retriever(settings, "squad", tokenizer)


def questions(small_squad: tuple[Settings, list[Query]], retriever: Retriever) -> list[str]:
    """16 real questions: the collection's own, then chunk openings as questions."""
    own = [q.question for q in small_squad[1]]
    return (own + [" ".join(c.text.split()[:12]) for c in retriever.chunks[::7]])[:16]


@pytest.mark.parametrize("embed_batch", [8, 1])
async def test_concurrent_asearch_batches_and_matches_search(
    small_squad, retriever, embed_batch: int
) -> None:
    qs = questions(small_squad, retriever)
    assert len(qs) == 16
    ks = [5 if i % 2 else 3 for i in range(16)]  # two k in one search batch
    # Embedded one by one (under the retriever's lock), questions reach the search spread out
    # by an embedding each: a longer search wait lets batches form even on a busy machine.
    search_wait_s = 0.02 if embed_batch > 1 else 0.5
    wrapped = BatchingRetriever(
        retriever,
        embed_batch=embed_batch,
        embed_wait_s=0.02,
        search_batch=8,
        search_wait_s=search_wait_s,
    )
    got = await asyncio.gather(*(wrapped.asearch(q, k) for q, k in zip(qs, ks, strict=True)))
    for q, k, chunks in zip(qs, ks, got, strict=True):
        alone = retriever.search(q, k)
        assert len(chunks) == k
        assert [c.id for c in chunks] == [c.id for c in alone]
        if embed_batch == 1:
            assert chunks == alone  # scores too, bit for bit
        else:
            assert [c.score for c in chunks] == pytest.approx([c.score for c in alone], abs=1e-5)

    stats = wrapped.stats()
    for stage in ("embed", "search") if embed_batch > 1 else ("search",):
        s = stats[stage]
        assert s["items"] == 16 and s["errors"] == 0
        assert s["batches"] < 16 and 1 < max(s["batch_sizes"]) <= 8
        assert s["busy_s"] > 0


async def test_pass_through_matches_search(small_squad, retriever) -> None:
    qs = questions(small_squad, retriever)[:4]
    wrapped = BatchingRetriever(retriever)
    got = await asyncio.gather(*(wrapped.asearch(q, 4) for q in qs))
    assert got == [retriever.search(q, 4) for q in qs]
    assert wrapped.stats()["embed"]["batch_sizes"] == {1: 4}


def test_controller_for_wraps_the_retriever_from_settings(small_squad, tokenizer) -> None:
    from ragctl.profiler import Profiler
    from ragctl.rules import load_rules
    from ragctl.service import controller_for

    settings = small_squad[0].with_overrides(
        embed_batch_size=4, embed_batch_wait_ms=5.0, search_batch_size=2, search_batch_wait_ms=1.0
    )

    async def kv_state():  # never called: nothing is asked
        raise AssertionError

    engine = SimpleNamespace(tokenizer=tokenizer, max_model_len=4096, kv_state=kv_state)
    controller = controller_for(
        settings, "squad", engine, rules=load_rules(None), profiler=Profiler(engine),
        owns_engine=False,
    )  # fmt: skip
    wrapped = controller.retriever
    assert isinstance(wrapped, BatchingRetriever)
    assert wrapped.embed_batcher.max_batch == 4 and wrapped.embed_batcher.max_wait_s == 0.005
    assert wrapped.search_batcher.max_batch == 2 and wrapped.search_batcher.max_wait_s == 0.001
    # What the controller and reports read from a retriever still works through the wrapper.
    assert controller.collection.name == "squad" and wrapped.card.name == "squad"
    assert len(wrapped) == len(wrapped.chunks) > 0 and wrapped.path is not None
    assert wrapped.search("Super Bowl 50", 2) == wrapped.inner.search("Super Bowl 50", 2)
