"""ragctl on Ray Serve: `ragctl serve --ray` joins a local Ray instance (2 CPUs) the test started
and runs two ragctl replicas behind Ray's HTTP proxy, both over ONE small real vLLM server (64 KV
blocks) and one shared KV ledger (the named actor). Concurrent requests through the official
`openai` client: every one is answered or refused with a clear error (none lost), both replicas
take part, and no reservation the ledger granted ever over-committed the engine (each fitted
beside every replica's reservations, on the KV state its replica read); afterwards every block
is given back, and on SIGTERM `ragctl serve --ray` removes its application and the ledger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from ragctl.scheduler.admission import fits
from ragctl.settings import Settings
from ragctl.types import KVState, Query

from .conftest import VLLMServer, running_ragctl_server, running_vllm_server

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="the Ray Serve tests need the [ray] extra")

REPLICAS = 2
ENGINE_BLOCKS = 64
"""A small cache (1,024 tokens): two concurrent plans can fill it."""
REQUESTS = 10


@pytest.fixture(scope="module")
def small_engine(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    pytest.importorskip("vllm", reason="needs vLLM installed")
    log = tmp_path_factory.mktemp("vllm-ray") / "server.log"
    extra = ("--num-gpu-blocks-override", str(ENGINE_BLOCKS), "--max-model-len", "2048")
    with running_vllm_server(model_path, log, extra_args=extra) as (server, _):
        yield server


@pytest.fixture(scope="module")
def ray_app(
    small_squad: tuple[Settings, list[Query]],
    small_engine: VLLMServer,
    model_path: str,
    tokenizer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, object]]:
    """The test starts a local Ray instance (2 CPUs); `ragctl serve --ray --ray-address` joins
    it as a user runs it, deploys two replicas and creates the ledger, which the test reads."""
    from ray import serve

    from ragctl.distributed.ledger import NAMESPACE, find_ledger
    from ragctl.distributed.serve import APP_NAME
    from ragctl.retrieval.index import open_retriever

    settings, _ = small_squad
    open_retriever(settings, "squad", tokenizer)  # build the index once, not in both replicas
    ray.init(
        num_cpus=REPLICAS, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False
    )
    try:
        global_args = [
            "--model", model_path, "--engine-url", small_engine.url,
            "--data-dir", str(settings.data_dir), "--cache-dir", str(settings.cache_dir),
            "--golden-every", "0", "--answer-max-tokens", "32",
        ]  # fmt: skip
        serve_args = [
            "--dataset", "squad", "--ray", "--replicas", str(REPLICAS), "--max-inflight", "16",
            "--ray-address", ray.get_runtime_context().gcs_address,
        ]  # fmt: skip
        log = tmp_path_factory.mktemp("ragctl-ray") / "serve.log"
        with running_ragctl_server(global_args, serve_args, log) as server:
            # /health answers once one replica is up; wait for both (the app is RUNNING).
            deadline = time.monotonic() + 240
            while serve.status().applications[APP_NAME].status != "RUNNING":
                assert time.monotonic() < deadline, "the replicas did not all start"
                time.sleep(1)
            yield server.url, find_ledger()
        with pytest.raises(ValueError):  # stopped: the ledger actor is gone with the app
            find_ledger()
    finally:
        ray.shutdown()


async def test_replicas_share_one_ledger_and_never_over_commit(
    ray_app: tuple[str, object], small_squad: tuple[Settings, list[Query]]
) -> None:
    url, ledger = ray_app
    questions = [q.question for q in small_squad[1]]
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    async def ask(i: int) -> tuple[str, object]:
        q = questions[i % len(questions)]
        try:
            r = await client.chat.completions.create(
                model="ragctl/auto", messages=[{"role": "user", "content": q}]
            )
        except openai.APIStatusError as e:  # refused: must say why, in OpenAI's error JSON
            body = e.response.json()
            assert e.status_code in (413, 429, 503), body
            assert body["error"]["message"] and body["error"]["type"], body
            return "refused", e
        return "answered", r

    t = time.monotonic()
    results = await asyncio.gather(*(ask(i) for i in range(REQUESTS)))
    elapsed = time.monotonic() - t
    answered = [r for kind, r in results if kind == "answered"]
    assert len(results) == REQUESTS  # none lost: each is an answer or a clear refusal
    assert answered, "no request was answered"
    for r in answered:
        assert r.choices[0].message.content is not None
        decision = r.model_extra["ragctl"]["decision"]
        assert decision["method"] and decision["need_blocks"] >= 1, decision

    grants = ray.get(ledger.grants.remote())  # type: ignore[attr-defined]
    granted = [g for g in grants if g["granted"]]
    assert len(granted) >= len(answered)
    assert len({g["replica"] for g in granted}) == REPLICAS, "both replicas should admit plans"
    for g in granted:
        kv = KVState(g["total_blocks"], g["free_blocks"], 16)
        assert g["total_blocks"] <= ENGINE_BLOCKS  # the small engine's cache, as read
        assert fits(g["reserved_before"], g["blocks"], kv), g
        assert g["reserved_before"] + g["blocks"] <= g["total_blocks"], g
    peak = max(g["reserved_before"] + g["blocks"] for g in granted)
    queued = sum(bool(r.model_extra["ragctl"]["decision"].get("queued")) for r in answered)
    # The cache really bound: some plan waited for blocks, or lost a race for them.
    assert queued + (len(grants) - len(granted)) >= 1, grants
    print(
        f"\n{len(answered)}/{REQUESTS} answered in {elapsed:.0f}s; ledger: {len(granted)} "
        f"granted, {len(grants) - len(granted)} refused (lost races), peak {peak} of "
        f"{ENGINE_BLOCKS} blocks reserved; {queued} waited in a queue"
    )

    # Every reservation comes back (releases are sent without waiting: poll briefly).
    deadline = time.monotonic() + 10
    while True:
        snap = ray.get(ledger.snapshot.remote())  # type: ignore[attr-defined]
        if not any(snap["totals"].values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert snap["reservations"] == 0 and not any(snap["totals"].values()), snap
    assert len(snap["replicas"]) == REPLICAS and not snap["expired"]


def test_errors_and_metrics_unchanged_behind_the_proxy(ray_app: tuple[str, object]) -> None:
    url, _ = ray_app
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    models = httpx.get(f"{url}/v1/models", timeout=60).json()
    assert "ragctl/auto" in {m["id"] for m in models["data"]}
    metrics = httpx.get(f"{url}/metrics", timeout=60).text
    assert "ragctl_kv_reserved_blocks" in metrics and "ragctl_requests_total" in metrics
    # Streaming passes through Ray's proxy as server-sent events ending in [DONE].
    body = {
        "model": "ragctl/stuff", "num_chunks": 1, "max_tokens": 8, "stream": True,
        "messages": [{"role": "user", "content": "Where was Super Bowl 50 played?"}],
    }  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2
