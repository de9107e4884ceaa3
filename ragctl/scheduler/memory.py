"""The KV-cache memory model: how many blocks a configuration needs, from its calls.

Pure arithmetic over `CallEstimate`s (what `Synthesizer.estimate_calls` returns); the best-fit
choice (`bestfit.py`) and the admission queue (`admission.py`) only compare these numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only its attributes are read; keeps the memory model free of synthesis
    from ragctl.synthesis.methods import CallEstimate, CallSizer, StageSize
    from ragctl.types import Config


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens: ceil(tokens / block_size)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return -(-tokens // block_size)


def config_need(calls: Sequence[CallEstimate], block_size: int, buffer_blocks: int) -> int:
    """KV blocks a configuration needs at its peak, plus `buffer_blocks` of safety margin.

    Why this shape:
    - The engine allocates KV per sequence in whole blocks, and a sequence grows to its prompt
      plus at most `max_tokens` generated tokens, so one call needs
      `blocks_for(prompt_tokens + max_tokens)`; rounding per call (not over the sum) is what the
      engine actually holds.
    - The calls of one stage are submitted together (map_rerank's calls, map_reduce's mappers)
      and are resident at the same time, so their blocks add up.
    - Stages run one after another (the reducer starts after every mapper has finished) and a
      finished call's blocks are freed, so the configuration never holds two stages at once:
      its need is the largest stage, not the sum of all.
    - The buffer covers what the estimate cannot see (the engine's chat template or tokenizer
      drifting from ours by a few tokens, blocks a finished call holds until the next engine
      step frees them).

    Calls are grouped by their `stage` name; stage names are distinct per stage in every method.

    A configuration with no calls needs only the buffer.
    """
    if buffer_blocks < 0:
        raise ValueError(f"buffer_blocks must be >= 0, got {buffer_blocks}")
    per_stage: dict[str, int] = {}
    for call in calls:
        per_stage[call.stage] = per_stage.get(call.stage, 0) + blocks_for(
            call.prompt_tokens + call.max_tokens, block_size
        )
    return max(per_stage.values(), default=0) + buffer_blocks


class NeedTable:
    """`config_need(sizer.estimate(config), ...)` for any configuration of one query, in O(1)
    after one pass per stage: the blocks of a per-chunk stage are summed as prefix sums over the
    chunks, a one-call stage's are its call's at n.

    Best-fit sizes dozens of configurations per query; building each one's call list costs
    more than the whole rest of the decision. The numbers are the same (a unit test checks).
    The method's stages come from the sizer (`CallSizer.stages`): this is only arithmetic.
    """

    def __init__(self, sizer: CallSizer, block_size: int, buffer_blocks: int) -> None:
        if buffer_blocks < 0:
            raise ValueError(f"buffer_blocks must be >= 0, got {buffer_blocks}")
        self.sizer = sizer
        self.block_size = block_size
        self.buffer_blocks = buffer_blocks
        self._stages: dict[tuple[str, int | None], list[Callable[[int], int]]] = {}

    def _stage_blocks(self, stage: StageSize) -> Callable[[int], int]:
        """The stage's blocks at n chunks."""
        if not stage.per_chunk:
            return lambda n: blocks_for(sum(stage.call(n)), self.block_size)
        per_call = (
            blocks_for(sum(stage.call(i)), self.block_size) for i in range(len(self.sizer.passages))
        )
        return list(itertools.accumulate(per_call, initial=0)).__getitem__

    def __call__(self, config: Config) -> int:
        n = self.sizer.chunks_used(config)
        key = (config.method, config.intermediate_length)
        if key not in self._stages:
            self._stages[key] = [self._stage_blocks(s) for s in self.sizer.stages(config)]
        return max(blocks(n) for blocks in self._stages[key]) + self.buffer_blocks
