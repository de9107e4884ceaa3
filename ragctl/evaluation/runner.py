"""Running an evaluation: every system on the same queries, on one shared engine, interleaved,
under open-loop Poisson arrivals or a closed loop, with each finished query appended to
`samples.jsonl` at once (an interrupted run keeps what finished; `--resume` skips it).
The phases of a whole run are in `ragctl.evaluation.run`.

A job is (query, system). Jobs are interleaved query by query, with the system order rotated
per query, so no system always goes first. Open loop: each system receives queries at `rate`
per second (the merged arrivals are Poisson at rate × systems, seeded); a job starts at its
arrival whatever is still running, and its delay counts from the arrival. A cool-down (open
loop) goes on sending other queries at the same rate after the last measured arrival, until
every measured job has finished, and records none of them: the last measured requests meet
the load of a steady stream, not an engine that empties because the run stops sending.
Closed loop: N workers take the next job as soon as they finish one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
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


COOLDOWN_SEED = 104729
"""Added to the run's seed for the cool-down's arrivals (the measured ones stay the same)."""


async def paced(
    calls: Sequence[Callable[[], Awaitable[Any]]],
    arrivals: Sequence[float],
    start: float,
    tasks: list[asyncio.Future[Any]],
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Start each call at its arrival (seconds after `start`, on `time.perf_counter`) and append
    its task to `tasks`, whatever is still running; once `stop` is set, start no more. The
    caller awaits the tasks (`gather_all`)."""
    for call, at in zip(calls, arrivals, strict=True):
        delay = at - (time.perf_counter() - start)
        if stop is None:
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
            if stop.is_set():
                return
        tasks.append(asyncio.ensure_future(call()))


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
        cooldown: Sequence[Job] = (),
    ) -> int:
        """Run `jobs` (open loop at `rate` per system, else closed loop at `concurrency`);
        returns how many rows were written. Every job ends as a row: an answer or an error.
        `cooldown` (open loop): jobs that go on arriving after the last measured one until
        every measured job has finished; no row is written for them."""
        if (rate is None) == (concurrency is None):
            raise InvalidRequest("give either a rate (open loop) or a concurrency (closed loop)")
        if cooldown and rate is None:
            raise InvalidRequest("a cool-down needs open-loop arrivals (--rate)")
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
            tasks: list[asyncio.Future[Any]] = []
            left = len(jobs)
            finished = asyncio.Event()

            async def measured(job: Job, at: float) -> None:
                nonlocal left
                try:
                    await one(job, at)
                finally:
                    left -= 1
                    if left == 0:
                        finished.set()

            async def unmeasured(job: Job) -> None:
                with contextlib.suppress(RagctlError):  # not a row: its error is nobody's result
                    await self.run_job(job)

            async def send() -> None:
                calls = [
                    lambda j=j, at=at: measured(j, at) for j, at in zip(jobs, arrivals, strict=True)
                ]
                await paced(calls, arrivals, start, tasks)
                if cooldown and jobs:
                    after = poisson_arrivals(len(cooldown), rate * systems, seed + COOLDOWN_SEED)
                    await paced([lambda j=j: unmeasured(j) for j in cooldown],
                                [arrivals[-1] + a for a in after], start, tasks,
                                stop=finished)  # fmt: skip

            await gather_all(tasks, send)
        else:
            queue: asyncio.Queue[Job] = asyncio.Queue()
            for job in jobs:
                queue.put_nowait(job)

            async def worker() -> None:
                while not queue.empty():
                    job = queue.get_nowait()
                    await one(job, time.perf_counter() - start)

            assert concurrency is not None
            workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
            await gather_all(workers)
        return written


async def gather_all(
    tasks: list[asyncio.Future[Any]], launch: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Await `launch` (which may add to `tasks`), then all of `tasks`; if interrupted or one
    fails, cancel the rest and wait for them (their engine calls stop)."""
    try:
        if launch is not None:
            await launch()
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
