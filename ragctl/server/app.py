"""The OpenAI-compatible HTTP surface: FastAPI routes over a `Service` (one engine, a controller
per collection). Routes translate; the controller decides.

- `POST /v1/chat/completions`, `POST /v1/completions` (stream or not), `GET /v1/models`,
  `GET /health`, `GET /metrics`.
- The model picks the behaviour (`ragctl/auto` adaptive, `ragctl/<method>` fixed); the request's
  `collection` field picks the index (default: the server's).
- Every error is OpenAI's error JSON with the status of the `RagctlError` behind it; 429 (too
  many requests in flight) and 503 (admission queue full) carry `Retry-After`; 503
  `slo_unmeetable` (shed by the SLO loop) carries `x-should-retry: false`.
- A client that disconnects, or a request whose `deadline_ms` passes, cancels its engine calls.
- `stream: true` streams the final stage's tokens as the engine decodes them (stuff's answer,
  map_reduce's reducer; map_rerank's chosen answer in one delta once ranked). The response
  starts with the first answer token, so a failure before it (bad request, queue full,
  deadline, engine down) is still an HTTP error with its status; one after it ends the stream
  with `data: {"error": {...}}` and `data: [DONE]`. Completions with several prompts stream
  them concurrently, each delta tagged with its prompt's `index` (as OpenAI does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragctl.bridge import putter
from ragctl.engine.base import gather_or_cancel
from ragctl.errors import (
    DeadlineExceeded,
    InvalidRequest,
    QueueFull,
    RagctlError,
    RequestTooLarge,
    SLOUnmeetable,
    TooManyRequests,
    Unauthorized,
)
from ragctl.server.metrics import ServerMetrics
from ragctl.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    RagctlOptions,
    Sampling,
    openai_error,
    served_models,
)
from ragctl.service import Service
from ragctl.types import Answer, Message

log = logging.getLogger(__name__)
T = TypeVar("T")

DISCONNECT_POLL_S = 0.25
ERROR_PARAMS = {
    "model_not_found": "model",
    "unknown_collection": "collection",
    "data_not_found": "collection",
    "context_length_exceeded": "messages",
}
"""The request field an error code is about (OpenAI's `param`)."""


@dataclass(frozen=True)
class ServerOptions:
    default_collection: str
    api_key: str | None = None
    """Bearer token every /v1 route requires (None: open)."""
    max_inflight: int = 64
    """Requests answered at once; more get 429 with Retry-After."""
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1


class ClientGone(Exception):
    """The client disconnected; its request was cancelled (nobody to answer)."""


def error_type(status: int) -> str:
    """OpenAI's `type` for a status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(
    status: int,
    message: str,
    code: str | None,
    param: str | None = None,
    retry_after: int = 0,
    *,
    retry: bool = True,
) -> JSONResponse:
    """The OpenAI error JSON; `retry_after` sets Retry-After, `retry=False` tells the official
    clients not to retry on their own (`x-should-retry`, which they read before the status)."""
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if not retry:
        headers["x-should-retry"] = "false"
    return JSONResponse(
        openai_error(message, error_type(status), code, param),
        status_code=status,
        headers=headers or None,
    )


def outcome_of(e: BaseException) -> str:
    """The `outcome` label of a failed request."""
    if isinstance(e, TooManyRequests | QueueFull | SLOUnmeetable):
        return "rejected"
    if isinstance(e, DeadlineExceeded):
        return "timeout"
    if isinstance(e, RagctlError) and e.http_status < 500:
        return "invalid"
    return "error"


def create_app(
    service: Service | None,
    options: ServerOptions,
    *,
    open_service: Callable[[], Awaitable[Service]] | None = None,
    close_service: bool = False,
) -> FastAPI:
    """The app over an open `service` (closed at shutdown when `close_service`), or one
    `open_service()` opens at startup and the app closes at shutdown."""
    metrics = ServerMetrics()
    inflight = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = close_service
        if app.state.service is None and open_service is not None:
            app.state.service, owned = await open_service(), True
        try:
            yield
        finally:
            if owned and app.state.service is not None:
                await app.state.service.aclose()

    app = FastAPI(
        title="ragctl",
        description="OpenAI-compatible, query-adaptive RAG over vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics

    def svc() -> Service:
        s = app.state.service
        if s is None:
            raise RuntimeError("the service is not open")
        return s

    # -- errors ----------------------------------------------------------------------------------

    @app.exception_handler(RagctlError)
    async def _ragctl_error(request: Request, e: RagctlError) -> JSONResponse:
        model = getattr(request.state, "model", None)
        if model is not None:
            metrics.outcome(model, outcome_of(e))
        retry = options.retry_after_s if isinstance(e, TooManyRequests | QueueFull) else 0
        param = ERROR_PARAMS.get(e.code)
        # A shed request's retry would be a new request against the same load: the client
        # decides, not its automatic retries.
        return error_response(
            e.http_status, str(e), e.code, param, retry, retry=not isinstance(e, SLOUnmeetable)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif param:
            msg = f"{param}: {msg}"
        return error_response(400, msg, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        model = getattr(request.state, "model", None)
        if model is not None:
            metrics.outcome(model, "error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    app.add_middleware(GuardMiddleware, options=options)

    # -- helpers ---------------------------------------------------------------------------------

    async def admit(
        request: Request,
        body: Sampling,
        questions: list[str],
        history: tuple[Message, ...],
    ) -> Callable[[int, str, Callable[[str], None] | None], Awaitable[Answer]]:
        """Validate and take in-flight slots (released by `release`); the answering function
        for question i (with an optional token sink)."""
        nonlocal inflight
        model = body.model
        request.state.model = model
        config = body.config(model)
        try:
            answer_options = body.options()
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        controller = await svc().controller(body.collection or options.default_collection)
        for q in questions:
            controller.check_question(q, history, answer_options)
        if inflight + len(questions) > options.max_inflight:
            raise TooManyRequests(
                f"the server is answering {inflight} requests, its limit is "
                f"{options.max_inflight}; retry later"
            )
        inflight += len(questions)
        metrics.inflight.set(inflight)

        async def one(i: int, q: str, on_token: Callable[[str], None] | None) -> Answer:
            return await controller.aask(
                q, config, history=history, max_chunks=body.max_chunks, slo_ms=body.slo_ms,
                options=answer_options, on_token=on_token,
            )  # fmt: skip

        return one

    def release(n: int) -> None:
        nonlocal inflight
        inflight -= n
        metrics.inflight.set(inflight)

    async def answer_all(
        request: Request,
        body: Sampling,
        questions: list[str],
        history: tuple[Message, ...] = (),
    ) -> list[Answer]:
        """Validate, take in-flight slots, answer; cancelled with the client or the deadline."""
        one = await admit(request, body, questions, history)
        try:
            work = gather_or_cancel([one(i, q, None) for i, q in enumerate(questions)])
            answers = await until_done(request, work, body.deadline_ms)
        except ClientGone:
            metrics.outcome(request.state.model, "cancelled")
            raise
        finally:
            release(len(questions))
        for a in answers:
            metrics.observe_answer(request.state.model, a)
        return answers

    async def stream_all(
        request: Request,
        body: Sampling,
        questions: list[str],
        history: tuple[Message, ...],
        render: Callable[[int, str | Answer | None], list[dict[str, Any]]],
        tail: Callable[[list[Answer]], list[dict[str, Any]]],
    ) -> StreamingResponse | Response:
        """Answer the questions concurrently, streaming: `render(i, delta | Answer)` turns each
        event into SSE chunks (`render(0, None)`: the opening ones), `tail(answers)` the
        closing ones. Sends the headers with the first answer token: errors before it are
        HTTP errors; after it, an error event."""
        arrival = time.monotonic()
        model = body.model
        one = await admit(request, body, questions, history)
        events: asyncio.Queue[tuple[int, str | Answer]] = asyncio.Queue()
        put = putter(events)

        async def answer(i: int, q: str) -> None:
            a = await one(i, q, lambda delta: put((i, delta)))
            put((i, a))  # after its deltas: `putter` keeps the order

        work = asyncio.ensure_future(
            gather_or_cancel([answer(i, q) for i, q in enumerate(questions)])
        )
        answers: dict[int, Answer] = {}

        async def next_event() -> tuple[int, str | Answer] | None:
            """The next event; None when every answer is in; the work's error if it failed."""
            while len(answers) < len(questions):
                if not events.empty():
                    return events.get_nowait()
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    return getter.result()
                getter.cancel()
                if work.done() and events.empty():
                    work.result()  # raises the failure
            return None

        async def step() -> tuple[int, str | Answer] | None:
            event = await until_done(request, next_event(), body.deadline_ms, arrival=arrival)
            if event is not None and isinstance(event[1], Answer):
                answers[event[0]] = event[1]
                metrics.observe_answer(model, event[1])
            return event

        async def stop(outcome: str | None) -> None:
            if outcome is not None:
                metrics.outcome(model, outcome)
            try:
                if not work.done():
                    work.cancel()
                # Starlette cancels the body on a disconnect, and its (anyio) cancellation hits
                # every later await too: shielded, the engine calls' aborts still finish.
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(work, return_exceptions=True)
            finally:
                release(len(questions))

        try:
            first = await step()
        except ClientGone:
            await stop("cancelled")
            return Response(status_code=499)
        except BaseException:
            await stop(None)  # the error handler counts it
            raise

        async def body_iter() -> AsyncIterator[bytes]:
            outcome: str | None = "cancelled"  # unless it ends otherwise
            try:
                chunks = render(0, None)
                event = first
                while event is not None:
                    chunks += render(*event)
                    for c in chunks:
                        yield sse_bytes(c)
                    chunks = []
                    event = await step()
                for c in tail([answers[i] for i in range(len(questions))]):
                    yield sse_bytes(c)
                outcome = None
            except ClientGone:
                return
            except Exception as e:  # noqa: BLE001 - every failure ends the stream with an event
                outcome = outcome_of(e)
                if not isinstance(e, RagctlError):
                    log.exception("stream failed")
                yield sse_bytes(stream_error(e))
            finally:
                await stop(outcome)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            body_iter(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # -- routes ----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        request: Request, body: ChatCompletionRequest
    ) -> JSONResponse | StreamingResponse | Response:
        created = int(time.time())
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:

            def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> dict:
                return {
                    "id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                 "logprobs": None}],
                    **more,
                }  # fmt: skip

            def render(i: int, event: str | Answer | None) -> list[dict[str, Any]]:
                if event is None:
                    return [chunk({"role": "assistant", "content": ""})]
                if isinstance(event, str):
                    return [chunk({"content": event})]
                return [chunk({}, event.finish_reason, ragctl=ragctl_field(event, body))]

            def tail(answers: list[Answer]) -> list[dict[str, Any]]:
                if body.stream_options is not None and body.stream_options.include_usage:
                    return [{**chunk({}), "choices": [], "usage": usage_of(answers)}]
                return []

            return await stream_all(request, body, [body.question()], body.history(), render, tail)
        try:
            [answer] = await answer_all(request, body, [body.question()], body.history())
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason, "logprobs": None,
            }],
            "usage": usage_of([answer]), "ragctl": ragctl_field(answer, body),
        })  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(
        request: Request, body: CompletionRequest
    ) -> JSONResponse | StreamingResponse | Response:
        created = int(time.time())
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:

            def chunk(i: int, text: str, finish: str | None = None, **more: Any) -> dict:
                return {
                    "id": rid, "object": "text_completion", "created": created,
                    "model": body.model,
                    "choices": [{"index": i, "text": text, "finish_reason": finish,
                                 "logprobs": None, **more}],
                }  # fmt: skip

            def render(i: int, event: str | Answer | None) -> list[dict[str, Any]]:
                if event is None:
                    return []
                if isinstance(event, str):
                    return [chunk(i, event)]
                return [chunk(i, "", event.finish_reason, ragctl=ragctl_field(event, body))]

            def tail(answers: list[Answer]) -> list[dict[str, Any]]:
                if body.stream_options is not None and body.stream_options.include_usage:
                    return [{**chunk(0, ""), "choices": [], "usage": usage_of(answers)}]
                return []

            return await stream_all(request, body, body.prompts(), (), render, tail)
        try:
            answers = await answer_all(request, body, body.prompts())
        except ClientGone:
            return Response(status_code=499)
        extras = [ragctl_field(a, body) for a in answers]
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "choices": [
                {"index": i, "text": a.text, "finish_reason": a.finish_reason,
                 "logprobs": None, "ragctl": extras[i]}
                for i, a in enumerate(answers)
            ],
            "usage": usage_of(answers),
            "ragctl": extras[0] if len(extras) == 1 else None,
        })  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in served_models()]}

    @app.get("/v1/models/{owner}/{name}")
    async def model(owner: str, name: str) -> JSONResponse:
        model_id = f"{owner}/{name}"
        if model_id not in served_models():
            return error_response(404, f"the model {model_id!r} does not exist", "model_not_found")
        return JSONResponse(model_card(model_id))

    @app.get("/health")
    async def health() -> JSONResponse:
        s = svc()
        try:
            kv = await asyncio.wait_for(s.engine.kv_state(), timeout=10)
        except (RagctlError, TimeoutError) as e:
            return error_response(503, f"engine unhealthy: {e}", "engine_unavailable")
        return JSONResponse({
            "status": "ok", "engine": s.engine.name,
            "collections": sorted(s.controllers), "default_collection":
            options.default_collection, "kv_free_blocks": kv.free_blocks,
            "kv_total_blocks": kv.total_blocks, "inflight": inflight,
            **({"engines": [
                {"engine": n, "healthy": h, "kv_reserved_blocks": r}
                for n, h, r in s.engines()
            ]} if len(s.admission.slots) > 1 else {}),
        })  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        s = svc()
        try:
            kv = await asyncio.wait_for(s.engine.kv_state(), timeout=10)
        except (RagctlError, TimeoutError):
            kv = None  # the engine's gauges keep their last values
        body = metrics.render(
            kv, s.admission.ledger.reserved, s.admission.waiting, s.slo.snapshot(), s.engines()
        )
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class GuardMiddleware:
    """API key and body size on /v1 routes, before the body is read. Pure ASGI (not
    `BaseHTTPMiddleware`), so the route still sees the client's disconnect."""

    def __init__(self, app: Any, options: ServerOptions) -> None:
        self.app = app
        self.options = options

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            refusal = self.refuse(dict(scope["headers"]))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refuse(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        key = self.options.api_key
        if key is not None:
            auth = headers.get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, key.encode()):
                e = Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')")
                return error_response(401, str(e), e.code)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.options.max_body_bytes:
            e2 = RequestTooLarge(
                f"request body of {int(length)} bytes exceeds the limit of "
                f"{self.options.max_body_bytes} bytes"
            )
            return error_response(413, str(e2), e2.code)
        return None


async def until_done(
    request: Request,
    work: Coroutine[Any, Any, T] | asyncio.Future[T],
    deadline_ms: float | None,
    *,
    arrival: float | None = None,
) -> T:
    """Await `work`, cancelling it (and so its engine calls) when the client disconnects or
    the deadline (`deadline_ms` after `arrival`, a monotonic time; default: now) passes."""
    task = asyncio.ensure_future(work)
    if arrival is None:
        arrival = time.monotonic()
    deadline = None if deadline_ms is None else arrival + deadline_ms / 1000
    try:
        while True:
            timeout = DISCONNECT_POLL_S
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if done:
                return task.result()
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"no answer within the request's deadline of {deadline_ms:g} ms; its engine "
                    "calls were stopped"
                )
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def ragctl_field(answer: Answer, opts: RagctlOptions) -> dict[str, Any]:
    """The response's namespaced `ragctl` field: the Decision, chunks, tokens and timings."""
    d = answer.to_dict()
    d.pop("answer", None)
    slo = answer.decision.slo
    # The SLO in force: the request's own, else the collection's default.
    d["slo_ms"] = slo.slo_ms if slo is not None else opts.slo_ms
    return d


def usage_of(answers: list[Answer]) -> dict[str, int]:
    """Tokens the engine processed for these answers (all calls of all stages)."""
    prompt = sum(a.tokens["prompt"] for a in answers)
    output = sum(a.tokens["output"] for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "ragctl"}


def sse_bytes(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def stream_error(e: BaseException) -> dict[str, Any]:
    """The error event that ends a stream which had started (OpenAI's error body)."""
    if isinstance(e, RagctlError):
        status, code = e.http_status, e.code
        message = str(e)
    else:
        status, code = 500, "internal_error"
        message = f"internal error: {type(e).__name__}: {e}"
    return openai_error(message, error_type(status), code, ERROR_PARAMS.get(code or ""))
