"""map_rerank: one call per chunk; answers ranked by log-prob confidence, "unanswerable" last."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ragctl.synthesis.prompts import format_passage, is_refusal
from ragctl.synthesis.registry import MethodSpec, StageSize, Step
from ragctl.types import Chunk, Config, Generation, SynthesisResult

if TYPE_CHECKING:
    from ragctl.synthesis.methods import CallSizer, Synthesizer

STAGE = "rerank"
UNANSWERABLE = "unanswerable"


def plan(synth: Synthesizer, config: Config, question: str, chunks: tuple[Chunk, ...]) -> Step:
    # Every call is a candidate answer: the request's answer options apply to each.
    calls = tuple(synth.answer_call("map_rerank", tag=STAGE, question=question,
                                    chunk=format_passage(1, c)) for c in chunks)  # fmt: skip

    def finish(gens: Sequence[Generation]) -> SynthesisResult:
        # Real answers beat "unanswerable"; then higher confidence; then retrieval rank.
        best = max(
            range(len(gens)),
            key=lambda i: (
                not is_refusal(gens[i].text, UNANSWERABLE),
                gens[i].confidence or 0.0,
                -i,
            ),
        )
        return SynthesisResult(
            answer=gens[best].text.strip(),
            confidence=gens[best].confidence,
            source_chunk_id=chunks[best].id,
            used_chunk_ids=tuple(c.id for c in chunks),
        )

    return Step(STAGE, calls, finish)


def size(sizer: CallSizer, config: Config) -> tuple[StageSize, ...]:
    def call(i: int) -> tuple[int, int]:
        prompt = min(sizer.overhead["map_rerank"] + sizer.passage(i), sizer.budget)
        return prompt, sizer.answer_max_tokens

    return (StageSize(STAGE, call, per_chunk=True),)


SPEC = MethodSpec("map_rerank", (STAGE,), ("map_rerank",), plan, size, fallback="independent")
