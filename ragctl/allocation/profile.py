"""Measuring each component's latency against batch size on this machine (the I/O half of
`ragctl allocate`).

On an open controller (its engine, profiler and retriever):

1. The query mix: `sample` real questions of the dataset run adaptively through the controller
   (`aask`), so the visits per query of each kind of engine call (profile, rerank, stuff, map,
   reduce) are what ragctl actually chooses on this dataset.
2. CPU components at every thread count 1..CPUs (torch and FAISS threads, restored afterwards):
   query embedding (`embed_queries` of b questions) and FAISS search (`search_vectors` of b
   query vectors at the rules' largest k); `repeats` timings per point, the median kept.
3. Engine components: b profiler calls at once (b different questions), and for each synthesis
   kind the sample used, b real calls of that kind at once (`engine.generate`): planned by the
   controller's synthesizer with the configuration the sample chose most for its method, over
   different chunks and questions where the kind has them (rerank, map, stuff) and as copies of
   one call for the reducer (whose prompt needs a mapper run first). `engine_repeats` timings.

Nothing here decides anything: the curves and the mix go to `curves` and `milp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragctl.allocation.curves import Curve
from ragctl.engine.base import gather_or_cancel
from ragctl.synthesis import registry
from ragctl.types import Config, GenerationRequest

Status = Callable[[str], None]
"""Called with a line saying what is being measured now."""


@dataclass(frozen=True)
class Mix:
    """What a real sample of queries asked of each component."""

    queries: int
    visits: dict[str, float]
    """Component -> visits (calls) per query."""
    presence: dict[str, float]
    """Component -> share of queries that visit it at all."""
    configs: dict[str, str]
    """Configuration label -> how many sample queries ran it."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "visits": self.visits,
            "presence": self.presence,
            "configs": self.configs,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Measurements:
    mix: Mix
    samples: dict[tuple[str, int | None], dict[int, list[float]]] = field(default_factory=dict)
    """(component, threads or None) -> batch size -> seconds of each repeat."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase (sample, cpu, engine)."""
    notes: list[str] = field(default_factory=list)

    def add(self, component: str, threads: int | None, batch: int, seconds: float) -> None:
        self.samples.setdefault((component, threads), {}).setdefault(batch, []).append(seconds)

    def curves(self, max_segments: int = 2) -> list[Curve]:
        """One fitted curve per (component, threads), through the medians."""
        out = []
        for (component, threads), by_batch in self.samples.items():
            points = {b: statistics.median(v) for b, v in by_batch.items()}
            repeats = min(len(v) for v in by_batch.values())
            out.append(
                Curve.fitted(component, threads, points, repeats=repeats, max_segments=max_segments)
            )
        return out

    def raw(self) -> list[dict[str, Any]]:
        return [
            {"component": c, "threads": t, "seconds": {str(b): v for b, v in sorted(s.items())}}
            for (c, t), s in self.samples.items()
        ]


async def sample_mix(controller: Any, questions: Sequence[str]) -> Mix:
    """Run `questions` adaptively, all at once (the engine batches them, as in serving), and
    count the calls of each component per query."""
    start = time.perf_counter()
    answers = await gather_or_cancel([controller.aask(q) for q in questions])
    n = len(answers)
    calls: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    configs: Counter[str] = Counter()
    component = registry.stage_components()
    for a in answers:
        configs[a.decision.config.label] += 1
        kinds = set()
        for stage in a.stages:
            comp = component.get(stage.name, stage.name)
            calls[comp] += stage.calls
            kinds.add(comp)
        seen.update(kinds)
    visits = {"embed": 1.0, "search": 1.0, "profile": 1.0}
    presence = {"embed": 1.0, "search": 1.0, "profile": 1.0}
    for comp in calls:
        visits[comp] = calls[comp] / n
        presence[comp] = seen[comp] / n
    return Mix(n, visits, presence, dict(configs), time.perf_counter() - start)


def _chosen_config(mix: Mix, method: str) -> Config | None:
    """The configuration the sample ran most for `method`."""
    labels = [(n, lab) for lab, n in mix.configs.items() if lab.startswith(method + ":")]
    return Config.parse(max(labels)[1]) if labels else None


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch (process-wide) and FAISS (OpenMP, this thread) at `n` threads; restored after."""
    import faiss

    try:
        import torch
    except ImportError:  # a remote embedder needs no torch
        torch = None
    old_torch = torch.get_num_threads() if torch is not None else None
    old_faiss = faiss.omp_get_max_threads()
    try:
        if torch is not None:
            torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)
        yield
    finally:
        if torch is not None and old_torch is not None:
            torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_cpu(
    retriever: Any,
    texts: Sequence[str],
    k: int,
    *,
    batch_sizes: Sequence[int],
    threads: Sequence[int],
    repeats: int,
    into: Measurements,
    status: Status | None = None,
) -> None:
    """Embedding and search latency at each batch size and thread count (blocking: run it in
    one worker thread, so FAISS's per-thread setting applies where it runs)."""
    embed = retriever.embed_queries
    search = retriever.search_vectors
    pool = [texts[i % len(texts)] for i in range(max(batch_sizes))]
    vectors = embed(pool)  # also the warm-up (the model loads on first use)
    for t in threads:
        with _threads(t):
            for b in batch_sizes:
                if status:
                    status(f"embed and search: batch {b}, {t} thread{'s' * (t > 1)}")
                batch, vecs = pool[:b], vectors[:b]
                embed(batch)
                search(vecs, k)
                for _ in range(repeats):
                    into.add("embed", t, b, _timed(lambda batch=batch: embed(batch)))
                    into.add("search", t, b, _timed(lambda vecs=vecs: search(vecs, k)))


async def _generate_s(engine: Any, requests: Sequence[GenerationRequest]) -> float:
    t = time.perf_counter()
    await engine.generate(list(requests))
    return time.perf_counter() - t


async def engine_pools(
    controller: Any, mix: Mix, questions: Sequence[str], chunks: Sequence[Sequence[Any]]
) -> dict[str, list[GenerationRequest]]:
    """Real synthesis calls of each kind the sample used, planned like the controller plans
    them (`synthesizer.plan`) with the configuration the sample ran most for the method."""
    synth = controller.synthesizer
    pools: dict[str, list[GenerationRequest]] = {}
    for method in registry.specs():
        comps = method.stage_components
        if not any(mix.visits.get(c, 0) > 0 for c in comps):
            continue
        config = _chosen_config(mix, method.name)
        if config is None:
            continue
        steps = [synth.plan(config, q, ch) for q, ch in zip(questions, chunks, strict=True)]
        pools[comps[0]] = [r for s in steps for r in s.requests]
        # A later stage's prompts hold the earlier stages' outputs (map_reduce's reducer, the
        # mappers' notes): run one query's chain that far.
        step = steps[0]
        for comp in comps[1:]:
            step = step.finish(await controller.engine.generate(step.requests))
            pools[comp] = list(step.requests)
    return pools


async def measure_engine(
    controller: Any,
    questions: Sequence[str],
    pools: dict[str, list[GenerationRequest]],
    *,
    batch_sizes: Sequence[int],
    repeats: int,
    into: Measurements,
    status: Status | None = None,
) -> None:
    """Seconds for b calls of each kind submitted at once: profiler calls (b questions) and each
    synthesis kind in `pools` (its first b calls, cycled when it has fewer)."""
    profiler, info = controller.profiler, controller.collection
    failed = 0
    for b in batch_sizes:
        if status:
            status(f"engine: {b} profiler call{'s' * (b > 1)} at once")
        qs = [questions[i % len(questions)] for i in range(b)]
        for _ in range(repeats):
            t = time.perf_counter()
            outcomes = await asyncio.gather(
                *(
                    profiler.profile(q, info.metadata, info.chunk_tokens, collection=info.name)
                    for q in qs
                )
            )
            into.add("profile", None, b, time.perf_counter() - t)
            failed += sum(not o.ok for o in outcomes)
    if failed:
        into.notes.append(f"{failed} profiler calls gave no profile while measuring (timed anyway)")
    for kind, pool in pools.items():
        for b in batch_sizes:
            if status:
                status(f"engine: {b} {kind} call{'s' * (b > 1)} at once")
            reqs = [pool[i % len(pool)] for i in range(b)]
            for _ in range(repeats):
                into.add(kind, None, b, await _generate_s(controller.engine, reqs))


async def profile_components(
    controller: Any,
    questions: Sequence[str],
    *,
    sample: int,
    batch_sizes: Sequence[int],
    engine_batch_sizes: Sequence[int],
    threads: Sequence[int],
    repeats: int = 3,
    engine_repeats: int = 1,
    status: Status | None = None,
) -> Measurements:
    """The query mix of `sample` of `questions`, then every component's latency curve."""
    if not questions:
        raise ValueError("no questions to profile with")
    if status:
        status(f"running {sample} sample questions adaptively (the query mix)")
    mix = await sample_mix(controller, list(questions[:sample]))
    m = Measurements(mix, seconds={"sample": mix.seconds})
    retriever = getattr(controller.retriever, "inner", controller.retriever)
    k = controller.rules.max_num_chunks

    t = time.perf_counter()
    await asyncio.to_thread(
        measure_cpu, retriever, questions, k, batch_sizes=batch_sizes, threads=threads,
        repeats=repeats, into=m, status=status,
    )  # fmt: skip
    m.seconds["cpu"] = time.perf_counter() - t

    t = time.perf_counter()
    n = max(engine_batch_sizes)
    qs = [questions[i % len(questions)] for i in range(n)]
    if status:
        status("planning real synthesis calls")
    chunks = await asyncio.to_thread(retriever.search_batch, qs, k)
    pools = await engine_pools(controller, mix, qs, chunks)
    skipped = [c for c in registry.stage_components().values() if c not in pools]
    if skipped:
        m.notes.append(f"not measured (the sample never used them): {', '.join(skipped)}")
    await measure_engine(
        controller, qs, pools, batch_sizes=engine_batch_sizes, repeats=engine_repeats, into=m,
        status=status,
    )  # fmt: skip
    m.seconds["engine"] = time.perf_counter() - t
    return m
