"""A bounded, self-terminating load test of a running ragctl server with the official `openai`
client: N chat requests at concurrency C. Every request ends as answered, rejected (429/503,
the server's admission control), failed (another status, an error event mid-stream) or timed
out; none is retried, so the counts add up to N and nothing can be lost silently.

Time to first token, client side: with `stream=True`, arrival to the first content delta; without,
the whole answer (a client that reads a complete response, or a server that replays a finished
answer as deltas, sees its first token when the answer is done): that is the baseline streaming
is measured against."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragctl.benchmarks import _write_json, percentile


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    """Arrival-to-answer seconds of the answered requests."""
    ttfts_s: list[float] = field(default_factory=list)
    """Arrival to the first answer token, the answered requests (see the module notes)."""
    stream: bool = False
    rejected: Counter[int] = field(default_factory=Counter)
    """Status (429, 503) -> count."""
    failed: Counter[str] = field(default_factory=Counter)
    """Anything else: `status 502`, `timeout`, `connection`."""
    configs: Counter[str] = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)
    """One per answered request: question index, whether it streamed, TTFT and latency."""
    alternate: bool = False

    @property
    def completed(self) -> int:
        return len(self.latencies_s)

    @property
    def accounted(self) -> int:
        return self.completed + sum(self.rejected.values()) + sum(self.failed.values())

    def to_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        ttft = self.ttfts_s
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "stream": self.stream,
            "completed": self.completed,
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
            "failed": dict(self.failed),
            "p50_s": percentile(lat, 0.5) if lat else None,
            "p95_s": percentile(lat, 0.95) if lat else None,
            "max_s": lat[-1] if lat else None,
            "mean_s": sum(lat) / len(lat) if lat else None,
            "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
            "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
            "ttft_p95_s": percentile(ttft, 0.95) if ttft else None,
            "wall_s": self.wall_s,
            "throughput_qps": self.completed / self.wall_s if self.wall_s else 0.0,
            "configs": dict(self.configs.most_common()),
            **({"by_mode": self.by_mode(), "samples": self.samples} if self.alternate else {}),
        }

    def by_mode(self) -> dict[str, dict[str, Any]]:
        """Alternating runs: TTFT and latency of the streamed and of the whole answers."""
        out = {}
        for name, streamed in (("streamed", True), ("whole", False)):
            rows = [r for r in self.samples if r["stream"] is streamed]
            ttft = sorted(r["ttft_s"] for r in rows)
            lat = sorted(r["latency_s"] for r in rows)
            out[name] = {
                "n": len(rows),
                "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
                "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
                "mean_s": sum(lat) / len(lat) if lat else None,
                "p50_s": percentile(lat, 0.5) if lat else None,
            }
        return out

    def pairs(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Alternating runs: (streamed, whole) samples of the same question, where both were
        answered."""
        by_q: dict[int, dict[bool, dict[str, Any]]] = {}
        for r in self.samples:
            by_q.setdefault(r["question"], {})[r["stream"]] = r
        return [(m[True], m[False]) for _, m in sorted(by_q.items()) if len(m) == 2]


async def chat_load(
    base_url: str,
    questions: Sequence[str],
    *,
    requests: int = 50,
    concurrency: int = 50,
    model: str = "ragctl/auto",
    api_key: str | None = None,
    timeout_s: float = 600.0,
    extra_body: dict[str, Any] | None = None,
    stream: bool = False,
    max_tokens: int | None = None,
    alternate: bool = False,
) -> LoadResult:
    """Send `requests` chat requests (questions cycled), at most `concurrency` at once;
    `stream`: as SSE streams (time to first token = the first content delta). `alternate`:
    each question twice in a row, once streamed and once whole, the one that goes first
    alternating from question to question (so neither mode gets the other's prefix cache or
    warm-up more often); `requests` counts both."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=base_url.rstrip("/") + "/v1",
        api_key=api_key or "none",
        max_retries=0,  # a retry would hide a rejection
        timeout=timeout_s,
    )
    gate = asyncio.Semaphore(concurrency)
    result = LoadResult(requests, concurrency, 0.0, stream=stream, alternate=alternate)
    sampling = {} if max_tokens is None else {"max_tokens": max_tokens}

    async def ask(q: str, t: float, stream: bool) -> tuple[float, dict[str, Any]]:
        """(time to first token, the response's `ragctl` field)."""
        messages = [{"role": "user", "content": q}]
        if not stream:
            resp = await client.chat.completions.create(
                model=model, messages=messages, extra_body=extra_body, **sampling
            )
            return time.perf_counter() - t, (resp.model_extra or {}).get("ragctl") or {}
        first, extra = None, {}
        events = await client.chat.completions.create(
            model=model, messages=messages, extra_body=extra_body, stream=True, **sampling
        )
        async with events:
            async for chunk in events:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t
                extra = (chunk.model_extra or {}).get("ragctl") or extra
        return (time.perf_counter() - t) if first is None else first, extra

    async def one(i: int) -> None:
        index, streamed = alternating(i) if alternate else (i, stream)
        q = questions[index % len(questions)]
        async with gate:
            t = time.perf_counter()
            try:
                ttft, extra = await ask(q, t, streamed)
            except openai.APIStatusError as e:
                if e.status_code in (429, 503):
                    result.rejected[e.status_code] += 1
                else:
                    result.failed[f"status {e.status_code}"] += 1
                return
            except openai.APITimeoutError:
                result.failed["timeout"] += 1
                return
            except openai.APIConnectionError:
                result.failed["connection"] += 1
                return
            except openai.APIError:  # an error event ended the stream
                result.failed["stream error"] += 1
                return
            latency = time.perf_counter() - t
            result.latencies_s.append(latency)
            result.ttfts_s.append(ttft)
            result.samples.append(
                {"question": index, "stream": streamed, "ttft_s": ttft, "latency_s": latency}
            )
            result.configs[str(extra.get("config"))] += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        result.wall_s = time.perf_counter() - start
        await client.close()
    return result


def alternating(i: int) -> tuple[int, bool]:
    """Request `i` of an alternating run: (question index, streamed). Each question twice in a
    row; streamed first on even questions, whole first on odd ones."""
    index = i // 2
    return index, (i % 2 == 0) == (index % 2 == 0)


async def load_bench(
    url: str, questions: Sequence[str], out_file: Path, **options: Any
) -> tuple[Any, dict[str, Any]]:
    """`chat_load` against a running server; writes its figures to `out_file`."""
    result = await chat_load(url, questions, **options)
    d = result.to_dict()
    meta = {k: options.get(k) for k in ("model", "extra_body", "max_tokens")}
    _write_json(out_file, {"url": url, **meta, **d}, end="\n")
    return result, d
