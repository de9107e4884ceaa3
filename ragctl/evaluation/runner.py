"""Running an evaluation: every system on the same queries, on one shared engine, interleaved,
under open-loop Poisson arrivals or a closed loop, with each finished query appended to
`samples.jsonl` at once (an interrupted run keeps what finished; `--resume` skips it).
The phases of a whole run are in `ragctl.evaluation.run`.

A job is (query, system). Jobs are interleaved query by query, with the system order rotated
per query, so no system always goes first. Open loop: each system receives queries at `rate`
per second (the merged arrivals are Poisson at rate × systems, seeded); a job starts at its
arrival whatever is still running, and its delay counts from the arrival. Closed loop: N
workers take the next job as soon as they finish one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragctl.controller import Controller
from ragctl.errors import InvalidRequest, RagctlError
from ragctl.evaluation import metrics
from ragctl.evaluation.systems import System, adaptiverag_config, median_config, static_config
from ragctl.evaluation.writers import SampleWriter, read_rows
from ragctl.retrieval.collection import DatasetCard
from ragctl.types import Answer, AnswerOptions, Query


@dataclass(frozen=True)
class Job:
    query: Query
    system: System

    @property
    def key(self) -> tuple[str, str]:
        return (self.system.name, self.query.id)


def interleave(queries: Sequence[Query], systems: Sequence[System]) -> list[Job]:
    """Query by query; the system order rotates by one each query."""
    jobs = []
    for i, q in enumerate(queries):
        k = i % len(systems)
        for s in [*systems[k:], *systems[:k]]:
            jobs.append(Job(q, s))
    return jobs


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """`n` arrival times (seconds from 0) of a Poisson process at `rate` per second."""
    if rate <= 0:
        raise InvalidRequest(f"--rate must be positive, got {rate}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def done_keys(path: Path, rate: float | None) -> set[tuple[str, str]]:
    """(system, query id) of the rows already in `path` for this phase (errors included: a
    query that failed is a result too; a row torn by an interruption is not: it runs again)."""
    if not path.exists():
        return set()
    return {(r["system"], r["query_id"]) for r in read_rows(path)[0] if r.get("rate") == rate}


@dataclass
class Runner:
    """Runs jobs for one dataset on one controller."""

    controller: Controller
    card: DatasetCard
    adaptiverag_table: dict[str, str] | None = None

    async def run_job(self, job: Job) -> tuple[Answer, float | None]:
        """The answer of one system to one query, and the profiler's seconds (if it ran)."""
        s, q = job.system, job.query.question
        ctl = self.controller
        if s.kind == "ragctl":
            options = AnswerOptions(objective=s.objective) if s.objective else None
            answer = await ctl.aask(q, options=options)
            return answer, answer.timings.get("profile")
        if s.kind == "fixed":
            assert s.config is not None
            return await ctl.aask(q, s.config), None
        if s.kind == "static":
            if self.adaptiverag_table is None:
                raise InvalidRequest("static needs a calibration table")
            return await ctl.aask(q, static_config(self.adaptiverag_table)), None
        outcome, choice = await ctl.profile(q)
        if s.kind == "adaptiverag":
            if self.adaptiverag_table is None:
                raise InvalidRequest("adaptiverag needs a calibration table")
            config = adaptiverag_config(self.adaptiverag_table, outcome.profile)
        else:  # parrot
            config = median_config(choice.space)
        return await ctl.aask(q, config), outcome.seconds

    def row(
        self,
        job: Job,
        rate: float | None,
        concurrency: int | None,
        arrival: float,
        end: float,
        answer: Answer | None,
        profile_s: float | None,
        error: str | None,
    ) -> dict[str, Any]:
        q = job.query
        row: dict[str, Any] = {
            "dataset": self.card.name,
            "system": job.system.name,
            "query_id": q.id,
            "rate": rate,
            "concurrency": concurrency,
            "arrival_s": round(arrival, 4),
            "end_s": round(end, 4),
            "delay_s": round(end - arrival, 4),
            "primary": metrics.primary_metric(self.card),
            "error": error,
            "slo_ms": self.controller.policy.slo_for(self.card.name),
        }
        if answer is None:
            return {**row, "ttft_s": None, "queue_s": None, "profile_s": profile_s, "config": None,
                    "tokens": None, "scores": {}, "answer": None, "decision": None}  # fmt: skip
        used_docs = [c.doc_id for c in answer.chunks]
        scores = {
            **metrics.score(self.card, answer.text, q),
            **metrics.evidence_scores(self.card, q, used_docs),
        }
        # Arrival to the first answer token: the delay less the time after that token.
        after_first = answer.timings.get("total", 0.0) - answer.timings.get("ttft", 0.0)
        return {
            **row,
            "ttft_s": round(max(end - arrival - after_first, 0.0), 4),
            "queue_s": answer.timings.get("queue", 0.0),
            "profile_s": profile_s,
            "config": answer.decision.config.label,
            "tokens": answer.tokens,
            "scores": scores,
            "answer": answer.text,
            "decision": answer.decision.to_dict(),
            "timings": dict(answer.timings),
        }

    async def run(
        self,
        jobs: Sequence[Job],
        writer: SampleWriter,
        *,
        rate: float | None = None,
        concurrency: int | None = None,
        seed: int = 0,
        on_done: Callable[[dict[str, Any]], None] | None = None,
    ) -> int:
        """Run `jobs` (open loop at `rate` per system, else closed loop at `concurrency`);
        returns how many rows were written. Every job ends as a row: an answer or an error."""
        if (rate is None) == (concurrency is None):
            raise InvalidRequest("give either a rate (open loop) or a concurrency (closed loop)")
        start = time.perf_counter()
        written = 0

        async def one(job: Job, arrival: float) -> None:
            nonlocal written
            answer, profile_s, error = None, None, None
            try:
                answer, profile_s = await self.run_job(job)
            except RagctlError as e:
                error = f"{type(e).__name__}: {e}"
            end = time.perf_counter() - start
            row = self.row(job, rate, concurrency, arrival, end, answer, profile_s, error)
            writer.write(row)
            written += 1
            if on_done is not None:
                on_done(row)

        if rate is not None:
            systems = len({j.system.name for j in jobs}) or 1
            arrivals = poisson_arrivals(len(jobs), rate * systems, seed)
            tasks = []
            for job, at in zip(jobs, arrivals, strict=True):
                delay = at - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(job, at)))
            await _gather_all(tasks)
        else:
            queue: asyncio.Queue[Job] = asyncio.Queue()
            for job in jobs:
                queue.put_nowait(job)

            async def worker() -> None:
                while not queue.empty():
                    job = queue.get_nowait()
                    await one(job, time.perf_counter() - start)

            assert concurrency is not None
            await _gather_all([asyncio.ensure_future(worker()) for _ in range(concurrency)])
        return written


async def _gather_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Await all; if interrupted, cancel the rest and wait for them (their engine calls stop)."""
    tasks = list(tasks)
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
