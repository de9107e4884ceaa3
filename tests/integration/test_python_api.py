"""The Python API as a user writes it: `ragctl.open(collection)` in blocking code,
`aask`/`abatch` from any event loop, and a controller built explicitly from parts."""

from __future__ import annotations

import asyncio

import pytest

import ragctl
from ragctl.errors import InvalidRequest, UnknownDataset
from ragctl.retrieval.index import open_retriever
from ragctl.settings import Settings
from ragctl.types import Config, Message, Query

pytestmark = pytest.mark.integration


def test_one_line_controller_blocking_and_async(
    small_squad: tuple[Settings, list[Query]], model_path: str
) -> None:
    settings, queries = small_squad
    qs = [q.question for q in queries]
    with ragctl.open(
        "squad", settings, model=model_path, kv_cache_gib=1, golden_every=0, answer_max_tokens=32
    ) as ctl:
        answer = ctl.ask(qs[0])
        assert isinstance(answer, ragctl.Answer)
        assert answer.decision.reason == "fit"  # one question on an idle 1 GiB cache
        assert answer.decision.profile is not None and answer.chunks
        fixed = ctl.batch(qs[:2], Config("stuff", 1))
        assert [a.question for a in fixed] == qs[:2]
        assert all(a.decision.config == Config("stuff", 1) for a in fixed)
        alone = ctl.ask("And who did they play?", Config("stuff", 1))
        follow_up = ctl.ask(
            "And who did they play?", Config("stuff", 1),
            history=[Message("user", qs[0]), Message("assistant", "Denver Broncos")],
        )  # fmt: skip
        # Retrieval saw the question alone (same chunk); the prompt carried the earlier turns.
        assert follow_up.question == alone.question == "And who did they play?"
        assert follow_up.chunk_ids == alone.chunk_ids
        assert follow_up.tokens["prompt"] > alone.tokens["prompt"] + 10

        # Async callers on their own event loop: the engine stays on the controller's.
        async def from_another_loop() -> list[ragctl.Answer]:
            one = await ctl.aask(qs[2], Config("map_rerank", 2))
            many = await ctl.abatch(qs[3:5], Config("stuff", 1))
            return [one, *many]

        got = asyncio.run(from_another_loop())
        assert [a.question for a in got] == qs[2:5]
        assert ctl.ask(qs[0], Config("stuff", 1)).text == fixed[0].text  # greedy: same answer
    with pytest.raises(UnknownDataset):
        ragctl.open("nope", settings, model=model_path)


async def test_explicit_controller_from_parts(local_engine, small_squad) -> None:
    settings, queries = small_squad
    settings = settings.with_overrides(golden_every=0, answer_max_tokens=24)
    retriever = open_retriever(settings, "squad", local_engine.tokenizer)
    ctl = ragctl.Controller(local_engine, retriever, settings=settings, owns_engine=False)
    assert ctl.synthesizer.answer_max_tokens == 24 and ctl.policy.golden_every == 0
    answer = await ctl.aask(queries[0].question, Config("stuff", 2))
    assert answer.text and len(answer.chunks) <= 2
    # Blocking calls inside a running loop would deadlock it: a clear error instead.
    with pytest.raises(InvalidRequest, match="aask"):
        ctl.ask(queries[0].question)
    await ctl.aclose()
    assert (await local_engine.kv_state()).total_blocks > 0  # not owned: still running
