"""The one interface everything above the engine uses: submit a batch of generation calls, stream
one call's tokens, read the KV cache state. Implementations: `LocalEngine` (vLLM in this
process) and `RemoteEngine` (a vLLM server over its OpenAI-compatible API)."""

from __future__ import annotations

import abc
import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

from ragctl.engine.tokenizer import Tokenizer
from ragctl.errors import EngineTimeout, PromptTooLong
from ragctl.types import Generation, GenerationRequest, KVState

T = TypeVar("T")

StreamEvent: TypeAlias = str | Generation
"""What `Engine.stream` yields: text deltas (str) as they are decoded, then the `Generation`."""


STEP_LOG_SIZE = 1024
"""How many of an engine's last steps its `StepLog` keeps (about half a minute of a busy CPU
engine, a few seconds of a GPU one)."""


@dataclass(frozen=True)
class EngineStep:
    """One engine step as the engine's statistics reported it: how long it took and the work
    in it."""

    seconds: float
    prefill_tokens: int
    """Prompt tokens it computed (prefix-cache hits excluded)."""
    decode_tokens: int
    """Tokens it generated (one per sequence it ran)."""


class StepLog:
    """An engine's last steps (`STEP_LOG_SIZE`): what the SLO loop fits a prefill's cost to
    the sequences beside it from (`scheduler.cost.StepCosts`). A step's seconds are what a
    sequence running through it waited for its next token, on the engine's own clock, so a
    step nobody was decoding through (after an idle engine) is not logged."""

    def __init__(self, maxlen: int = STEP_LOG_SIZE) -> None:
        self.steps: deque[EngineStep] = deque(maxlen=maxlen)
        self.count = 0
        """Steps logged so far (the deque forgets the oldest; this does not)."""

    def observe(self, seconds: float, prefill_tokens: int, decode_tokens: int) -> None:
        if seconds > 0 and math.isfinite(seconds):
            self.steps.append(EngineStep(seconds, prefill_tokens, decode_tokens))
            self.count += 1


class Engine(abc.ABC):
    name: str
    """Model name as the engine knows it."""
    tokenizer: Tokenizer
    max_model_len: int
    steps: StepLog | None = None
    """The engine's last steps, when it reports them (the in-process engine does; a remote
    vLLM server's metrics do not time single steps)."""

    @abc.abstractmethod
    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Run the calls concurrently (the engine batches them); results in request order.
        Raises an `EngineError` (or `PromptTooLong`) if any call fails; the others are
        cancelled."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """One call's text as it is decoded: non-empty `str` deltas that join to the final
        text, then the `Generation` (token counts, finish reason, log-probs). Closing the
        iterator early, or cancelling its consumer, aborts the engine call. This default runs
        `generate` and yields the text once (engines that cannot stream, test fakes)."""
        [gen] = await self.generate([request])
        if gen.text:
            yield gen.text
        yield gen

    @abc.abstractmethod
    async def kv_state(self) -> KVState:
        """The KV cache now: total and free blocks, block size."""

    async def check_health(self, timeout_s: float = 5.0) -> None:
        """Raise an `EngineError` when the engine cannot serve (the pool's health check). This
        default reads the KV state within `timeout_s`; `RemoteEngine` asks vLLM's `/health`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.kv_state()
        except TimeoutError as e:
            raise EngineTimeout(f"the engine did not answer within {timeout_s:g}s") from e

    async def reset_prefix_cache(self) -> bool:
        """Empty the engine's prefix cache (so that the next call's delay is a cold one, as the
        outcome grid measures them); True when the engine could. This default cannot."""
        return False

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the engine (stop an in-process engine, close HTTP connections)."""

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def check_fits(self, request: GenerationRequest, prompt_tokens: int) -> None:
        """Refuse a call whose prompt plus output budget exceeds the context window."""
        if prompt_tokens + request.max_tokens > self.max_model_len:
            raise PromptTooLong(
                f"prompt of {prompt_tokens} tokens plus {request.max_tokens} output tokens exceeds "
                f"the model's context of {self.max_model_len} tokens"
            )


async def gather_or_cancel(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await all; on the first failure cancel the rest (so their engine calls are aborted) and
    re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def merge_by_text(alternatives: Iterable[tuple[str, float]]) -> dict[str, float]:
    """One generated position's alternatives as decoded text -> log-prob, tokens that decode to
    the same text merged (log-sum-exp: their probabilities add up), most likely first."""
    merged: dict[str, float] = {}
    for text, logprob in alternatives:
        lp = float(logprob)
        merged[text] = lp if text not in merged else _logaddexp(merged[text], lp)
    return dict(sorted(merged.items(), key=lambda kv: -kv[1]))


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    if hi == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))
