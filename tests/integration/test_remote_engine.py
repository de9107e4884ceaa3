"""RemoteEngine against the real vLLM server (request bodies and error mapping without a server:
tests/unit/test_remote_engine_http.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest
import pytest_asyncio

from ragctl.engine import open_engine
from ragctl.engine.remote import RemoteEngine, make_client
from ragctl.errors import (
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    PromptTooLong,
)
from ragctl.settings import Settings
from ragctl.types import GenerationRequest, Message

from .conftest import free_port

integration = pytest.mark.integration

DIGIT_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["n"],
    "additionalProperties": False,
}


class VLLMServer(Protocol):
    """What the `vllm_server` fixture yields."""

    url: str
    model: str


def user(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(vllm_server: VLLMServer) -> AsyncIterator[RemoteEngine]:
    eng = await RemoteEngine.connect(vllm_server.url, timeout_s=300)
    yield eng
    await eng.aclose()


# --- against the real server -------------------------------------------------------------------


@integration
async def test_connect_reads_the_model_card(engine: RemoteEngine, vllm_server: VLLMServer) -> None:
    card = httpx.get(f"{vllm_server.url}/v1/models", timeout=30).json()["data"][0]
    assert engine.name == vllm_server.model == card["id"]
    assert engine.max_model_len == card["max_model_len"]
    # No --tokenizer and the served name is no folder: the tokenizer came from the card's root.
    assert engine.tokenizer.name == card["root"]


@integration
@pytest.mark.parametrize("suffix", ["/", "/v1", "/v1/"])
async def test_base_url_with_or_without_v1(vllm_server: VLLMServer, suffix: str) -> None:
    async with await RemoteEngine.connect(vllm_server.url + suffix) as eng:
        assert eng.url == vllm_server.url
        assert eng.name == vllm_server.model


@integration
async def test_open_engine_connects_when_a_url_is_set(vllm_server: VLLMServer) -> None:
    async with await open_engine(Settings(engine_url=vllm_server.url)) as eng:
        assert isinstance(eng, RemoteEngine)
        assert eng.name == vllm_server.model


@integration
async def test_generate_plain(engine: RemoteEngine) -> None:
    msgs = (Message("system", "You are terse."), Message("user", "Name a colour."))
    [g] = await engine.generate([GenerationRequest(msgs, max_tokens=8)])
    assert g.text.strip()
    assert 1 <= g.output_tokens <= 8
    assert g.finish_reason in ("stop", "length")
    assert g.token_logprobs is None
    assert g.seconds > 0


@integration
async def test_ignore_eos_generates_exactly_max_tokens(engine: RemoteEngine) -> None:
    [g] = await engine.generate(
        [GenerationRequest(user("Say hi."), max_tokens=40, ignore_eos=True)]
    )
    assert (g.output_tokens, g.finish_reason) == (40, "length")


@integration
async def test_generate_with_logprobs(engine: RemoteEngine) -> None:
    [g] = await engine.generate(
        [GenerationRequest(user("Say something about rivers."), max_tokens=8, logprobs=True)]
    )
    assert g.token_logprobs is not None
    assert len(g.token_logprobs) == g.output_tokens
    assert all(lp <= 0.0 for lp in g.token_logprobs)
    assert g.confidence is not None and 0.0 < g.confidence <= 1.0


@integration
async def test_generate_with_json_schema(engine: RemoteEngine) -> None:
    req = GenerationRequest(
        user('Reply in JSON like {"n": 3}: how many legs does a cat have?'),
        max_tokens=16,
        json_schema=DIGIT_SCHEMA,
    )
    [g] = await engine.generate([req])
    assert g.finish_reason == "stop", g.text
    value = json.loads(g.text)
    assert set(value) == {"n"}
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 9


@integration
async def test_generate_with_choices(engine: RemoteEngine) -> None:
    # Strings the model would never write unconstrained: an ignored constraint cannot pass.
    choices = ("zebra-7", "quux-3")
    [g] = await engine.generate(
        [GenerationRequest(user("Tell me a story."), max_tokens=8, choices=choices)]
    )
    assert g.text in choices


@integration
async def test_generate_with_priority(engine: RemoteEngine) -> None:
    # The server runs --scheduling-policy priority; a server without it answers 400.
    gens = await engine.generate(
        [
            GenerationRequest(user("Count to three."), max_tokens=4, priority=5),
            GenerationRequest(user("Count to four."), max_tokens=4, priority=-1),
        ]
    )
    assert all(g.output_tokens >= 1 for g in gens)


@integration
async def test_prompt_tokens_predicted_by_the_local_tokenizer(engine: RemoteEngine) -> None:
    conversations = [
        user("Hi"),
        (Message("system", "Answer from the context."), Message("user", "Context: x\n\nQ: y?")),
        (
            Message("user", "What is 2+2?"),
            Message("assistant", "4"),
            Message("user", "And 3+3? Ünïcödé, 日本語, emoji 🎉."),
        ),
    ]
    gens = await engine.generate([GenerationRequest(m, max_tokens=1) for m in conversations])
    for msgs, g in zip(conversations, gens, strict=True):
        assert g.prompt_tokens == engine.tokenizer.count_chat(msgs)


@integration
async def test_raw_prompt_goes_to_the_completions_endpoint(engine: RemoteEngine) -> None:
    plain = GenerationRequest(prompt="The capital of France is", max_tokens=6, logprobs=True)
    as_json = GenerationRequest(prompt="A digit as JSON:", max_tokens=12, json_schema=DIGIT_SCHEMA)
    gen, constrained = await engine.generate([plain, as_json])
    assert gen.prompt_tokens == len(engine.tokenizer.encode_request(plain))
    assert gen.token_logprobs is not None and len(gen.token_logprobs) == gen.output_tokens > 0
    assert 0 <= json.loads(constrained.text)["n"] <= 9


@integration
async def test_batch_results_in_request_order(engine: RemoteEngine) -> None:
    reqs = [
        GenerationRequest(
            user(f"Question {i}: yes or no?"),
            max_tokens=8,
            choices=(f"r{i}-yes", f"r{i}-no"),
            tag=f"order-{i}",
        )
        for i in range(4)
    ]
    gens = await engine.generate(reqs)
    assert len(gens) == 4
    for i, g in enumerate(gens):
        assert g.text in (f"r{i}-yes", f"r{i}-no")


@integration
async def test_kv_state(engine: RemoteEngine) -> None:
    kv = await engine.kv_state()
    assert kv.total_blocks > 0
    assert 0 <= kv.free_blocks <= kv.total_blocks
    assert kv.block_size > 0
    assert kv.source == "metrics"
    stats = await engine.stats()
    assert kv.total_blocks == stats.num_gpu_blocks - stats.num_engines


@integration
async def test_kv_state_follows_running_calls(engine: RemoteEngine) -> None:
    # Two distinct ~600-token prompts hold their blocks while they decode; the gauge must show
    # at least one whole prompt's blocks in use, then drop back once they finish.
    prompts = [
        user(f"Document {i}: " + " ".join(f"fact {i}-{j} about rivers." for j in range(100)))
        for i in range(2)
    ]
    need = max(engine.tokenizer.count_chat(p) for p in prompts)
    calls = asyncio.ensure_future(
        engine.generate([GenerationRequest(p, max_tokens=48, ignore_eos=True) for p in prompts])
    )
    peak = 0
    while not calls.done():
        kv = await engine.kv_state()
        peak = max(peak, kv.used_blocks)
        await asyncio.sleep(0.05)
    await calls
    assert peak >= need // kv.block_size >= 1
    # Finished calls' blocks stay cached but count as free (evictable).
    for _ in range(50):
        kv = await engine.kv_state()
        if kv.free_blocks == kv.total_blocks:
            break
        await asyncio.sleep(0.1)
    assert kv.free_blocks == kv.total_blocks


@integration
async def test_prompt_too_long_is_refused_before_sending(engine: RemoteEngine) -> None:
    long = user("word " * engine.max_model_len)
    with pytest.raises(PromptTooLong, match="exceeds"):
        await engine.generate([GenerationRequest(long, max_tokens=4)])


@integration
async def test_prompt_too_long_from_the_server(vllm_server: VLLMServer) -> None:
    # Pretend the context is larger than it is, so the server's own refusal is mapped.
    async with await RemoteEngine.connect(vllm_server.url) as eng:
        real_len = eng.max_model_len
        eng.max_model_len = 10 * real_len
        with pytest.raises(PromptTooLong, match="context length"):
            await eng.generate([GenerationRequest(user("word " * real_len), max_tokens=4)])


@integration
async def test_invalid_request_from_the_server(engine: RemoteEngine) -> None:
    bad = GenerationRequest(user("Hi"), max_tokens=4, temperature=-1.0)
    good = GenerationRequest(user("Hi"), max_tokens=4)
    with pytest.raises(InvalidRequest, match="temperature"):
        await engine.generate([good, bad])


@integration
async def test_timeout(engine: RemoteEngine, vllm_server: VLLMServer) -> None:
    # A ~1,000-token prompt plus 16 tokens takes seconds on the CPU; 0.2 s cannot be enough.
    quick = RemoteEngine(
        make_client(vllm_server.url, api_key=None, timeout_s=0.2),
        url=vllm_server.url,
        name=engine.name,
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        timeout_s=0.2,
    )
    async with quick:
        prompt = user("timeout check " + "a river runs through the valley " * 150)
        with pytest.raises(EngineTimeout):
            await quick.generate([GenerationRequest(prompt, max_tokens=16)])


@integration
async def test_unknown_model_lists_the_served_ones(vllm_server: VLLMServer) -> None:
    with pytest.raises(ModelNotFound, match=vllm_server.model):
        await RemoteEngine.connect(vllm_server.url, model="no-such-model")


@integration
async def test_unloadable_tokenizer(vllm_server: VLLMServer, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="tokenizer"):
        await RemoteEngine.connect(vllm_server.url, tokenizer=str(tmp_path / "missing"))


async def test_nothing_listening_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineUnavailable, match=url):
        await RemoteEngine.connect(url, timeout_s=10)
