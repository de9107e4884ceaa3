"""Best-fit (RAGServe/METIS section 4.3): pick, from a query's pruned space, the configuration
that makes the most of the KV cache the engine has free right now.

Pure: `choose` takes the space, the engine's KV state, what in-flight plans have reserved and a
need function (config -> blocks, usually `config_need` over `Synthesizer.estimate_calls`), and
returns a `Plan` as data. Admitting, reserving and waiting are `admission.py`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from ragctl.errors import InvalidRequest
from ragctl.synthesis import registry
from ragctl.types import METHODS, Config, ConfigSpace, KVState, Plan


def unshown_reserved(reserved_total: int, kv: KVState) -> int:
    """Blocks in-flight plans reserved that the engine's state does not show as used yet.

    A plan reserves its peak need when it is admitted, but the engine only allocates blocks
    once the calls arrive and grows them as tokens are generated; until then the engine's free
    count overstates what is really free. Assumption: ragctl owns the engine, so every block the
    engine shows as used belongs to some ragctl reservation, and the part of `reserved_total`
    not yet visible is at least `reserved_total - used`. Clamped at 0: usage beyond the
    reservations (another client on the same engine, a reservation already released while its
    blocks await the next engine step) is already out of `free_blocks`.
    When other clients share the engine this under-counts the unshown part (their blocks are
    mistaken for ours); the safety buffer in each need and the queue's re-decisions absorb it.
    """
    return max(0, reserved_total - kv.used_blocks)


def _rank(need: int, config: Config) -> tuple[int, int, int, int]:
    """Sort key, larger wins: the largest need first (best-fit uses as much of the free cache
    as it can); ties go to more chunks, then to the richer method (METHODS order reversed:
    map_reduce > stuff > map_rerank), then to the longer intermediate_length. Every Config
    ranks differently, so the choice never depends on iteration order."""
    return (
        need,
        config.num_chunks,
        METHODS.index(config.method),
        config.intermediate_length or 0,
    )


def clip_space(space: ConfigSpace, max_chunks: int) -> ConfigSpace:
    """The space limited to the chunks retrieved: hi clipped to `max_chunks`; when even lo asks
    for more, the range collapses to exactly `max_chunks` (use everything there is)."""
    lo, hi = space.num_chunks
    if hi <= max_chunks:
        return space
    return dataclasses.replace(space, num_chunks=(min(lo, max_chunks), max_chunks))


def fallback_configs(space: ConfigSpace, *, joint_reasoning: bool) -> tuple[Config, ...]:
    """Cheaper configurations outside `space` (already clipped), tried when none of it fits.

    - no joint reasoning: the `independent` methods (map_rerank); each chunk is answered on its
      own, so fewer chunks lose little.
    - joint reasoning: the `joint` methods (the chunks must be read together: stuff); one that
      takes an intermediate_length (map_reduce) only when the space allows it, at the space's
      smallest.
    Chunk counts run from 1 up to the space's hi; configurations inside the space are left out
    (they were tried), which for a method the space allows leaves only k < lo.
    """
    inside = set(space.configs())
    role = "joint" if joint_reasoning else "independent"
    variants = [
        (m.name, min(space.intermediate_lengths) if m.takes_intermediate else None)
        for m in registry.specs()
        if m.fallback == role and (not m.takes_intermediate or m.name in space.methods)
    ]
    out = []
    for method, ilen in variants:
        for k in range(1, space.num_chunks[1] + 1):
            config = Config(method, k, ilen)
            if config not in inside:
                out.append(config)
    return tuple(out)


def choose(
    space: ConfigSpace,
    kv: KVState,
    reserved_total: int,
    need: Callable[[Config], int],
    *,
    joint_reasoning: bool,
    max_chunks: int,
    admissible: Callable[[Config], bool] | None = None,
) -> Plan:
    """The best-fit plan for one query.

    available = free blocks - unshown reserved blocks. Then, in order:
    1. `fit`: the largest-need configuration of the space (clipped to `max_chunks`, the chunks
       actually retrieved) with need <= available (tie-break: see `_rank`).
    2. `fallback`: nothing in the space fits; the largest-need one of `fallback_configs` that
       fits.
    3. `wait`: nothing fits at all; `config=None` and `need_blocks` is the smallest need of
       every candidate (space and fallback): once that much is available, a re-decision
       returns a configuration.
    `need` must not decrease as num_chunks grows within a method and intermediate_length
    (true of `config_need` over real call sizes: more chunks never make fewer tokens); each
    family is then binary-searched, so `need` runs O(log n) times per family, at most once per
    configuration, and on fallbacks only when the space does not fit.
    `admissible` (optional) leaves out configurations before anything is sized (the SLO loop's
    "predicted to meet the deadline"); it should, like `need`, be monotone in the chunk count.
    """
    if max_chunks < 1:
        raise InvalidRequest("retrieval returned no chunks to answer from")
    reserved = unshown_reserved(reserved_total, kv)
    available = kv.free_blocks - reserved
    needs: dict[Config, int] = {}

    def need_of(config: Config) -> int:
        if config not in needs:
            needs[config] = need(config)
        return needs[config]

    def best(configs: Iterable[Config]) -> Config | None:
        # Need grows with the chunk count within a family (same method and summary budget),
        # so each family's best fit is its largest fitting count: a binary search instead of
        # sizing every configuration.
        fitting = []
        for family in _families(configs):
            lo, hi, found = 0, len(family) - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                if need_of(family[mid]) <= available:
                    found, lo = family[mid], mid + 1
                else:
                    hi = mid - 1
            if found is not None:
                fitting.append(found)
        return max(fitting, key=lambda c: _rank(needs[c], c), default=None)

    def plan(config: Config | None, reason: str, need_blocks: int) -> Plan:
        return Plan(config, reason, need_blocks, kv.free_blocks, reserved)  # type: ignore[arg-type]

    space = clip_space(space, max_chunks)
    inside = space.configs()
    outside = fallback_configs(space, joint_reasoning=joint_reasoning)
    if admissible is not None:
        inside = tuple(c for c in inside if admissible(c))
        outside = tuple(c for c in outside if admissible(c))
    chosen = best(inside)
    if chosen is not None:
        return plan(chosen, "fit", needs[chosen])
    chosen = best(outside)
    if chosen is not None:
        return plan(chosen, "fallback", needs[chosen])
    # Each family's smallest configuration is its cheapest.
    smallest = [family[0] for family in _families((*inside, *outside))]
    if not smallest:  # nothing admissible at all
        return plan(None, "wait", 0)
    return plan(None, "wait", min(need_of(c) for c in smallest))


def _families(configs: Iterable[Config]) -> list[list[Config]]:
    """Configurations grouped by (method, intermediate_length), each by ascending chunks."""
    groups: dict[tuple[str, int | None], list[Config]] = {}
    for c in configs:
        groups.setdefault((c.method, c.intermediate_length), []).append(c)
    return [sorted(g, key=lambda c: c.num_chunks) for g in groups.values()]
