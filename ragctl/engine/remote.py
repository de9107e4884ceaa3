"""A vLLM server over its OpenAI-compatible HTTP API.

Owns the connection (one `httpx.AsyncClient` per engine), discovery of the served model, its
context length and tokenizer, the request body for each `GenerationRequest` (log-probs,
structured output and priority through vLLM's extensions), and the mapping of HTTP and transport
failures onto ragctl's error tree. KV state comes from `/metrics` (parsed by `metrics.py`) and
lags the engine by up to one stats interval. An OpenAI-compatible server that is not vLLM has no
such `/metrics`: connect with `kv_metrics=False` (or `None`, to find out) and the KV state reads
as unknown (`UNKNOWN_KV`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from ragctl.engine.base import Engine, StreamEvent, gather_or_cancel, merge_by_text
from ragctl.engine.embedded_model import model_folder, resolve_model
from ragctl.engine.metrics import EngineStats, kv_state_from_stats, parse_metrics
from ragctl.engine.tokenizer import Tokenizer
from ragctl.errors import (
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    EngineUnreachable,
    InvalidRequest,
    MetricsError,
    ModelNotFound,
    PromptTooLong,
    RagctlError,
)
from ragctl.settings import default_cache_dir
from ragctl.types import Generation, GenerationRequest, KVState

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096
"""Context length assumed when the model card does not report one (non-vLLM servers)."""
CONNECT_TIMEOUT_S = 30.0
"""Opening a TCP connection is quick even on a busy server; longer means it cannot be reached."""
UNKNOWN_KV = KVState(total_blocks=1 << 30, free_blocks=1 << 30, block_size=16, source="unknown")
"""What `kv_state` says with `kv_metrics=False`: memory is not known, so it never limits a
configuration (best-fit picks the largest of the space) and nothing waits for it."""

_CONTEXT_LENGTH = re.compile(r"context length|maximum context|context window", re.IGNORECASE)
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def server_root(base_url: str) -> str:
    """`http://host:port[/prefix]` from a base URL given with or without `/v1` or a scheme."""
    url = base_url.strip().rstrip("/")
    if not url:
        raise InvalidRequest("the engine URL is empty")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url.rstrip("/")


class RemoteEngine(Engine):
    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        url: str,
        name: str,
        tokenizer: Tokenizer,
        max_model_len: int,
        timeout_s: float,
        kv_metrics: bool = True,
    ) -> None:
        self._client = client
        self.url = url
        """The server root (no `/v1`)."""
        self.name = name
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._timeout_s = timeout_s
        self._kv_metrics = kv_metrics

    @property
    def has_kv_metrics(self) -> bool:
        """Whether the KV state comes from vLLM's `/metrics` (else it is `UNKNOWN_KV`)."""
        return self._kv_metrics

    @classmethod
    async def connect(
        cls,
        base_url: str,
        *,
        model: str | None = None,
        tokenizer: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        cache_dir: Path | None = None,
        kv_metrics: bool | None = True,
    ) -> RemoteEngine:
        """Find the served model (`model`, matched against the served names and then the served
        folders, else the first one served), its context length and its tokenizer.

        `kv_metrics=False`: the server is not vLLM (no `/metrics`); `kv_state` then reports
        `UNKNOWN_KV` instead of failing, so configurations are chosen without memory limits.
        `kv_metrics=None`: read `/metrics` once now and use it if the server has it (any
        OpenAI-compatible server); `has_kv_metrics` says which."""
        root = server_root(base_url)
        client = make_client(root, api_key=api_key, timeout_s=timeout_s)
        try:
            resp = await _send(client, "GET", "/v1/models")
            cards = _json(resp).get("data")
            if not isinstance(cards, list) or not cards:
                raise EngineError(f"{root}/v1/models lists no models")
            card = _pick_model(cards, model, root)
            name = str(card["id"])
            max_len = int(card.get("max_model_len") or DEFAULT_MAX_MODEL_LEN)
            # Loading a tokenizer reads files (and may consult the hub): keep the loop free.
            tok = await asyncio.to_thread(
                _load_tokenizer, tokenizer, model, card.get("root"), name, cache_dir
            )
        except BaseException:
            await client.aclose()
            raise
        log.info("connected to %s: model %s, context %d", root, name, max_len)
        engine = cls(
            client,
            url=root,
            name=name,
            tokenizer=tok,
            max_model_len=max_len,
            timeout_s=timeout_s,
            kv_metrics=kv_metrics is not False,
        )
        if kv_metrics is None:
            await engine._probe_kv_metrics()
        return engine

    async def _probe_kv_metrics(self) -> None:
        """Read `/metrics` once: without vLLM's figures there, the KV state is unknown from now
        on. A server that cannot be reached fails the connection (closed)."""
        try:
            await self.kv_state()
        except (EngineUnavailable, EngineTimeout):
            await self.aclose()
            raise
        except EngineError as e:  # no /metrics, not vLLM's, or not readable with this key
            log.info("%s: no vLLM KV metrics (%s); KV memory is treated as unknown", self.url, e)
            self._kv_metrics = False
        except BaseException:
            await self.aclose()
            raise

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return await gather_or_cancel([self._one(r) for r in requests])

    @staticmethod
    def endpoint(req: GenerationRequest) -> str:
        """Chat calls go to `/v1/chat/completions`, raw prompts to `/v1/completions`."""
        return "/v1/completions" if req.prompt is not None else "/v1/chat/completions"

    def request_body(self, req: GenerationRequest) -> dict[str, Any]:
        """The request body for one call (see `endpoint`)."""
        body: dict[str, Any] = {
            "model": self.name,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
        }
        if req.top_p != 1.0:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        if req.prompt is not None:
            body["prompt"] = req.prompt
            if req.logprobs or req.top_logprobs:
                # Completions API: k alternatives per position; 0: the sampled token's only.
                body["logprobs"] = req.top_logprobs
        else:
            body["messages"] = [{"role": m.role, "content": m.content} for m in req.messages]
            if req.logprobs or req.top_logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = req.top_logprobs  # 0: the sampled token's log-prob only
        if req.ignore_eos:
            body["ignore_eos"] = True  # vLLM extension
        if req.priority:
            # vLLM extension; a server without --scheduling-policy priority rejects non-zero.
            body["priority"] = req.priority
        if req.json_schema is not None and req.prompt is not None:
            # The completions API has no response_format; vLLM's extension does the same job.
            body["structured_outputs"] = {"json": dict(req.json_schema)}
        elif req.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": dict(req.json_schema)},
            }
        elif req.choices is not None:
            # vLLM extension; 0.32 ignores the older `guided_choice` (output left unconstrained).
            body["structured_outputs"] = {"choice": list(req.choices)}
        return body

    async def _one(self, req: GenerationRequest) -> Generation:
        prompt_tokens = len(self.tokenizer.encode_request(req))
        self.check_fits(req, prompt_tokens)
        headers = self._request_headers(req)
        start = time.perf_counter()
        try:
            # httpx bounds each read; this bounds the whole call (queueing included).
            async with asyncio.timeout(self._timeout_s):
                resp = await _send(
                    self._client,
                    "POST",
                    self.endpoint(req),
                    json=self.request_body(req),
                    headers=headers,
                )
        except TimeoutError as e:
            raise EngineTimeout(
                f"engine call to {self.url} timed out after {self._timeout_s:g}s"
            ) from e
        seconds = time.perf_counter() - start
        data = _json(resp)
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            logprobs = None
            top: list[dict[str, float]] = []
            lp = choice.get("logprobs") or {}
            if req.prompt is not None:
                text = choice.get("text") or ""
                if req.logprobs:
                    values = lp.get("token_logprobs")
                    if values is not None:
                        logprobs = tuple(float(v) for v in values)
            else:
                text = choice["message"].get("content") or ""
                if req.logprobs:
                    content = lp.get("content")
                    if content is not None:
                        logprobs = tuple(float(t["logprob"]) for t in content)
            _read_top_logprobs(req, lp, top)
            return Generation(
                text=text,
                prompt_tokens=int(usage.get("prompt_tokens", prompt_tokens)),
                output_tokens=int(
                    usage["completion_tokens"]
                    if "completion_tokens" in usage
                    else self.tokenizer.count(text)
                ),
                finish_reason=choice.get("finish_reason"),
                token_logprobs=logprobs,
                seconds=seconds,
                top_logprobs=tuple(top) if req.top_logprobs and lp else None,
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise EngineError(
                f"unexpected chat completion from {self.url}: {type(e).__name__}: {e}"
            ) from e

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """The server's SSE stream (`"stream": true`) as text deltas, then the Generation
        (token counts from the final usage chunk). Closing it closes the HTTP connection, and
        vLLM aborts a request whose client went away."""
        req = request
        prompt_tokens = len(self.tokenizer.encode_request(req))
        self.check_fits(req, prompt_tokens)
        path = self.endpoint(req)
        body = {**self.request_body(req), "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        url = f"{self.url}{path}"
        start = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        parts: list[str] = []
        logprobs: list[float] = []
        top: list[dict[str, float]] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout_at(deadline):
                    resp = await stack.enter_async_context(
                        self._client.stream(
                            "POST", path, json=body, headers=self._request_headers(req)
                        )
                    )
                    if not resp.is_success:
                        await resp.aread()
                        raise error_from_response(resp)
                lines = resp.aiter_lines()
                while True:
                    try:
                        # Bounds the server's waits only, not the consumer's between tokens.
                        async with asyncio.timeout_at(deadline):
                            line = await anext(lines)
                    except StopAsyncIteration:
                        break
                    event = sse_data(line)
                    if event is None:
                        continue
                    if isinstance(event, str):  # [DONE]
                        break
                    delta, done = self._stream_chunk(req, event, logprobs, top)
                    finish = done or finish
                    usage = event.get("usage") or usage
                    if delta:
                        parts.append(delta)
                        yield delta
        except TimeoutError as e:
            raise EngineTimeout(f"engine call to {url} timed out after {self._timeout_s:g}s") from e
        except httpx.HTTPError as e:
            raise transport_error(e, "POST", url) from e
        text = "".join(parts)
        yield Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", prompt_tokens)),
            output_tokens=int(usage.get("completion_tokens", self.tokenizer.count(text))),
            finish_reason=finish,
            token_logprobs=tuple(logprobs) if req.logprobs and logprobs else None,
            seconds=time.perf_counter() - start,
            top_logprobs=tuple(top) if req.top_logprobs and top else None,
        )

    def _stream_chunk(
        self,
        req: GenerationRequest,
        event: dict[str, Any],
        logprobs: list[float],
        top: list[dict[str, float]],
    ) -> tuple[str, str | None]:
        """One SSE chunk's text delta and finish reason (its log-probs and top alternatives
        appended)."""
        if "error" in event or event.get("object") == "error":
            err = event.get("error", event)
            message = err.get("message", err) if isinstance(err, dict) else err
            raise EngineError(f"the vLLM server at {self.url} failed mid-stream: {message}")
        try:
            choices = event.get("choices") or []
            if not choices:
                return "", None  # the usage chunk
            choice = choices[0]
            lp = choice.get("logprobs") or {}
            if req.prompt is not None:
                text = choice.get("text") or ""
                if req.logprobs:
                    logprobs.extend(float(v) for v in lp.get("token_logprobs") or ())
            else:
                text = (choice.get("delta") or {}).get("content") or ""
                if req.logprobs:
                    logprobs.extend(float(t["logprob"]) for t in lp.get("content") or ())
            _read_top_logprobs(req, lp, top)
            return text, choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise EngineError(
                f"unexpected stream chunk from {self.url}: {type(e).__name__}: {e}"
            ) from e

    @staticmethod
    def _request_headers(req: GenerationRequest) -> dict[str, str]:
        tag = _UNSAFE_ID_CHARS.sub("-", req.tag)[:40] or "call"
        # Shows up in the server's logs, so a slow call can be traced to its stage.
        return {"X-Request-Id": f"ragctl-{tag}-{uuid.uuid4().hex[:12]}"}

    async def stats(self) -> EngineStats:
        """The server's KV cache and queue figures from one `/metrics` scrape."""
        # /metrics hangs off the server root, not /v1.
        resp = await _send(self._client, "GET", "/metrics", check=False)
        if resp.status_code == 404:
            raise MetricsError(f"not a vLLM server: {self.url}/metrics does not exist")
        _raise_for_status(resp)
        return parse_metrics(resp.text, model_name=self.name)

    async def kv_state(self) -> KVState:
        if not self._kv_metrics:
            return UNKNOWN_KV
        return kv_state_from_stats(await self.stats())

    async def check_health(self, timeout_s: float = 5.0) -> None:
        """vLLM's `GET /health` (200 when the engine is up), bounded by `timeout_s`; raises the
        `EngineError` of a server that does not answer it."""
        try:
            async with asyncio.timeout(timeout_s):
                await _send(self._client, "GET", "/health")
        except TimeoutError as e:
            raise EngineTimeout(f"{self.url}/health did not answer in {timeout_s:g}s") from e

    async def reset_prefix_cache(self) -> bool:
        """vLLM's `POST /reset_prefix_cache`, which a server offers only in its development mode
        (`VLLM_SERVER_DEV_MODE=1`): False elsewhere."""
        resp = await _send(self._client, "POST", "/reset_prefix_cache", check=False)
        return resp.status_code == 200

    async def aclose(self) -> None:
        await self._client.aclose()


def _read_top_logprobs(
    req: GenerationRequest, logprobs: dict[str, Any], out: list[dict[str, float]]
) -> None:
    """Append each position's alternatives (text -> log-prob) from a choice's `logprobs`:
    chat `content[i].top_logprobs = [{"token", "logprob"}, ...]`, completions `top_logprobs =
    [{token: logprob} | null, ...]` (vLLM's completions API keys them by text already, so two
    tokens with one text arrive as one entry)."""
    if not req.top_logprobs or not logprobs:
        return
    if req.prompt is not None:
        for pos in logprobs.get("top_logprobs") or ():
            out.append(merge_by_text((pos or {}).items()))
    else:
        for pos in logprobs.get("content") or ():
            alternatives = pos.get("top_logprobs") or ()
            out.append(merge_by_text((t["token"], t["logprob"]) for t in alternatives))


def make_client(
    root: str,
    *,
    api_key: str | None,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The engine's HTTP client (`transport`: a stand-in for the network, in tests)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=root,
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
        # No client-side cap on concurrent calls: the engine must see every call to batch them
        # and to apply their priorities; a pool limit would queue them here instead.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        transport=transport,
    )


def _pick_model(cards: list[dict[str, Any]], model: str | None, root: str) -> dict[str, Any]:
    if model is None:
        return cards[0]
    for key in ("id", "root"):
        for card in cards:
            if card.get(key) == model:
                return card
    served = ", ".join(str(c.get("id")) for c in cards)
    raise ModelNotFound(f"model {model!r} is not served at {root}; it serves: {served}")


def _load_tokenizer(
    tokenizer: str | None,
    model: str | None,
    served_root: str | None,
    served_name: str,
    cache_dir: Path | None,
) -> Tokenizer:
    """The tokenizer given, else the one at the requested model or the served model's folder
    (vLLM's card `root`), else the embedded model's when that is what the server serves."""
    if tokenizer:
        return Tokenizer.load(tokenizer)
    candidates = [n for n in dict.fromkeys((model, served_root)) if n]
    # A local folder loads without the network: try it first.
    candidates.sort(key=lambda n: not os.path.isdir(n))
    errors: list[str] = []
    for name in candidates:
        try:
            return Tokenizer.load(name)
        except Exception as e:  # noqa: BLE001 - any failure means: try the next candidate
            errors.append(str(e))
    embedded = model_folder(cache_dir or default_cache_dir())
    if served_root and _same_path(served_root, embedded):
        # The server runs the embedded default but this machine has not prepared it yet.
        return Tokenizer.load(resolve_model(None, cache_dir or default_cache_dir()))
    tried = ", ".join(repr(c) for c in candidates) or "nothing"
    raise ModelNotFound(
        f"cannot load the tokenizer of served model {served_name!r} (tried {tried}"
        + (f": {errors[-1]}" if errors else "")
        + "); pass --tokenizer (RAGCTL_TOKENIZER) with the model's HF folder or id"
    )


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == b.expanduser().resolve()
    except (OSError, ValueError):
        return False


async def _send(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    check: bool = True,
    **kwargs: Any,
) -> httpx.Response:
    """One HTTP call with transport failures mapped to ragctl errors (and, with `check`, error
    statuses too)."""
    try:
        resp = await client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise transport_error(e, method, f"{client.base_url}".rstrip("/") + path) from e
    if check:
        _raise_for_status(resp)
    return resp


def transport_error(e: httpx.HTTPError, method: str, url: str) -> RagctlError:
    """The ragctl error for an httpx failure (no HTTP status: connect, timeout, reset)."""
    if isinstance(e, httpx.ConnectTimeout):
        return EngineUnreachable(f"cannot reach the vLLM server at {url}: connect timed out")
    if isinstance(e, httpx.TimeoutException):
        return EngineTimeout(f"{method} {url} timed out ({type(e).__name__})")
    if isinstance(e, httpx.ConnectError):
        return EngineUnreachable(f"cannot reach the vLLM server at {url}: {e}")
    if isinstance(e, httpx.UnsupportedProtocol):
        return InvalidRequest(f"engine URL {url}: {e}")
    # Server disconnected mid-call, connection reset, ...: it died or restarted.
    return EngineUnavailable(
        f"lost the connection to the vLLM server at {url}: {type(e).__name__}: {e}"
    )


def _raise_for_status(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    raise error_from_response(resp)


def error_from_response(resp: httpx.Response) -> RagctlError:
    """The ragctl error for a failed HTTP response from a vLLM server."""
    status = resp.status_code
    url = str(resp.request.url)
    message = _server_message(resp)
    if status in (401, 403):
        return EngineError(
            f"authentication failed at {url} (HTTP {status}: {message}); "
            "check the engine API key (--engine-api-key / RAGCTL_ENGINE_API_KEY)"
        )
    if status == 404:
        if "model" in message.lower():
            return ModelNotFound(f"{message} (at {url})")
        return EngineError(f"HTTP 404 for {url}: {message}; is it a vLLM OpenAI-compatible server?")
    if status == 400 and _CONTEXT_LENGTH.search(message):
        return PromptTooLong(message)
    if status in (400, 422):
        return InvalidRequest(f"the engine rejected the call (HTTP {status}): {message}")
    if status == 503:
        return EngineUnavailable(f"the vLLM server at {url} is unavailable (HTTP 503): {message}")
    return EngineError(f"engine error from {url} (HTTP {status}): {message}")


def _server_message(resp: httpx.Response) -> str:
    """vLLM answers `{"error": {"message": ...}}`; FastAPI `{"detail": ...}`; proxies, text."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:2000]
    return str(data)[:500]


def sse_data(line: str) -> dict[str, Any] | str | None:
    """The payload of one SSE line: a JSON object, `"[DONE]"`, or None (blank, comment or
    another field)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        value = json.loads(data)
    except ValueError as e:
        raise EngineError(f"the engine's stream sent non-JSON data: {data[:200]!r}") from e
    if not isinstance(value, dict):
        raise EngineError(f"the engine's stream sent unexpected JSON: {data[:200]}")
    return value


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError as e:
        raise EngineError(
            f"{resp.request.url} answered non-JSON (is it a vLLM OpenAI-compatible server?): "
            f"{resp.text[:200]!r}"
        ) from e
    if not isinstance(data, dict):
        raise EngineError(f"{resp.request.url} answered unexpected JSON: {str(data)[:200]}")
    return data
