"""The one place that awaits: retrieve -> synthesis on the shared engine -> Answer.

This issue's path runs a configuration the caller chose (the "fixed configuration" baseline);
the adaptive path (profile -> rules -> best-fit) plugs in where the configuration is decided.
Many `ask` calls may run at once on one Controller: they share the engine, which batches them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

from ragctl.engine.base import Engine
from ragctl.errors import InvalidRequest, PromptTooLong
from ragctl.synthesis.methods import Step, Synthesizer
from ragctl.types import Answer, Chunk, Config, Decision, StageRecord, SynthesisResult


class Retriever(Protocol):
    def search(self, question: str, k: int) -> list[Chunk]: ...


class Controller:
    def __init__(
        self,
        engine: Engine,
        retriever: Retriever,
        *,
        answer_max_tokens: int = 64,
        temperature: float = 0.0,
    ) -> None:
        self.engine = engine
        self.retriever = retriever
        self.synthesizer = Synthesizer(
            engine.tokenizer, engine.max_model_len, answer_max_tokens, temperature
        )

    def check_question(self, question: str) -> str:
        """The question, stripped; a clear error if it is empty or cannot fit the context."""
        q = question.strip()
        if not q:
            raise InvalidRequest("the question is empty")
        need = self.synthesizer.question_overhead(q)
        if need > self.engine.max_model_len:
            raise PromptTooLong(
                f"the question needs {need} tokens with the prompt and answer budget; the model's "
                f"context is {self.engine.max_model_len} tokens"
            )
        return q

    async def ask(self, question: str, config: Config) -> Answer:
        """Answer `question` with `config`; the Answer records what ran and how long it took."""
        start = time.perf_counter()
        q = self.check_question(question)
        timings: dict[str, float] = {}

        t = time.perf_counter()
        # Embedding and search are CPU work: keep the event loop free for other requests.
        chunks = await asyncio.to_thread(self.retriever.search, q, config.num_chunks)
        timings["retrieve"] = time.perf_counter() - t

        kv = await self.engine.kv_state()
        decision = Decision(
            config=config, reason="fixed", kv=kv, templates=self.synthesizer.template_versions
        )

        t = time.perf_counter()
        result, stages = await self.run_synthesis(self.synthesizer.plan(config, q, chunks))
        timings["synthesis"] = time.perf_counter() - t
        for s in stages:
            timings[f"synthesis.{s.name}"] = s.seconds
        timings["total"] = time.perf_counter() - start

        by_id = {c.id: c for c in chunks}
        used = tuple(by_id[i] for i in result.used_chunk_ids)
        return Answer(
            question=q,
            text=result.answer,
            decision=decision,
            chunks=used,
            stages=stages,
            timings=timings,
            synthesis=result,
        )

    async def run_synthesis(
        self, step: Step | SynthesisResult
    ) -> tuple[SynthesisResult, tuple[StageRecord, ...]]:
        """Run a method's steps on the engine, one stage after another."""
        stages: list[StageRecord] = []
        while isinstance(step, Step):
            t = time.perf_counter()
            gens = await self.engine.generate(step.requests)
            stages.append(
                StageRecord(
                    name=step.name,
                    calls=len(gens),
                    prompt_tokens=sum(g.prompt_tokens for g in gens),
                    output_tokens=sum(g.output_tokens for g in gens),
                    seconds=time.perf_counter() - t,
                )
            )
            step = step.finish(gens)
        return step, tuple(stages)

    async def aclose(self) -> None:
        await self.engine.aclose()

    async def ask_many(self, questions: Sequence[str], config: Config) -> list[Answer]:
        """Several questions at once on the shared engine; answers in question order."""
        return list(await asyncio.gather(*(self.ask(q, config) for q in questions)))
