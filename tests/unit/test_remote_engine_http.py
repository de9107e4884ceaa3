"""RemoteEngine's request bodies and error mapping, through httpx's mock transport (no server:
the real-server tests are in tests/integration/test_remote_engine.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ragctl.engine import remote
from ragctl.engine.embedded_model import model_folder
from ragctl.engine.metrics import EngineStats
from ragctl.engine.remote import RemoteEngine, make_client, server_root
from ragctl.errors import (
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    PromptTooLong,
)
from ragctl.types import GenerationRequest, Message

DIGIT_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["n"],
    "additionalProperties": False,
}


def user(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)


# --- request bodies and error mapping, through a mock transport --------------------------------


class CountingTokenizer:
    """Stands in for the model's tokenizer: one token per word."""

    name = "words"

    def count(self, text: str) -> int:
        return len(text.split())

    def count_chat(self, messages: tuple[Message, ...]) -> int:
        return sum(self.count(m.content) for m in messages)

    def encode_request(self, req: GenerationRequest) -> list[str]:
        texts = [req.prompt] if req.prompt is not None else [m.content for m in req.messages]
        return [w for t in texts for w in t.split()]


def mock_engine(
    handler: Callable[[httpx.Request], httpx.Response],
    api_key: str | None = None,
    *,
    kv_metrics: bool = True,
) -> RemoteEngine:
    root = "http://engine.test"
    return RemoteEngine(
        make_client(root, api_key=api_key, timeout_s=5, transport=httpx.MockTransport(handler)),
        url=root,
        name="m",
        tokenizer=CountingTokenizer(),  # type: ignore[arg-type]
        max_model_len=100,
        timeout_s=5,
        kv_metrics=kv_metrics,
    )


def completion(text: str = "ok", logprobs: list[float] | None = None) -> dict:
    choice: dict = {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": lp} for lp in logprobs]}
    return {"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}


async def test_request_bodies() -> None:
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=completion(logprobs=[-0.5, -0.25]))

    msgs = user("a b c")
    reqs = [
        GenerationRequest(msgs, max_tokens=3),
        GenerationRequest(msgs, max_tokens=3, logprobs=True, priority=2, temperature=0.7),
        GenerationRequest(msgs, max_tokens=3, json_schema=DIGIT_SCHEMA),
        GenerationRequest(msgs, max_tokens=3, choices=("x", "y")),
        GenerationRequest(msgs, max_tokens=3, ignore_eos=True),
    ]
    async with mock_engine(handler) as eng:
        gens = await eng.generate(reqs)
    # The calls run concurrently: pick each body by its keys, not its arrival.
    plain = next(b for b in bodies if len(b) == 4)
    assert plain == {
        "model": "m",
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": 3,
        "temperature": 0.0,
    }
    rich = next(b for b in bodies if "logprobs" in b)
    assert (rich["logprobs"], rich["top_logprobs"], rich["priority"], rich["temperature"]) == (
        True,
        0,
        2,
        0.7,
    )
    schema = next(b for b in bodies if "response_format" in b)
    assert schema["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": DIGIT_SCHEMA},
    }
    choice = next(b for b in bodies if "structured_outputs" in b)
    assert choice["structured_outputs"] == {"choice": ["x", "y"]}
    fixed_length = next(b for b in bodies if "ignore_eos" in b)
    assert fixed_length["ignore_eos"] is True and len(fixed_length) == 5
    # Usage comes from the server; log-probs only when asked for.
    assert [(g.prompt_tokens, g.output_tokens) for g in gens] == [(7, 2)] * 5
    assert gens[1].token_logprobs == (-0.5, -0.25)
    assert gens[0].token_logprobs is None


async def test_bearer_token_is_sent() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=completion())

    async with mock_engine(handler, api_key="s3cret") as eng:
        await eng.generate([GenerationRequest(user("hi"), max_tokens=2)])
    async with mock_engine(handler) as eng:
        await eng.generate([GenerationRequest(user("hi"), max_tokens=2)])
    assert seen == ["Bearer s3cret", None]


def vllm_error(status: int, message: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"message": message, "type": "Error", "code": status}}
    )


@pytest.mark.parametrize(
    ("response", "error", "pattern"),
    [
        (httpx.Response(401, json={"error": "Unauthorized"}), EngineError, "authentication"),
        (httpx.Response(403, text="Forbidden"), EngineError, "authentication"),
        (
            vllm_error(400, "This model's maximum context length is 4096 tokens. However, ..."),
            PromptTooLong,
            "maximum context length",
        ),
        (vllm_error(400, "max_tokens must be at least 1, got -1."), InvalidRequest, "max_tokens"),
        (httpx.Response(422, json={"detail": [{"msg": "bad field"}]}), InvalidRequest, "bad field"),
        (vllm_error(404, "The model `m` does not exist."), ModelNotFound, "does not exist"),
        (vllm_error(500, "engine blew up"), EngineError, "500.*engine blew up"),
        (httpx.Response(503, text="restarting"), EngineUnavailable, "503.*restarting"),
        (httpx.Response(200, text="<html>proxy</html>"), EngineError, "non-JSON"),
    ],
)
async def test_http_errors_are_mapped(
    response: httpx.Response, error: type[Exception], pattern: str
) -> None:
    async with mock_engine(lambda request: response) as eng:
        with pytest.raises(error, match=pattern) as info:
            await eng.generate([GenerationRequest(user("hi"), max_tokens=2)])
    if error is EngineError:  # not a more specific (user-blaming) kind
        assert type(info.value) is EngineError


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (httpx.ReadTimeout("slow"), EngineTimeout),
        (httpx.ConnectError("refused"), EngineUnavailable),
        (httpx.ConnectTimeout("no route"), EngineUnavailable),
        (httpx.RemoteProtocolError("Server disconnected"), EngineUnavailable),
        (httpx.ReadError("reset by peer"), EngineUnavailable),
    ],
)
async def test_transport_errors_are_mapped(exc: Exception, error: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with mock_engine(handler) as eng:
        with pytest.raises(error, match="engine.test"):
            await eng.generate([GenerationRequest(user("hi"), max_tokens=2)])


async def test_metrics_404_is_not_vllm() -> None:
    async with mock_engine(lambda request: httpx.Response(404, text="Not Found")) as eng:
        with pytest.raises(EngineError, match="not a vLLM server"):
            await eng.kv_state()


async def test_stats_are_read_from_the_server_root() -> None:
    text = (Path(__file__).parent.parent / "unit" / "data" / "vllm_metrics.txt").read_text()
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, text=text)

    async with mock_engine(handler) as eng:
        eng.name = "ragctl-test"  # the scrape's model
        stats = await eng.stats()
        kv = await eng.kv_state()
    assert paths == ["/metrics", "/metrics"]
    assert isinstance(stats, EngineStats)
    assert kv.total_blocks == stats.num_gpu_blocks - 1


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("http://h:8000", "http://h:8000"),
        ("http://h:8000/", "http://h:8000"),
        ("http://h:8000/v1", "http://h:8000"),
        ("http://h:8000/v1/", "http://h:8000"),
        ("h:8000", "http://h:8000"),
        ("https://gw.example/vllm/v1", "https://gw.example/vllm"),
    ],
)
def test_server_root(given: str, root: str) -> None:
    assert server_root(given) == root


def test_tokenizer_fallback_to_the_embedded_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loaded: list[str] = []

    def load(name: str) -> object:
        if name != "embedded-folder":
            raise ModelNotFound(f"cannot load a tokenizer from {name!r}")
        loaded.append(name)
        return object()

    monkeypatch.setattr(remote.Tokenizer, "load", staticmethod(load))
    monkeypatch.setattr(remote, "resolve_model", lambda model, cache_dir: "embedded-folder")
    # The server serves the embedded model's folder, which this machine has not prepared.
    served_root = str(model_folder(tmp_path))
    remote._load_tokenizer(None, None, served_root, "served", tmp_path)
    assert loaded == ["embedded-folder"]
    # Any other unloadable model: ask for --tokenizer.
    with pytest.raises(ModelNotFound, match="--tokenizer"):
        remote._load_tokenizer(None, None, "/srv/models/other", "served", tmp_path)


async def test_raw_prompts_use_the_completions_endpoint() -> None:
    seen: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        choice = {
            "text": " done",
            "finish_reason": "length",
            "logprobs": {"token_logprobs": [-0.5, -1.5], "tokens": ["a", "b"]},
        }
        return httpx.Response(
            200, json={"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        )

    engine = mock_engine(handler)
    gen, constrained = await engine.generate(
        [
            GenerationRequest(prompt="one two three", max_tokens=2, logprobs=True),
            GenerationRequest(prompt="x", max_tokens=2, json_schema=DIGIT_SCHEMA),
        ]
    )
    (path, body), (_, body2) = seen
    assert path == "/v1/completions" and body["prompt"] == "one two three"
    assert body["logprobs"] == 0 and "messages" not in body
    assert body2["structured_outputs"] == {"json": DIGIT_SCHEMA}
    assert "response_format" not in body2
    assert gen.text == " done" and gen.token_logprobs == (-0.5, -1.5)
    assert (gen.prompt_tokens, gen.output_tokens) == (3, 2)


async def test_top_logprobs_chat_body_and_parsing() -> None:
    """vLLM's chat protocol: `logprobs: true, top_logprobs: k`; each position's
    `content[i].top_logprobs` is a list of {token, logprob}; tokens with one text are merged."""
    seen: list[dict] = []
    alternatives = [
        {"token": "Yes", "logprob": math.log(0.5)},
        {"token": "No", "logprob": math.log(0.2)},
        {"token": "Yes", "logprob": math.log(0.1)},  # another token id, same text
        {"token": " no", "logprob": math.log(0.05)},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        choice = {
            "message": {"role": "assistant", "content": "Yes"},
            "finish_reason": "length",
            "logprobs": {"content": [
                {"token": "Yes", "logprob": math.log(0.5), "top_logprobs": alternatives},
            ]},
        }  # fmt: skip
        return httpx.Response(
            200, json={"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
        )

    engine = mock_engine(handler)
    [gen] = await engine.generate([GenerationRequest(user("q"), max_tokens=1, top_logprobs=20)])
    assert (seen[0]["logprobs"], seen[0]["top_logprobs"]) == (True, 20)
    assert gen.token_logprobs is None  # not asked for: unchanged behaviour
    [pos] = gen.top_logprobs
    assert list(pos) == ["Yes", "No", " no"]  # most likely first
    assert pos["Yes"] == pytest.approx(math.log(0.6))
    assert pos["No"] == pytest.approx(math.log(0.2))
    assert pos[" no"] == pytest.approx(math.log(0.05))
    # Both kinds together: the sampled token's log-prob and the alternatives.
    [both] = await engine.generate(
        [GenerationRequest(user("q"), max_tokens=1, logprobs=True, top_logprobs=3)]
    )
    assert seen[1]["top_logprobs"] == 3
    assert both.token_logprobs == pytest.approx((math.log(0.5),)) and len(both.top_logprobs) == 1
    await engine.aclose()


async def test_top_logprobs_completions_body_and_parsing() -> None:
    """The completions protocol: `logprobs: k`; `logprobs.top_logprobs` is one {token: logprob}
    per position (null where the server has none)."""
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        choice = {
            "text": "3 4",
            "finish_reason": "length",
            "logprobs": {
                "tokens": ["3", " 4"],
                "token_logprobs": [-0.1, -0.7],
                "top_logprobs": [{"3": -0.1, "2": -2.5}, None],
            },
        }
        return httpx.Response(
            200, json={"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        )

    engine = mock_engine(handler)
    [gen] = await engine.generate([GenerationRequest(prompt="n?", max_tokens=2, top_logprobs=5)])
    assert seen[0]["logprobs"] == 5 and "top_logprobs" not in seen[0]
    assert gen.top_logprobs == ({"3": -0.1, "2": -2.5}, {})
    assert gen.token_logprobs is None
    [plain] = await engine.generate([GenerationRequest(prompt="n?", max_tokens=2)])
    assert "logprobs" not in seen[1] and plain.top_logprobs is None
    await engine.aclose()


async def test_stream_reads_top_logprobs() -> None:
    def chunk(text: str, alts: dict[str, float]) -> dict:
        top = [{"token": t, "logprob": lp} for t, lp in alts.items()]
        content = [{"token": text, "logprob": -0.1, "top_logprobs": top}]
        return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None,
                             "logprobs": {"content": content}}]}  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        body = sse(chunk("A", {"A": -0.1, "B": -2.0}), chunk("B", {"B": -0.3}),
                   {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
                   b"[DONE]")  # fmt: skip
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    engine = mock_engine(handler)
    events = [
        e async for e in engine.stream(GenerationRequest(user("q"), max_tokens=2, top_logprobs=2))
    ]
    gen = events[-1]
    assert gen.text == "AB" and gen.top_logprobs == ({"A": -0.1, "B": -2.0}, {"B": -0.3})
    await engine.aclose()


def test_top_logprobs_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="top_logprobs"):
        GenerationRequest(user("q"), top_logprobs=-1)


def test_a_request_has_messages_or_a_prompt() -> None:
    with pytest.raises(ValueError):
        GenerationRequest(max_tokens=2)
    with pytest.raises(ValueError):
        GenerationRequest(user("a"), max_tokens=2, prompt="b")
    with pytest.raises(ValueError):
        GenerationRequest(user("a"), max_tokens=0)


async def test_without_kv_metrics_memory_is_unknown() -> None:
    """A server that is not vLLM (no /metrics): kv_metrics=False reads the KV state as unknown
    instead of failing, and never asks for /metrics."""
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(404, text="Not Found")

    async with mock_engine(handler, kv_metrics=False) as eng:
        assert not eng.has_kv_metrics
        kv = await eng.kv_state()
    assert kv == remote.UNKNOWN_KV and kv.source == "unknown"
    assert kv.free_blocks == kv.total_blocks and kv.usage == 0.0
    assert paths == []


@pytest.mark.parametrize(("metrics_status", "has_kv"), [(404, False), (503, None)])
async def test_connect_finds_out_whether_the_server_has_kv_metrics(
    monkeypatch: pytest.MonkeyPatch, metrics_status: int, has_kv: bool | None
) -> None:
    """`kv_metrics=None`: one /metrics read at connect; a server without it (404) runs with KV
    memory unknown, one that is unavailable (503) fails the connection."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 100}]})
        return httpx.Response(metrics_status, text="no")

    def client(root: str, **kwargs: object) -> httpx.AsyncClient:
        return make_client(root, api_key=None, timeout_s=5, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(remote, "make_client", client)
    monkeypatch.setattr(remote.Tokenizer, "load", staticmethod(lambda name: CountingTokenizer()))
    if has_kv is None:
        with pytest.raises(EngineUnavailable):
            await RemoteEngine.connect("http://engine.test", tokenizer="t", kv_metrics=None)
        return
    async with await RemoteEngine.connect(
        "http://engine.test", tokenizer="t", kv_metrics=None
    ) as eng:
        assert eng.has_kv_metrics is has_kv
        assert await eng.kv_state() == remote.UNKNOWN_KV


# --- streaming: the server's SSE ----------------------------------------------------------------


def sse(*events: object) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )


def chat_chunk(text: str | None, finish: str | None = None, lp: float | None = None) -> dict:
    choice: dict = {"index": 0, "delta": {} if text is None else {"content": text},
                    "finish_reason": finish}  # fmt: skip
    if lp is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": lp}]}
    return {"choices": [choice]}


async def test_stream_yields_the_sse_deltas_then_the_generation() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = sse(chat_chunk(""), chat_chunk("Den", lp=-0.1), chat_chunk("ver", lp=-0.2),
                   chat_chunk(None, "length"),
                   {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
                   b"[DONE]")  # fmt: skip
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    engine = mock_engine(handler)
    req = GenerationRequest(user("who won"), max_tokens=2, logprobs=True, top_p=0.5,
                            stop=("\n",), seed=1)  # fmt: skip
    events = [e async for e in engine.stream(req)]
    assert events[:2] == ["Den", "ver"]
    gen = events[2]
    assert gen.text == "Denver" and gen.finish_reason == "length"
    assert (gen.prompt_tokens, gen.output_tokens) == (7, 2) and gen.token_logprobs == (-0.1, -0.2)
    body = seen[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["top_p"], body["stop"], body["seed"]) == (0.5, ["\n"], 1)
    await engine.aclose()


async def test_stream_errors_map_to_ragctl_errors() -> None:
    def mid_stream(request: httpx.Request) -> httpx.Response:
        body = sse(chat_chunk("Den"), {"error": {"message": "engine core died", "code": 500}})
        return httpx.Response(200, content=body)

    engine = mock_engine(mid_stream)
    got: list[object] = []
    with pytest.raises(EngineError, match="engine core died"):
        async for e in engine.stream(GenerationRequest(user("q"), max_tokens=2)):
            got.append(e)
    assert got == ["Den"]
    too_long = mock_engine(lambda r: httpx.Response(
        400, json={"error": {"message": "maximum context length is 100 tokens"}}))  # fmt: skip
    with pytest.raises(PromptTooLong):
        [e async for e in too_long.stream(GenerationRequest(user("q"), max_tokens=2))]

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(EngineUnavailable):
        [e async for e in mock_engine(down).stream(GenerationRequest(user("q"), max_tokens=2))]
    for e in (engine, too_long):
        await e.aclose()
