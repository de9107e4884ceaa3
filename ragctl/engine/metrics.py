"""Reading a vLLM server's KV cache and queue state from its Prometheus `/metrics` text.

Pure parsing, no I/O: `parse_metrics(text)` gives `EngineStats`, `kv_state_from_stats` turns them
into the engine-neutral `KVState`. vLLM exports no free-block gauge, only the used fraction
(`vllm:kv_cache_usage_perc`, updated once per stats interval) and the block totals as labels of
`vllm:cache_config_info`; free blocks are derived from the two.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ragctl.errors import MetricsError
from ragctl.types import KVState

CACHE_CONFIG = "vllm:cache_config_info"
KV_USAGE = "vllm:kv_cache_usage_perc"
# The same gauge before vLLM 0.10 renamed it.
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


@dataclass(frozen=True)
class EngineStats:
    """One scrape of a vLLM server, summed over its engines (data-parallel ranks)."""

    kv_cache_usage: float
    """Used fraction of the usable KV blocks, 0-1 (block-weighted mean over engines)."""
    num_gpu_blocks: int
    """KV blocks allocated, including each engine's reserved null block."""
    block_size: int
    """Tokens per block."""
    num_requests_running: int
    num_requests_waiting: int
    num_engines: int = 1


def parse_metrics(text: str, model_name: str | None = None) -> EngineStats:
    """Parse vLLM's `/metrics` text. With `model_name`, only samples labelled with that model
    (and the engines serving it) count."""
    samples = _samples_by_name(text)
    if CACHE_CONFIG not in samples:
        raise MetricsError(f"not a vLLM server: /metrics has no {CACHE_CONFIG}")
    usage_name = KV_USAGE_OLD if KV_USAGE_OLD in samples and KV_USAGE not in samples else KV_USAGE
    for name in (usage_name, RUNNING, WAITING):
        if name not in samples:
            raise MetricsError(f"vLLM /metrics has {CACHE_CONFIG} but no {name}")

    usage = _for_model(samples[usage_name], model_name, usage_name)
    running = _for_model(samples[RUNNING], model_name, RUNNING)
    waiting = _for_model(samples[WAITING], model_name, WAITING)

    # cache_config_info carries no model_name label; tie it to the model via the engines that
    # report usage for that model.
    engines = {s.labels.get("engine") for s in usage}
    configs = [
        s
        for s in samples[CACHE_CONFIG]
        if "engine" not in s.labels or s.labels["engine"] in engines
    ]
    if not configs:
        raise MetricsError(f"vLLM /metrics has no {CACHE_CONFIG} for engine(s) {sorted(engines)}")

    blocks: dict[str | None, int] = {}
    sizes: set[int] = set()
    for s in configs:
        blocks[s.labels.get("engine")] = _int_label(s, "num_gpu_blocks")
        sizes.add(_int_label(s, "block_size"))
    if len(sizes) != 1:
        raise MetricsError(f"vLLM engines report different block sizes: {sorted(sizes)}")

    # Weight each engine's usage by its usable blocks, so the mean is the fleet's used share.
    usable = {e: max(n - 1, 0) for e, n in blocks.items()}
    weight = sum(usable.get(s.labels.get("engine"), 0) for s in usage)
    if weight:
        mean_usage = sum(s.value * usable.get(s.labels.get("engine"), 0) for s in usage) / weight
    else:
        mean_usage = sum(s.value for s in usage) / len(usage)

    return EngineStats(
        kv_cache_usage=min(max(mean_usage, 0.0), 1.0),
        num_gpu_blocks=sum(blocks.values()),
        block_size=sizes.pop(),
        num_requests_running=round(sum(s.value for s in running)),
        num_requests_waiting=round(sum(s.value for s in waiting)),
        num_engines=len(blocks),
    )


def kv_state_from_stats(stats: EngineStats) -> KVState:
    """Blocks usable by requests (each engine keeps one null block aside) and the free share of
    them; as fresh as the server's last stats update."""
    total = max(stats.num_gpu_blocks - stats.num_engines, 0)
    free = min(max(round(total * (1.0 - stats.kv_cache_usage)), 0), total)
    return KVState(total, free, stats.block_size, source="metrics")


def _samples_by_name(text: str) -> dict[str, list[Sample]]:
    # Keyed by sample name, not family name: the parser strips suffixes such as `_total` from
    # family names, while sample names are what the server wrote.
    out: dict[str, list[Sample]] = defaultdict(list)
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name].append(s)
    except (ValueError, IndexError, KeyError) as e:
        raise MetricsError(f"not a vLLM server: /metrics is not Prometheus text ({e})") from e
    return out


def _for_model(samples: Iterable[Sample], model_name: str | None, metric: str) -> list[Sample]:
    samples = list(samples)
    if model_name is None:
        return samples
    chosen = [s for s in samples if s.labels.get("model_name") == model_name]
    if not chosen:
        served = sorted({s.labels.get("model_name", "?") for s in samples})
        raise MetricsError(
            f"vLLM /metrics has no {metric} for model {model_name!r} (it reports: "
            f"{', '.join(served)})"
        )
    return chosen


def _int_label(sample: Sample, label: str) -> int:
    raw = sample.labels.get(label)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MetricsError(
            f"vLLM {CACHE_CONFIG} has {label}={raw!r}, not an integer (engine not ready?)"
        ) from None
