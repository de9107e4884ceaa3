"""Measurements behind `ragctl bench ...` (figures go to eval/RESULTS.md).

- `overhead`: the controller's own cost per query, LLM calls excluded (rules, best-fit with the
  call sizing, reservation bookkeeping, the Decision record), over synthetic decisions.
- `agreement`: what the profiler says against what a dataset annotates (confusion tables).
- `pressure`: many adaptive queries at once on a small KV cache.
The summaries are pure functions over plain rows, so the same rows can be re-summarised later.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragctl.controller import Controller
from ragctl.policy import adaptive_decision, best_fit, resolve_space
from ragctl.profiler import ProfileOutcome
from ragctl.rules import RuleSet
from ragctl.scheduler import KVLedger
from ragctl.synthesis.methods import Synthesizer
from ragctl.types import Chunk, KVState, Profile, Query

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
