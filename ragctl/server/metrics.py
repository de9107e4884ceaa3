"""The server's Prometheus metrics (`GET /metrics`): `ragctl_` names, base units (seconds,
blocks). Per-request figures are recorded from each Answer's Decision and timings; engine-side
gauges (KV blocks, queue) and the SLO loop's totals are read when scraped."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ragctl.types import Answer, KVState

STAGES = ("retrieve", "profile", "decide", "queue", "synthesis")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
CHUNK_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30)


class SLOCollector:
    """The SLO tracker's totals as of the last scrape (the tracker counts failed requests too,
    which per-answer metrics never see)."""

    def __init__(self) -> None:
        self.snapshot: Mapping[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if not s:
            return
        requests = CounterMetricFamily(
            "ragctl_slo_requests", "Requests that carried an SLO, by outcome.", labels=["outcome"]
        )
        requests.add_metric(["met"], s["met"])
        requests.add_metric(["violated"], s["violated"])
        yield requests
        yield CounterMetricFamily(
            "ragctl_slo_flagged", "Requests flagged as predicted to miss their SLO.",
            value=s["flagged"],
        )  # fmt: skip
        actions = CounterMetricFamily(
            "ragctl_slo_plan_actions",
            "Requests planned with another configuration to meet their SLO, or shed.",
            labels=["action"],
        )
        for action in ("cheaper-config", "below-profile", "unmeetable", "shed"):
            actions.add_metric([action], s[action])
        yield actions
        yield CounterMetricFamily(
            "ragctl_slo_paused_admission_seconds",
            "Time new requests waited at the gate while flagged requests could be saved.",
            value=s["paused_s"],
        )
        yield CounterMetricFamily(
            "ragctl_slo_held_seconds",
            "Time planned requests were held so that their prefill would not push requests in "
            "flight past their deadlines.",
            value=s["held_s"],
        )
        yield CounterMetricFamily(
            "ragctl_slo_held_requests",
            "Planned requests held before their first engine call.",
            value=s["held_requests"],
        )
        prefill = GaugeMetricFamily(
            "ragctl_engine_prefill_token_seconds",
            "What one prompt token of a prefill delays every sequence beside it, fitted on the "
            "engine's own steps (engines that report them).",
            labels=["engine"],
        )
        for engine, costs in (s.get("step_costs") or {}).items():
            if costs is not None:
                prefill.add_metric([engine], costs["prefill_token_ms"] / 1000)
        yield prefill
        yield GaugeMetricFamily(
            "ragctl_slo_attainment_ratio", "Met / requests with an SLO so far.",
            value=s["attainment"] if s["attainment"] is not None else float("nan"),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ragctl_slo_flagged_inflight", "Flagged requests in flight now.",
            value=s["flagged_inflight"],
        )  # fmt: skip


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.slo = SLOCollector()
        r.register(self.slo)
        self.requests = Counter(
            "ragctl_requests", "Requests by model and outcome (ok, invalid, rejected, "
            "cancelled, timeout, error).", ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "ragctl_request_duration_seconds", "Arrival to answer, answered requests.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft_seconds = Histogram(
            "ragctl_time_to_first_token_seconds", "Arrival to the first answer token (map_rerank: "
            "to its chosen answer), answered requests, streamed or not.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "ragctl_stage_duration_seconds", "Seconds per stage of the data path.",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.method = Counter(
            "ragctl_config_method", "Chosen synthesis method.", ["method", "reason"], registry=r
        )
        self.num_chunks = Histogram(
            "ragctl_config_num_chunks", "Chosen chunk count.", buckets=CHUNK_BUCKETS, registry=r
        )
        self.tokens = Counter(
            "ragctl_engine_tokens", "Tokens the engine processed for answers.", ["kind"],
            registry=r,
        )  # fmt: skip
        self.profiler_fallbacks = Counter(
            "ragctl_profiler_fallbacks", "Adaptive requests that did not use their own profile.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.profiler_answers = Counter(
            "ragctl_profiler_answers", "Adaptive requests by the profiler that profiled them "
            "(json, llm or learned).", ["profiler"], registry=r,
        )  # fmt: skip
        self.queued = Counter(
            "ragctl_admission_queued", "Requests that waited for KV cache memory.", registry=r
        )
        self.inflight = Gauge("ragctl_inflight_requests", "Requests being answered.", registry=r)
        self.kv_total = Gauge("ragctl_kv_total_blocks", "Engine KV cache blocks.", registry=r)
        self.kv_free = Gauge("ragctl_kv_free_blocks", "Engine KV blocks free.", registry=r)
        self.kv_reserved = Gauge(
            "ragctl_kv_reserved_blocks", "KV blocks reserved by admitted plans.", registry=r
        )
        self.queue_length = Gauge(
            "ragctl_admission_queue_length", "Requests waiting for KV cache memory.", registry=r
        )
        self.engine_healthy = Gauge(
            "ragctl_engine_healthy", "Engine of the pool in service (1) or out of it (0).",
            ["engine"], registry=r,
        )  # fmt: skip
        self.engine_reserved = Gauge(
            "ragctl_engine_kv_reserved_blocks", "KV blocks reserved by admitted plans, per engine.",
            ["engine"], registry=r,
        )  # fmt: skip
        self.placements = Counter(
            "ragctl_engine_placements", "Answered requests by the engine their plan ran on.",
            ["engine"], registry=r,
        )  # fmt: skip

    def observe_answer(self, model: str, answer: Answer) -> None:
        d = answer.decision
        self.requests.labels(model, "ok").inc()
        total = answer.timings.get("total")
        if total is not None:
            self.request_seconds.labels(model).observe(total)
        ttft = answer.timings.get("ttft")
        if ttft is not None:
            self.ttft_seconds.labels(model).observe(ttft)
        for stage in STAGES:
            if stage in answer.timings:
                self.stage_seconds.labels(stage).observe(answer.timings[stage])
        self.method.labels(d.config.method, d.reason).inc()
        self.num_chunks.observe(d.config.num_chunks)
        tokens = answer.tokens
        self.tokens.labels("prompt").inc(tokens["prompt"])
        self.tokens.labels("output").inc(tokens["output"])
        for flag in d.flags:
            if flag in ("low-confidence", "profiler-error"):
                self.profiler_fallbacks.labels(flag).inc()
        if d.profiler:
            self.profiler_answers.labels(d.profiler).inc()
        if d.profiler_note:
            self.profiler_fallbacks.labels(learned_fallback(d.profiler_note)).inc()
        if d.queued:
            self.queued.inc()
        if d.engine:
            self.placements.labels(d.engine).inc()

    def outcome(self, model: str, outcome: str) -> None:
        self.requests.labels(model, outcome).inc()

    def render(
        self,
        kv: KVState | None,
        reserved: int,
        waiting: int,
        slo: Mapping[str, Any] | None = None,
        engines: Sequence[tuple[str, bool, int]] = (),
    ) -> bytes:
        """`engines`: each engine of the pool as (name, healthy, reserved blocks)."""
        self.slo.snapshot = slo
        for name, healthy, engine_reserved in engines:
            self.engine_healthy.labels(name).set(1 if healthy else 0)
            self.engine_reserved.labels(name).set(engine_reserved)
        if kv is not None:
            self.kv_total.set(kv.total_blocks)
            self.kv_free.set(kv.free_blocks)
        self.kv_reserved.set(reserved)
        self.queue_length.set(waiting)
        return generate_latest(self.registry)


def learned_fallback(note: str) -> str:
    """The `ragctl_profiler_fallbacks` reason of a learned profiler that did not answer:
    learned-error (it raised), learned-unsure (below `learned_min_confidence`) or
    learned-unavailable (no trained model, no retrieval signals)."""
    if note.startswith("learned error"):
        return "learned-error"
    if note.startswith("learned unsure"):
        return "learned-unsure"
    return "learned-unavailable"
