"""stuff: all chunks in one prompt (the longest prefix that fits the context window)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ragctl.synthesis.prompts import format_passage
from ragctl.synthesis.registry import MethodSpec, StageSize, Step
from ragctl.types import Chunk, Config, Generation, GenerationRequest, SynthesisResult

if TYPE_CHECKING:
    from ragctl.synthesis.methods import CallSizer, Synthesizer

STAGE = "answer"


def plan(synth: Synthesizer, config: Config, question: str, chunks: tuple[Chunk, ...]) -> Step:
    def build(n: int) -> GenerationRequest:
        context = "\n\n".join(format_passage(i, c) for i, c in enumerate(chunks[:n], 1))
        return synth.answer_call("stuff", context=context, question=question)

    n, call = synth.longest_fitting(len(chunks), build)
    used = chunks[:n]

    def finish(gens: Sequence[Generation]) -> SynthesisResult:
        return SynthesisResult(
            answer=gens[0].text.strip(),
            confidence=gens[0].confidence,
            used_chunk_ids=tuple(c.id for c in used),
        )

    return Step(STAGE, (call,), finish, streams=True)


def size(sizer: CallSizer, config: Config) -> tuple[StageSize, ...]:
    """The one call for every chunk count 1..len(passages), in one pass (each keeps the
    longest prefix that fits the context window)."""
    prompts, total, full = [], sizer.overhead["stuff"], False
    for i in range(len(sizer.passages)):
        if not full and total + sizer.passage(i) <= sizer.budget:
            total += sizer.passage(i)
        else:
            full = True
        prompts.append(total)
    return (StageSize(STAGE, lambda n: (prompts[n - 1], sizer.answer_max_tokens)),)


SPEC = MethodSpec(
    "stuff", (STAGE,), ("stuff",), plan, size, fallback="joint", components=("stuff",)
)
