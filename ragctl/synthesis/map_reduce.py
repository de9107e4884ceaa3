"""map_reduce: one mapper per chunk bounded to `intermediate_length` tokens, submitted together,
then one reducer over the notes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ragctl.synthesis.prompts import format_notes, format_passage, is_refusal
from ragctl.synthesis.registry import MethodSpec, StageSize, Step
from ragctl.types import Chunk, Config, Generation, GenerationRequest, SynthesisResult

if TYPE_CHECKING:
    from ragctl.synthesis.methods import CallSizer, Synthesizer

MAP, REDUCE = "map", "reduce"
NOTHING_RELEVANT = "nothing relevant"
# Per-note framing in the reducer prompt ("[i] " and the blank line), in tokens, for estimates.
NOTE_OVERHEAD_TOKENS = 6


def plan(synth: Synthesizer, config: Config, question: str, chunks: tuple[Chunk, ...]) -> Step:
    ilen = config.intermediate_length
    assert ilen is not None  # Config guarantees it for map_reduce
    # Words are ~0.75 tokens; the token budget is enforced by max_tokens regardless.
    words = max(5, int(ilen * 0.75))
    mappers = tuple(
        synth.call(
            "map", MAP, ilen, False, chunk=format_passage(1, c), question=question, max_words=words
        )
        for c in chunks
    )

    def after_map(gens: Sequence[Generation]) -> Step:
        notes = [g.text.strip() for g in gens]
        # Notes that found nothing only cost reducer tokens; keep them all if none found
        # anything, so the reducer can still say so.
        useful = [n for n in notes if not is_refusal(n, NOTHING_RELEVANT)] or notes

        def build(k: int) -> GenerationRequest:
            return synth.answer_call("reduce", notes=format_notes(useful[:k]), question=question)

        _, reducer = synth.longest_fitting(len(useful), build)

        def finish(final: Sequence[Generation]) -> SynthesisResult:
            return SynthesisResult(
                answer=final[0].text.strip(),
                confidence=final[0].confidence,
                intermediate=tuple(notes),
                used_chunk_ids=tuple(c.id for c in chunks),
            )

        return Step(REDUCE, (reducer,), finish, streams=True)

    return Step(MAP, mappers, after_map)


def size(sizer: CallSizer, config: Config) -> tuple[StageSize, ...]:
    ilen = config.intermediate_length
    assert ilen is not None

    def mapper(i: int) -> tuple[int, int]:
        return min(sizer.overhead["map"] + sizer.passage(i), sizer.max_model_len - ilen), ilen

    def reducer(n: int) -> tuple[int, int]:
        """Over n notes, each at its full budget."""
        bound = sizer.overhead["reduce"] + n * (ilen + NOTE_OVERHEAD_TOKENS)
        return min(bound, sizer.budget), sizer.answer_max_tokens

    return StageSize(MAP, mapper, per_chunk=True), StageSize(REDUCE, reducer)


SPEC = MethodSpec(
    "map_reduce", (MAP, REDUCE), ("map", "reduce"), plan, size, fallback="joint",
    intermediate_length=100,
)  # fmt: skip
