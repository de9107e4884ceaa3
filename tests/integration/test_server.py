"""`ragctl serve` as a user runs it (a subprocess on loopback, the real in-process engine), driven
by real clients: the official `openai` client (sync, async, streaming), LangChain's `ChatOpenAI`,
raw HTTP for the error statuses, schemathesis over the OpenAPI schema, and a 50-request load.

The server runs with a small KV cache (24 blocks), a queue of 0 (a request that cannot fit now
is refused with 503 at once) and at most 16 requests in flight (more: 429), so admission control
is reachable with a handful of requests."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from ragctl.loadtest import chat_load
from ragctl.settings import Settings
from ragctl.types import Query

from .conftest import RagctlServer, running_ragctl_server

pytestmark = pytest.mark.integration

KEY = "sk-test-key"
MAX_INFLIGHT = 16


@pytest.fixture(scope="module")
def server(
    small_squad: tuple[Settings, list[Query]], model_path: str, tmp_path_factory
) -> Iterator[RagctlServer]:
    settings, _ = small_squad
    global_args = [
        "--model", model_path, "--data-dir", str(settings.data_dir),
        "--cache-dir", str(settings.cache_dir), "--kv-cache-blocks", "24",
        "--max-model-len", "2048", "--golden-every", "0", "--answer-max-tokens", "32",
    ]  # fmt: skip
    serve_args = ["--dataset", "squad", "--api-key", KEY, "--max-inflight", str(MAX_INFLIGHT)]
    log = tmp_path_factory.mktemp("ragctl-serve") / "serve.log"
    with running_ragctl_server(global_args, serve_args, log, env={"RAGCTL_QUEUE_SIZE": "0"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: RagctlServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def questions(small_squad: tuple[Settings, list[Query]]) -> list[str]:
    return [q.question for q in small_squad[1]]


def metric(server: RagctlServer, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def post(server: RagctlServer, path: str, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=300, **kw)


def chat_body(question: str, **extra) -> dict:
    return {"model": "ragctl/auto", "messages": [{"role": "user", "content": question}], **extra}


# -- the openai client ----------------------------------------------------------------------------


def test_chat_adaptive_answer_with_decision(client, questions) -> None:
    resp = client.chat.completions.create(
        model="ragctl/auto", messages=[{"role": "user", "content": questions[0]}]
    )
    assert resp.object == "chat.completion" and resp.model == "ragctl/auto"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content.strip()
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    extra = resp.model_extra["ragctl"]
    d = extra["decision"]
    assert d["reason"] == "fit" and d["profile"] is not None  # one request, idle engine
    assert d["kv"]["total_blocks"] > 0 and d["need_blocks"] <= d["kv"]["total_blocks"]
    assert extra["config"] == f"{d['method']}:{d['num_chunks']}" + (
        f":{d['intermediate_length']}" if d["method"] == "map_reduce" else ""
    )
    assert len(extra["chunk_ids"]) >= 1 and extra["timings"]["total"] > 0


def test_fixed_model_and_ragctl_options_in_extra_body(client, questions) -> None:
    resp = client.chat.completions.create(
        model="ragctl/stuff",
        messages=[{"role": "user", "content": questions[1]}],
        temperature=0,
        extra_body={"collection": "squad", "num_chunks": 2, "slo_ms": 5000, "unknown_field": 1},
    )
    extra = resp.model_extra["ragctl"]
    assert extra["config"] == "stuff:2" and extra["decision"]["reason"] == "fixed"
    assert len(extra["chunk_ids"]) <= 2 and extra["slo_ms"] == 5000
    slo = extra["decision"]["slo"]  # the SLO loop's record (met or not on this busy machine)
    assert slo["slo_ms"] == 5000 and slo["mitigation"] == "adaptive"
    assert slo["met"] == (slo["delay_ms"] <= 5000)
    # The method can also be fixed on the adaptive model; max_chunks caps the adaptive path.
    resp = client.chat.completions.create(
        model="ragctl/auto",
        messages=[{"role": "user", "content": questions[1]}],
        extra_body={"method": "map_reduce", "num_chunks": 2, "intermediate_length": 20},
    )
    assert resp.model_extra["ragctl"]["config"] == "map_reduce:2:20"
    resp = client.chat.completions.create(
        model="ragctl/auto",
        messages=[{"role": "user", "content": questions[2]}],
        extra_body={"max_chunks": 2},
    )
    assert resp.model_extra["ragctl"]["decision"]["num_chunks"] <= 2


def test_chat_history_is_carried(client, questions) -> None:
    follow_up = "And which team did they play?"
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": questions[0]},
        {"role": "assistant", "content": "Denver Broncos."},
    ]

    def ask(messages: list[dict]) -> dict:
        resp = client.chat.completions.create(
            model="ragctl/stuff", messages=messages, extra_body={"num_chunks": 2}
        )
        assert resp.choices[0].message.content is not None
        return resp.model_extra["ragctl"]

    alone = ask([{"role": "user", "content": follow_up}])
    carried = ask([*turns, {"role": "user", "content": follow_up}])
    # Retrieval saw the last question alone (same chunks); the synthesis prompt also carried
    # the turns before it (more prompt tokens).
    assert carried["question"] == alone["question"] == follow_up
    assert carried["chunk_ids"] == alone["chunk_ids"]
    assert carried["tokens"]["prompt"] > alone["tokens"]["prompt"] + 10


def test_streaming_chat(client, questions) -> None:
    stream = client.chat.completions.create(
        model="ragctl/stuff",
        messages=[{"role": "user", "content": questions[2]}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"num_chunks": 2},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert finals[0].model_extra["ragctl"]["config"] == "stuff:2"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert text.strip()
    # Same configuration without streaming: the same answer (greedy decoding).
    plain = client.chat.completions.create(
        model="ragctl/stuff",
        messages=[{"role": "user", "content": questions[2]}],
        extra_body={"num_chunks": 2},
    )
    assert plain.choices[0].message.content == text


def test_sse_wire_format_ends_with_done(server, questions) -> None:
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
        json=chat_body(questions[0], model="ragctl/stuff", num_chunks=1, stream=True),
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in lines[:-1])


async def test_async_client_concurrent_and_completions(server, questions) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300
    )
    try:
        # Fixed configurations never wait for memory, so three at once all get answered.
        resps = await asyncio.gather(*(
            client.chat.completions.create(
                model="ragctl/map_rerank", messages=[{"role": "user", "content": q}],
                extra_body={"num_chunks": 2},
            )
            for q in questions[:3]
        ))  # fmt: skip
        assert [r.model_extra["ragctl"]["question"] for r in resps] == questions[:3]
        done = await client.completions.create(
            model="ragctl/stuff", prompt=questions[3], extra_body={"num_chunks": 1}
        )
        assert done.object == "text_completion" and done.choices[0].text.strip()
        assert done.choices[0].model_extra["ragctl"]["config"] == "stuff:1"
        pieces = [
            c async for c in await client.completions.create(
                model="ragctl/stuff", prompt=questions[3], stream=True,
                extra_body={"num_chunks": 1},
            )
        ]  # fmt: skip
        assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
        stream = await client.chat.completions.create(
            model="ragctl/stuff", messages=[{"role": "user", "content": questions[3]}],
            stream=True, extra_body={"num_chunks": 1},
        )  # fmt: skip
        assert "".join([c.choices[0].delta.content or "" async for c in stream]).strip()
    finally:
        await client.close()


def test_models_health_and_metrics(client, server) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["ragctl/auto", "ragctl/map_rerank", "ragctl/stuff", "ragctl/map_reduce"]
    assert client.models.retrieve("ragctl/stuff").id == "ragctl/stuff"
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["default_collection"] == "squad"
    assert health["kv_total_blocks"] > 0
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in (
        "ragctl_requests_total", "ragctl_request_duration_seconds_bucket",
        "ragctl_stage_duration_seconds_bucket", "ragctl_config_method_total",
        "ragctl_config_num_chunks_bucket", "ragctl_kv_free_blocks", "ragctl_kv_reserved_blocks",
        "ragctl_admission_queue_length", "ragctl_inflight_requests", "ragctl_engine_tokens_total",
    ):  # fmt: skip
        assert f"\n{name}" in text, name
    assert metric(server, "ragctl_requests_total", '{model="ragctl/stuff",outcome="ok"}') >= 1
    assert metric(server, "ragctl_kv_total_blocks") == health["kv_total_blocks"]
    # The SLO loop's totals (one request above carried slo_ms).
    outcomes = ('{outcome="met"}', '{outcome="violated"}')
    slo_requests = sum(metric(server, "ragctl_slo_requests_total", o) for o in outcomes)
    assert slo_requests >= 1
    for name in ("ragctl_slo_flagged_total", "ragctl_slo_paused_admission_seconds_total",
                 "ragctl_slo_held_seconds_total", "ragctl_slo_held_requests_total",
                 "ragctl_slo_attainment_ratio", "ragctl_slo_plan_actions_total"):  # fmt: skip
        assert f"\n{name}" in text, name


def test_langchain_chat_openai_against_the_server(server, questions) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, model="ragctl/stuff", max_retries=0,
        extra_body={"num_chunks": 2},
    )  # fmt: skip
    msg = llm.invoke(questions[0])
    assert isinstance(msg.content, str) and msg.content.strip()
    streamed = "".join(c.content for c in llm.stream(questions[0]))
    assert streamed == msg.content


# -- errors over real HTTP ------------------------------------------------------------------------


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_error_statuses(server, client, questions) -> None:
    ok = chat_body(questions[0], model="ragctl/stuff", num_chunks=1)
    # 401: no key, wrong key; the openai client raises its own class.
    assert_openai_error(post(server, "/v1/chat/completions", key=None, json=ok), 401)
    assert_openai_error(post(server, "/v1/models", key="wrong", json=ok), 401, "invalid_api_key")
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # 404: unknown model, unknown collection, collection without data; unknown route.
    err = assert_openai_error(
        post(server, "/v1/chat/completions", json={**ok, "model": "gpt-4"}), 404, "model_not_found"
    )
    assert err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    err = assert_openai_error(
        post(server, "/v1/chat/completions", json={**ok, "collection": "nope"}), 404
    )
    assert err["param"] == "collection" and err["code"] == "unknown_collection"
    assert_openai_error(
        post(server, "/v1/chat/completions", json={**ok, "collection": "qmsum"}), 404,
        "data_not_found",
    )  # fmt: skip
    assert_openai_error(post(server, "/v1/nothing", json=ok), 404)
    # 400: not JSON, schema violations, semantic errors.
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert_openai_error(r, 400)
    for body, param in [
        ({"model": "ragctl/auto"}, "messages"),
        ({**ok, "messages": []}, "messages"),
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({**ok, "num_chunks": 0}, "num_chunks"),
        ({**ok, "max_chunks": "many"}, "max_chunks"),
        ({**ok, "n": 2}, None),
        ({**ok, "messages": [{"role": "assistant", "content": "x"}]}, None),
    ]:
        err = assert_openai_error(post(server, "/v1/chat/completions", json=body), 400)
        assert param is None or err["param"] == param, (body, err)
    assert_openai_error(
        post(server, "/v1/chat/completions", json=chat_body("   ", model="ragctl/stuff")), 400
    )
    assert_openai_error(
        post(server, "/v1/chat/completions",
             json={**ok, "model": "ragctl/stuff", "intermediate_length": 50}), 400,
    )  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="ragctl/auto", messages=[])
    # 413: a question longer than the context; a body over the size limit.
    assert_openai_error(
        post(server, "/v1/chat/completions", json=chat_body("why " * 3000)), 413,
        "context_length_exceeded",
    )  # fmt: skip
    assert_openai_error(
        post(server, "/v1/chat/completions", json=chat_body("why " * 300_000)), 413,
        "request_too_large",
    )  # fmt: skip
    # 504: the request's own deadline passed; its engine calls were stopped.
    before = metric(server, "ragctl_requests_total", '{model="ragctl/auto",outcome="timeout"}')
    assert_openai_error(
        post(server, "/v1/chat/completions", json=chat_body(questions[0], deadline_ms=200)), 504,
        "deadline_exceeded",
    )  # fmt: skip
    after = metric(server, "ragctl_requests_total", '{model="ragctl/auto",outcome="timeout"}')
    assert after == before + 1
    assert metric(server, "ragctl_inflight_requests") == 0
    # 405
    assert httpx.get(f"{server.url}/v1/chat/completions", timeout=30).status_code in (401, 405)
    r = httpx.get(
        f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert_openai_error(r, 405)


def test_queue_full_is_503_with_retry_after(server, questions) -> None:
    """Fixed configurations reserve their KV blocks without waiting; while large ones hold more
    than the whole cache, an adaptive request cannot fit, and with a queue of 0 it is refused
    at once. Adaptive requests are sent until one meets that (the first may be admitted if the
    large ones finish early on a fast machine)."""
    heavy = chat_body(
        questions[4], model="ragctl/map_reduce", num_chunks=9, intermediate_length=300
    )

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(
            headers={"Authorization": f"Bearer {KEY}"}, timeout=600
        ) as http:
            big = [
                asyncio.ensure_future(http.post(f"{server.url}/v1/chat/completions", json=heavy))
                for _ in range(3)
            ]
            deadline = time.monotonic() + 120
            while metric(server, "ragctl_kv_reserved_blocks") <= 24:
                assert time.monotonic() < deadline, "the large requests never reserved"
                await asyncio.sleep(0.1)
            small: list[httpx.Response] = []
            while not all(b.done() for b in big):
                small += await asyncio.gather(*(
                    http.post(f"{server.url}/v1/chat/completions", json=chat_body(q))
                    for q in questions[:2]
                ))  # fmt: skip
                if any(r.status_code == 503 for r in small):
                    break
            return list(await asyncio.gather(*big)), small

    big, small = asyncio.run(run())
    assert [r.status_code for r in big] == [200, 200, 200]
    assert {r.status_code for r in small} <= {200, 503}, [r.text for r in small]
    refused = [r for r in small if r.status_code == 503]
    assert refused, "no adaptive request met the full cache"
    for r in refused:
        assert_openai_error(r, 503, "queue_full")
        assert r.headers["Retry-After"] == "1"
    assert metric(server, "ragctl_kv_reserved_blocks") == 0


def test_client_disconnect_cancels_engine_calls(server, questions) -> None:
    label = '{model="ragctl/map_reduce",outcome="cancelled"}'
    before = metric(server, "ragctl_requests_total", label)
    body = chat_body(questions[5], model="ragctl/map_reduce", num_chunks=9, intermediate_length=300)
    with pytest.raises(httpx.ReadTimeout):
        post_timeout = httpx.Timeout(30, read=3.0)
        httpx.post(
            f"{server.url}/v1/chat/completions", json=body, timeout=post_timeout,
            headers={"Authorization": f"Bearer {KEY}"},
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while metric(server, "ragctl_requests_total", label) < before + 1:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.2)
    # The engine calls were aborted: the cache empties without the request finishing.
    total = metric(server, "ragctl_kv_total_blocks")
    while metric(server, "ragctl_kv_free_blocks") < total:
        assert time.monotonic() < deadline + 30, "engine calls still hold KV blocks"
        time.sleep(0.2)
    assert metric(server, "ragctl_inflight_requests") == 0
    assert metric(server, "ragctl_kv_reserved_blocks") == 0


# -- fuzzing and load -----------------------------------------------------------------------------


def test_schema_fuzzing_finds_no_server_errors(server) -> None:
    """schemathesis over the server's own OpenAPI schema, invalid inputs (and valid ones, which
    name no served model, so no engine work): never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    fuzzed: list[str] = []

    def fuzz(strategy, where: str) -> None:
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=strategy)
        def check(case) -> None:
            resp = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            if resp.status_code >= 500:
                failures.append(f"{where}: {resp.status_code} {resp.text}")

        try:
            check()
        except Unsatisfiable:
            return  # nothing invalid to generate (a route without parameters)
        fuzzed.append(where)

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for op in operations:
        for mode in (GenerationMode.NEGATIVE, GenerationMode.POSITIVE):
            fuzz(op.as_strategy(generation_mode=mode), f"{op.label} {mode.value}")
    assert not failures, failures[:5]
    for route in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert f"{route} negative" in fuzzed and f"{route} positive" in fuzzed, fuzzed
    assert metric(server, "ragctl_inflight_requests") == 0


def test_load_50_concurrent_all_accounted_and_still_healthy(server, client, questions) -> None:
    result = asyncio.run(
        chat_load(server.url, questions, requests=50, concurrency=50, api_key=KEY, timeout_s=600)
    )
    d = result.to_dict()
    print("load:", json.dumps(d))
    assert result.accounted == 50 and not result.failed, d
    assert result.rejected[429] >= 50 - MAX_INFLIGHT  # more than the in-flight limit at once
    assert result.completed >= 1
    assert set(result.rejected) <= {429, 503}
    # Still healthy, nothing held, and it answers the next request.
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert metric(server, "ragctl_inflight_requests") == 0
    assert metric(server, "ragctl_kv_reserved_blocks") == 0
    resp = client.chat.completions.create(
        model="ragctl/auto", messages=[{"role": "user", "content": questions[0]}]
    )
    assert resp.choices[0].message.content is not None
