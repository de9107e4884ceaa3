"""vLLM in this process (AsyncLLM, v1 engine).

The engine core runs in a child process that vLLM spawns, so a script that builds this engine
needs an `if __name__ == "__main__":` guard. Free KV blocks come from a stat logger that vLLM
calls after every engine step with the scheduler's cache usage; usage is computed from integer
block counts, so the free-block figure is exact as of the last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from ragctl.engine.base import Engine, StepLog, StreamEvent, gather_or_cancel, merge_by_text
from ragctl.engine.tokenizer import Tokenizer
from ragctl.errors import (
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    MissingDependency,
    PromptTooLong,
)
from ragctl.types import Generation, GenerationRequest, KVState

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_GIB = 2.0


class _EngineStats:
    """Written by the stat logger on the engine's output loop: the KV cache's usage (read by
    `kv_state()`) and the engine's steps (`Engine.steps`)."""

    def __init__(self) -> None:
        self.usage = 0.0
        self.steps = StepLog()


def _logprobs_param(req: GenerationRequest) -> int | None:
    """SamplingParams.logprobs: k alternatives per position (vLLM adds the sampled token); 0:
    the sampled token's log-prob only; None: no log-probs."""
    if req.top_logprobs > 0:
        return req.top_logprobs
    return 0 if req.logprobs else None


class LocalEngine(Engine):
    def __init__(
        self, llm: Any, tokenizer: Tokenizer, gauge: _EngineStats, timeout_s: float
    ) -> None:
        self._llm = llm
        self._gauge = gauge
        self.steps = gauge.steps
        self._timeout_s = timeout_s
        self.tokenizer = tokenizer
        cfg = llm.vllm_config
        self.name = cfg.model_config.served_model_name or cfg.model_config.model
        self.max_model_len = cfg.model_config.max_model_len
        self._num_blocks = int(cfg.cache_config.num_gpu_blocks or 0)
        self._block_size = int(cfg.cache_config.block_size)

    @classmethod
    def start(
        cls,
        model: str,
        *,
        tokenizer: str | None = None,
        max_model_len: int = 4096,
        dtype: str = "float32",
        enforce_eager: bool = True,
        kv_cache_gib: float | None = None,
        kv_cache_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        timeout_s: float = 300.0,
        max_num_seqs: int | None = None,
    ) -> LocalEngine:
        """Load `model` (an HF folder or id) into a new engine; ~25-35 s on two CPU cores.
        `max_num_seqs`: most sequences vLLM runs at once (None: vLLM's default)."""
        gib = kv_cache_gib
        if gib is None:
            gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_KV_CACHE_GIB)
        if gib <= 0:
            raise InvalidRequest(f"the KV cache size must be positive, got {gib:g} GiB")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
            from vllm.v1.metrics.loggers import StatLoggerBase
        except ImportError as e:
            raise MissingDependency(
                f"the in-process engine needs vLLM ({e}); install ragctl[cpu] or ragctl[gpu], "
                "or point --engine-url at a running vLLM server"
            ) from e
        if current_platform.is_cpu() and gib != int(gib):
            raise InvalidRequest(
                f"vLLM on CPU sizes its KV cache in whole GiB, got {gib:g}; use "
                "--kv-cache-blocks for a smaller cache"
            )
        # Read by vLLM's CPU worker when it starts; must be in place before the engine spawns.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{gib:g}"
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if os.path.isdir(model):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")

        gauge = _EngineStats()

        class _StatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is not None:
                    gauge.usage = scheduler_stats.kv_cache_usage
                # The inter-token latencies of the sequences that decoded through this step
                # are its duration on the engine core's clock (not when this process, busy
                # with other work, got round to reading it).
                if iteration_stats is not None and iteration_stats.inter_token_latencies_iter:
                    gauge.steps.observe(
                        statistics.median(iteration_stats.inter_token_latencies_iter),
                        iteration_stats.prompt_token_stats.computed,
                        iteration_stats.num_generation_tokens,
                    )

            def log_engine_initialized(self) -> None:
                pass

        extra: dict[str, Any] = {}
        if kv_cache_blocks is not None:
            # Allocated as sized above, but only this many blocks are used.
            extra["num_gpu_blocks_override"] = kv_cache_blocks
        if max_num_seqs is not None:
            if max_num_seqs < 1:
                raise InvalidRequest(f"max_num_seqs must be >= 1, got {max_num_seqs}")
            extra["max_num_seqs"] = max_num_seqs
        if not current_platform.is_cpu():
            if kv_cache_gib is not None:
                extra["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
            else:
                extra["gpu_memory_utilization"] = gpu_memory_utilization
        args = AsyncEngineArgs(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            # Lets callers (later: the SLO loop) move urgent calls ahead.
            scheduling_policy="priority",
            disable_log_stats=True,
            **extra,
        )
        tok = Tokenizer.load(tokenizer or model)
        try:
            # No local name for the engine: something in vLLM keeps this frame alive, and a
            # local would keep the engine alive past aclose().
            return cls(
                AsyncLLM.from_engine_args(args, stat_loggers=[_StatLogger]), tok, gauge, timeout_s
            )
        except Exception as e:
            raise EngineUnavailable(f"could not start vLLM with model {model!r}: {e}") from e

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return await gather_or_cancel([self._one(r) for r in requests])

    async def _one(self, req: GenerationRequest) -> Generation:
        final = None
        async with aclosing(self.stream(req)) as events:
            async for event in events:
                final = event
        assert isinstance(final, Generation)  # `stream` ends with it or raises
        return final

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """AsyncLLM's output stream (cumulative outputs, one per engine step) as text deltas.
        Closing it or cancelling its consumer aborts the request in the engine."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        req = request
        ids = self.tokenizer.encode_request(req)
        self.check_fits(req, len(ids))
        structured = None
        if req.json_schema is not None:
            structured = StructuredOutputsParams(json=dict(req.json_schema))
        elif req.choices is not None:
            structured = StructuredOutputsParams(choice=list(req.choices))
        params = SamplingParams(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(req.stop) or None,
            seed=req.seed,
            logprobs=_logprobs_param(req),
            structured_outputs=structured,
            ignore_eos=req.ignore_eos,
        )
        request_id = f"ragctl-{req.tag or 'call'}-{uuid.uuid4().hex[:12]}"
        start = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        outputs = self._llm.generate(
            {"prompt_token_ids": ids}, params, request_id, priority=req.priority
        )
        final, sent, finished = None, "", False
        try:
            while True:
                try:
                    # The deadline bounds the engine's waits only, not the consumer's time
                    # between tokens (a timeout across a `yield` would hit the consumer).
                    async with asyncio.timeout_at(deadline):
                        final = await anext(outputs)
                except StopAsyncIteration:
                    break
                text = final.outputs[0].text if final.outputs else ""
                # Cumulative text only grows (vLLM holds back a possible stop string).
                if len(text) > len(sent) and text.startswith(sent):
                    delta, sent = text[len(sent) :], text
                    yield delta
            finished = True
        except TimeoutError as e:
            raise EngineTimeout(f"engine call timed out after {self._timeout_s:g}s") from e
        except VLLMValidationError as e:
            if "context length" in str(e):
                raise PromptTooLong(str(e)) from e
            raise InvalidRequest(f"engine rejected the call: {e}") from e
        except EngineDeadError as e:
            raise EngineUnavailable(f"the vLLM engine died: {e}") from e
        except Exception as e:
            raise EngineError(f"engine call failed: {type(e).__name__}: {e}") from e
        finally:
            # AsyncLLM aborts a request whose output stream is closed or cancelled; close it
            # now (not at garbage collection) and abort explicitly too (a no-op when done).
            await outputs.aclose()
            if not finished and self._llm is not None:
                with contextlib.suppress(Exception):
                    await self._llm.abort(request_id)
        if final is None or not final.outputs:
            raise EngineError("engine returned no output")
        out = final.outputs[0]
        logprobs = None
        if req.logprobs and out.logprobs is not None:
            pairs = zip(out.token_ids, out.logprobs, strict=False)
            logprobs = tuple(float(pos[tid].logprob) for tid, pos in pairs)
        top = None
        if req.top_logprobs and out.logprobs is not None:
            top = tuple(self._alternatives(pos) for pos in out.logprobs)
        yield Generation(
            text=out.text,
            prompt_tokens=len(final.prompt_token_ids or ids),
            output_tokens=len(out.token_ids),
            finish_reason=out.finish_reason,
            token_logprobs=logprobs,
            seconds=time.perf_counter() - start,
            top_logprobs=top,
        )

    def _alternatives(self, position: Any) -> dict[str, float]:
        """One position's {token_id: Logprob} (the top-k plus the sampled token) by text."""
        return merge_by_text(
            (
                lp.decoded_token
                if lp.decoded_token is not None
                else self.tokenizer.hf.decode([tid]),
                lp.logprob,
            )
            for tid, lp in position.items()
        )

    async def kv_state(self) -> KVState:
        total = max(self._num_blocks - 1, 0)  # vLLM keeps one null block aside
        free = round(total * (1.0 - self._gauge.usage))
        return KVState(total, free, self._block_size, source="engine-step")

    async def reset_prefix_cache(self) -> bool:
        return self._llm is not None and bool(await self._llm.reset_prefix_cache())

    async def aclose(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        llm.shutdown()
        # Let the cancelled output-handler task finish and collect the engine now: AsyncLLM's
        # __del__ shuts down again, which fails noisily when it only runs at interpreter exit.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            await asyncio.gather(handler, return_exceptions=True)
        del llm, handler
        gc.collect()
