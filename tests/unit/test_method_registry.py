"""Adding a synthesis method is one module and a `register` call: a one-stage method defined
here ("first_chunk": answers from the first chunk only) is validated, enumerated, sized,
planned and finished, falls back, and is known to the SLO, allocation and server tables."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import pytest

from ragctl.allocation.profile import sample_mix
from ragctl.scheduler import NeedTable, config_need, fallback_configs
from ragctl.scheduler.slo import StageStats
from ragctl.server.schemas import ChatCompletionRequest, served_models
from ragctl.synthesis import registry
from ragctl.synthesis.methods import CallSizer, Synthesizer
from ragctl.synthesis.prompts import format_passage
from ragctl.synthesis.registry import MethodSpec, StageSize, Step
from ragctl.types import (
    METHODS,
    Chunk,
    Config,
    ConfigSpace,
    Generation,
    StageRecord,
    SynthesisResult,
)

# -- the method: what a new module would hold -------------------------------------------------


def plan(synth: Synthesizer, config: Config, question: str, chunks: tuple[Chunk, ...]) -> Step:
    first = chunks[0]
    call = synth.answer_call("stuff", context=format_passage(1, first), question=question)

    def finish(gens: Sequence[Generation]) -> SynthesisResult:
        return SynthesisResult(gens[0].text.strip(), gens[0].confidence, used_chunk_ids=(first.id,))

    return Step("first", (call,), finish)


def size(sizer: CallSizer, config: Config) -> tuple[StageSize, ...]:
    prompt = min(sizer.overhead["stuff"] + sizer.passage(0), sizer.budget)
    return (StageSize("first", lambda n: (prompt, sizer.answer_max_tokens)),)


SPEC = MethodSpec(
    "first_chunk", ("first",), ("stuff",), plan, size, fallback="independent", default_chunks=1
)


@pytest.fixture
def first_chunk() -> Iterator[MethodSpec]:
    registry.register(SPEC)
    yield SPEC
    registry.unregister(SPEC.name)


# -- the rest of ragctl knows it ------------------------------------------------------------


def test_config_and_space_accept_it(first_chunk: MethodSpec) -> None:
    assert METHODS[-1] == "first_chunk"  # registered last: the richest in best-fit's tie-break
    assert Config.parse("first_chunk:3") == Config("first_chunk", 3)
    with pytest.raises(ValueError, match="applies to map_reduce only"):
        Config("first_chunk", 3, 50)
    space = ConfigSpace(("stuff", "first_chunk"), (1, 2))
    assert space.configs() == (
        Config("stuff", 1), Config("stuff", 2), Config("first_chunk", 1), Config("first_chunk", 2)
    )  # fmt: skip
    # Its fallback role: answers from a chunk on its own, so it is a cheap fallback.
    assert fallback_configs(ConfigSpace(("stuff",), (3, 4)), joint_reasoning=False) == (
        *(Config("map_rerank", k) for k in range(1, 5)),
        *(Config("first_chunk", k) for k in range(1, 5)),
    )


def test_need_table_sizes_it(first_chunk: MethodSpec) -> None:
    overhead = dict.fromkeys(("map_rerank", "stuff", "map", "reduce"), 50)
    sizer = CallSizer(
        passages=(100, 300), overhead=overhead, answer_max_tokens=20, max_model_len=4096
    )
    config = Config("first_chunk", 2)
    assert [(c.stage, c.prompt_tokens, c.max_tokens) for c in sizer.estimate(config)] == [
        ("first", 50 + 100 + 4, 20)
    ]
    need = NeedTable(sizer, 16, 1)(config)
    assert need == config_need(sizer.estimate(config), 16, 1) == 11 + 1  # 174 tokens


def test_synthesizer_plans_and_finishes_it(first_chunk: MethodSpec, tokenizer) -> None:
    synth = Synthesizer(tokenizer, max_model_len=4096, answer_max_tokens=32)
    chunks = [Chunk(f"d{i}::0", f"d{i}", f"Passage {i} text.", title=f"T{i}") for i in range(3)]
    step = synth.plan(Config("first_chunk", 3), "q?", chunks)
    assert step.name == "first" and len(step.requests) == 1
    prompt = step.requests[0].messages[-1].content
    assert "Passage 0 text." in prompt and "Passage 1" not in prompt
    result = step.finish([Generation(" zero ", 10, 1, "stop", (-0.1,))])
    assert isinstance(result, SynthesisResult)
    assert result.answer == "zero" and result.used_chunk_ids == ("d0::0",)
    [est] = synth.estimate_calls(Config("first_chunk", 3), "q?", chunks)
    assert est.prompt_tokens == synth.prompt_tokens(step.requests[0].messages)


def test_slo_allocation_and_server_know_its_stages(first_chunk: MethodSpec) -> None:
    stats = StageStats()
    stats.observe("first", "first_chunk:2", 0.5)
    assert stats.predict_synthesis(Config("first_chunk", 2)) == 0.5
    assert registry.stage_components()["first"] == "first"

    async def aask(question: str) -> SimpleNamespace:
        return SimpleNamespace(
            decision=SimpleNamespace(config=Config("first_chunk", 1)),
            stages=[StageRecord("first", 1, 10, 2, 0.1)],
        )

    mix = asyncio.run(sample_mix(SimpleNamespace(aask=aask), ["a", "b"]))
    assert mix.visits["first"] == 1.0 and mix.configs == {"first_chunk:1": 2}

    assert "ragctl/first_chunk" in served_models()
    body = {"model": "ragctl/first_chunk", "messages": [{"role": "user", "content": "q?"}]}
    assert ChatCompletionRequest.model_validate(body).config(body["model"]) == Config(
        "first_chunk", 1
    )


def test_unregistered_it_is_gone(first_chunk: MethodSpec) -> None:
    registry.unregister(SPEC.name)
    try:
        with pytest.raises(ValueError, match="unknown synthesis method"):
            Config("first_chunk", 1)
        assert "ragctl/first_chunk" not in served_models()
    finally:
        registry.register(SPEC)  # for the fixture's own unregister
