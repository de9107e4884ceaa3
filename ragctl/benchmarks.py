"""Measurements behind `ragctl bench ...` (figures go to eval/RESULTS.md).

- `overhead`: the controller's own cost per query, LLM calls excluded (rules, best-fit with the
  call sizing, reservation bookkeeping, the Decision record), over synthetic decisions.
- `agreement`: what the profiler says against what a dataset annotates (confusion tables).
- `pressure`: many adaptive queries at once on a small KV cache.
- `configs_bench`, `overhead_bench`, `profiler_bench`, `pressure_bench`, `load_bench`: the whole
  `ragctl bench` runs (open, measure, write results.json); the CLI only parses and renders.
The summaries are pure functions over plain rows, so the same rows can be re-summarised later.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragctl.controller import Controller
from ragctl.errors import InvalidRequest
from ragctl.policy import adaptive_decision, best_fit, resolve_space
from ragctl.profiler import ProfileOutcome
from ragctl.rules import RuleSet
from ragctl.scheduler import KVLedger
from ragctl.synthesis.methods import Synthesizer
from ragctl.types import Chunk, Config, KVState, Profile, Query

# -- controller overhead ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0-1) by linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def synthetic_profile(rng: random.Random) -> ProfileOutcome:
    lo = rng.randint(30, 200)
    profile = Profile(
        complexity=rng.choice(["high", "low"]),
        joint_reasoning=rng.random() < 0.5,
        pieces=rng.randint(1, 10),
        summary_length=(lo, rng.randint(lo, 200)),
        confidence=rng.random(),
    )
    return ProfileOutcome(profile=profile, error=None, error_kind=None, seconds=0.0, template="v1")


def overhead_run(
    synthesizer: Synthesizer,
    rules: RuleSet,
    pool: Sequence[Chunk],
    *,
    decisions: int = 1000,
    seed: int = 0,
    threshold: float = 0.9,
    buffer_blocks: int = 1,
) -> dict[str, Any]:
    """Time `decisions` synthetic decisions through the controller's own decision code: random
    profiles and KV states, `rules.max_num_chunks` chunks drawn from `pool` (real chunks: repeats
    hit the sizing cache as they do in service), the real tokenizer and rules."""
    rng = random.Random(seed)
    ledger = KVLedger()
    history: list[Any] = []
    total_s, sizing_s = [], []
    reasons: Counter[str] = Counter()
    k = min(rules.max_num_chunks, len(pool))
    templates = {**synthesizer.template_versions, "profiler.profile": "v1"}
    for _ in range(decisions):
        outcome = synthetic_profile(rng)
        chunks = rng.sample(list(pool), k)
        kv_total = rng.choice([64, 182, 1024, 8192])
        kv = KVState(kv_total, rng.randint(0, kv_total), 128, "synthetic")
        held = [ledger.reserve(rng.randint(0, 8)) for _ in range(rng.randint(0, 3))]

        t0 = time.perf_counter()
        choice = resolve_space(outcome, rules, history[-10:], threshold)
        if choice.profile_used:
            history.append(choice.space)
        t1 = time.perf_counter()
        sizer = synthesizer.sizer("Which river flows through the city named here?", chunks)
        t2 = time.perf_counter()
        plan = best_fit(choice, sizer, len(chunks), buffer_blocks)(kv, ledger.reserved)
        if plan.config is not None:
            with ledger.reserve(plan.need_blocks):
                adaptive_decision(plan, kv, choice, outcome, templates, False).to_dict()
        t3 = time.perf_counter()

        for r in held:
            r.release()
        total_s.append(t3 - t0)
        sizing_s.append(t2 - t1)
        reasons[plan.reason] += 1
    policy_s = [t - s for t, s in zip(total_s, sizing_s, strict=True)]
    ms = 1000.0
    return {
        "decisions": decisions,
        "chunks_per_decision": k,
        "total_ms": {"p50": percentile(total_s, 0.5) * ms, "p99": percentile(total_s, 0.99) * ms},
        "policy_ms": {
            "p50": percentile(policy_s, 0.5) * ms,
            "p99": percentile(policy_s, 0.99) * ms,
        },
        "sizing_ms": {
            "p50": percentile(sizing_s, 0.5) * ms,
            "p99": percentile(sizing_s, 0.99) * ms,
        },
        "reasons": dict(reasons),
        "ledger_reserved_after": ledger.reserved,
    }


# -- profiler agreement -------------------------------------------------------------------------


def annotated_class(dataset: str, query: Query) -> str:
    """The query's class as the dataset annotates it."""
    extra = query.extra
    if dataset == "musique":
        return f"{extra.get('hops', '?')}-hop"
    if dataset == "finsec":
        return str(extra.get("question_type", "?"))
    if dataset == "qmsum":
        return str(extra.get("query_type", "?"))
    return "single-fact"


def expects_joint(dataset: str, cls: str) -> bool | None:
    """What the annotation implies for joint reasoning (None: it does not say)."""
    if dataset == "squad":
        return False
    if dataset == "musique":
        return True
    if dataset == "finsec":
        return cls != "Single-Doc Single-Chunk RAG"
    if dataset == "qmsum":
        return True if cls == "general" else None
    return None


def spread_by_class(dataset: str, queries: Sequence[Query], n: int) -> list[Query]:
    """`n` queries taken round-robin over the annotated classes, in file order within each, so
    a small sample covers every class (files are often sorted by class)."""
    by_class: dict[str, list[Query]] = {}
    for q in queries:
        by_class.setdefault(annotated_class(dataset, q), []).append(q)
    picked: list[Query] = []
    queues = [list(reversed(v)) for _, v in sorted(by_class.items())]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked


def pieces_bucket(pieces: int) -> str:
    return "1" if pieces == 1 else "2-3" if pieces <= 3 else "4+"


@dataclass(frozen=True)
class AgreementRow:
    query_id: str
    cls: str
    profile: Profile | None
    error: str | None
    seconds: float


def agreement_tables(dataset: str, rows: Sequence[AgreementRow]) -> dict[str, Any]:
    """Confusion tables (annotated class x predicted value) for joint reasoning, pieces and
    complexity, and how often joint reasoning matched what the annotation implies."""
    tables: dict[str, dict[str, Counter[str]]] = {"joint": {}, "pieces": {}, "complexity": {}}
    match = total = failed = 0
    conf = []
    for r in rows:
        if r.profile is None:
            failed += 1
            for t in tables.values():
                t.setdefault(r.cls, Counter())["failed"] += 1
            continue
        p = r.profile
        tables["joint"].setdefault(r.cls, Counter())["yes" if p.joint_reasoning else "no"] += 1
        tables["pieces"].setdefault(r.cls, Counter())[pieces_bucket(p.pieces)] += 1
        tables["complexity"].setdefault(r.cls, Counter())[p.complexity] += 1
        if p.confidence is not None:
            conf.append(p.confidence)
        want = expects_joint(dataset, r.cls)
        if want is not None:
            total += 1
            match += p.joint_reasoning == want
    return {
        "dataset": dataset,
        "queries": len(rows),
        "failed": failed,
        "joint_agreement": match / total if total else None,
        "joint_scored": total,
        "mean_confidence": statistics.fmean(conf) if conf else None,
        "mean_seconds": statistics.fmean(r.seconds for r in rows) if rows else None,
        "tables": {name: {cls: dict(c) for cls, c in t.items()} for name, t in tables.items()},
    }


async def agreement_run(
    profiler: Any, dataset: str, metadata: str, chunk_tokens: int, queries: Sequence[Query]
) -> list[AgreementRow]:
    """Profile every query (one at a time: profiler latency, not throughput)."""
    rows = []
    for q in queries:
        outcome = await profiler.profile(q.question, metadata, chunk_tokens, collection=dataset)
        rows.append(
            AgreementRow(
                q.id, annotated_class(dataset, q), outcome.profile, outcome.error, outcome.seconds
            )
        )
    return rows


# -- memory pressure ----------------------------------------------------------------------------


async def pressure_run(
    controller: Controller, questions: Sequence[str], *, stagger_s: float = 0.0
) -> list[dict[str, Any]]:
    """All questions at once (or `stagger_s` apart), adaptively; one row per answer in the order
    its configuration was decided."""
    t0 = time.perf_counter()

    async def one(i: int, q: str) -> dict[str, Any]:
        await asyncio.sleep(i * stagger_s)
        start = time.perf_counter() - t0
        a = await controller.aask(q)
        d = a.decision
        return {
            "i": i,
            "arrived_s": start,
            "decided_s": start + _decided_after(a),
            "config": d.config.label,
            "reason": d.reason,
            "queued": d.queued,
            "queue_s": a.timings.get("queue", 0.0),
            "need_blocks": d.need_blocks,
            "free_blocks": d.kv.free_blocks if d.kv else None,
            "reserved_blocks": d.reserved_blocks,
            "total_blocks": d.kv.total_blocks if d.kv else None,
            "space": d.space.to_dict() if d.space else None,
            "seconds": a.timings["total"],
            "answered": bool(a.text is not None),
        }

    rows = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    return sorted(rows, key=lambda r: r["decided_s"])


def _decided_after(answer: Any) -> float:
    """Seconds from arrival to the configuration decision (retrieval ‖ profile, then queue)."""
    t = answer.timings
    return max(t.get("retrieve", 0.0), t.get("profile", 0.0)) + t.get("queue", 0.0)


# -- the `ragctl bench` runs ------------------------------------------------------------------
# Each takes what opens the controller or shows progress from the caller (the CLI passes its
# progress bars), runs the measurement, writes its files and returns what it wrote.

OpenController = Callable[[Any, str], Awaitable[Controller]]
Status = Callable[[str], AbstractContextManager[Any]]
Tally = Callable[[str, int], AbstractContextManager[Callable[[], None]]]


def parse_systems(text: str) -> list[Config | None]:
    """`ragctl` (adaptive, None) or a fixed `method:chunks[:ilen]`, comma-separated."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InvalidRequest("--systems is empty")
    try:
        return [None if n == "ragctl" else Config.parse(n) for n in names]
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def system_label(config: Config | None) -> str:
    return "ragctl" if config is None else config.label


def _write_json(path: Path, data: Any, end: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + end)


async def configs_bench(
    settings: Any,
    dataset: str,
    questions: int,
    configs: Sequence[Config | None],
    out_dir: Path,
    *,
    open_controller: OpenController,
    tally: Tally,
) -> dict[str, Any]:
    """ragctl and fixed configurations on the same questions, interleaved, one at a time;
    writes samples.jsonl and results.json to `out_dir`, returns the results."""
    from ragctl.retrieval.collection import load_queries

    queries = load_queries(settings.data_dir, dataset)[:questions]
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    controller = await open_controller(settings, dataset)
    startup = time.perf_counter() - t
    samples = []
    try:
        # The first call pays one-off costs (loading the embedding model, the engine's first
        # batch); report it apart instead of charging it to whichever system runs first.
        t = time.perf_counter()
        await controller.aask(queries[0].question, Config("stuff", 1))
        warmup = time.perf_counter() - t
        with (
            tally("bench", len(queries) * len(configs)) as advance,
            open(out_dir / "samples.jsonl", "w") as f,
        ):
            for q in queries:
                # Interleaved: every system sees the same machine conditions.
                for cfg in configs:
                    a = await controller.aask(q.question, cfg)
                    row = {"query_id": q.id, "system": system_label(cfg),
                           "gold": list(q.answers[:1]), "gold_doc_ids": list(q.gold_doc_ids),
                           **a.to_dict()}  # fmt: skip
                    samples.append(row)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    advance()
    finally:
        await controller.aclose()
    result = {
        "dataset": dataset,
        "questions": len(queries),
        "model": settings.model or "embedded:SmolLM2-135M-Instruct",
        "engine": settings.engine_url or "in-process",
        "engine_startup_seconds": round(startup, 2),
        "warmup_seconds": round(warmup, 2),
        "systems": configs_summary(samples),
    }
    _write_json(out_dir / "results.json", result)
    return result


def configs_summary(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: latency, profiler share, tokens, calls, evidence recall, configurations."""
    by_system: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_system.setdefault(s["system"], []).append(s)
    summary = {}
    for label, rows in by_system.items():
        secs = [r["timings"]["total"] for r in rows]
        recall = [
            len(set(r["gold_doc_ids"]) & set(r["doc_ids"])) / len(r["gold_doc_ids"])
            for r in rows if r["gold_doc_ids"]
        ]  # fmt: skip
        profile = [r["timings"]["profile"] for r in rows if "profile" in r["timings"]]
        configs = Counter(r["config"] for r in rows)
        summary[label] = {
            "n": len(rows),
            "mean_seconds": statistics.fmean(secs),
            "p50_seconds": statistics.median(secs),
            "p95_seconds": percentile(secs, 0.95),
            # Profiler time over end-to-end time, summed over the questions.
            "profile_share": sum(profile) / sum(secs) if profile else None,
            "profile_mean_seconds": statistics.fmean(profile) if profile else None,
            "prompt_tokens": sum(r["tokens"]["prompt"] for r in rows),
            "output_tokens": sum(r["tokens"]["output"] for r in rows),
            "calls": sum(r["tokens"]["calls"] for r in rows),
            "evidence_recall": statistics.fmean(recall) if recall else 0.0,
            "configs": dict(configs.most_common()),
        }
    return summary


def overhead_bench(
    settings: Any,
    card: Any,
    rules: RuleSet,
    tokenizer: Any,
    pool: Sequence[Chunk],
    out_dir: Path,
    *,
    decisions: int,
    seed: int,
) -> dict[str, Any]:
    """`overhead_run` with the serving tokenizer and the collection's chunks; writes
    results.json to `out_dir`."""
    answer_tokens = settings.answer_max_tokens or card.answer_max_tokens
    synthesizer = Synthesizer(tokenizer, settings.max_model_len, answer_tokens)
    result = overhead_run(synthesizer, rules, pool, decisions=decisions, seed=seed)
    _write_json(out_dir / "results.json", result)
    return result


async def profiler_bench(
    settings: Any, datasets: Sequence[str], questions: int, out_dir: Path, *, status: Status
) -> dict[str, Any]:
    """`agreement_tables` per dataset over `questions` spread across its annotated classes;
    writes results.json to `out_dir` and returns it."""
    from ragctl.engine import open_engine
    from ragctl.retrieval.collection import check_dataset, load_queries
    from ragctl.service import open_profiler

    cards = {d: check_dataset(settings.data_dir, d) for d in datasets}
    # Spread over each dataset's annotated classes, so every row of the tables is filled.
    queries = {
        d: spread_by_class(d, load_queries(settings.data_dir, d), questions) for d in datasets
    }
    with status(f"starting the engine ({settings.engine_url or 'in-process'})"):
        engine = await open_engine(settings)
    profiler = await open_profiler(settings, engine)
    try:
        results = {}
        for d in datasets:
            card = cards[d]
            with status(f"profiling {len(queries[d])} {d} questions"):
                rows = await agreement_run(
                    profiler, d, card.metadata, card.chunking.size, queries[d]
                )
            results[d] = agreement_tables(d, rows)
    finally:
        await profiler.aclose()
        await engine.aclose()
    profiler_model = settings.profiler_model or settings.profiler_url or settings.model
    payload = {"profiler": profiler_model or "embedded:SmolLM2-135M-Instruct", **results}
    _write_json(out_dir / "results.json", payload)
    return payload


async def pressure_bench(
    settings: Any,
    dataset: str,
    questions: int,
    stagger_ms: float,
    out_dir: Path,
    *,
    open_controller: OpenController,
) -> dict[str, Any]:
    """`pressure_run` after one warm-up call; writes results.json to `out_dir`."""
    from ragctl.retrieval.collection import load_queries

    qs = [q.question for q in load_queries(settings.data_dir, dataset)[:questions]]
    controller = await open_controller(settings, dataset)
    try:
        await controller.aask(qs[0], Config("stuff", 1))  # warm-up, not counted
        rows = await pressure_run(controller, qs, stagger_s=stagger_ms / 1000)
        counters = dict(controller.counters)
    finally:
        await controller.aclose()
    result = {
        "dataset": dataset,
        "questions": len(qs),
        "answered": sum(r["answered"] for r in rows),
        "kv_cache_blocks": settings.kv_cache_blocks,
        "counters": counters,
        "rows": rows,
    }
    _write_json(out_dir / "results.json", result)
    return result
