"""Placement: which engine of the pool runs a query's plan (pure).

The admission queue runs the query's best-fit `decide` once per healthy engine (each against
that engine's KV state and reservations), then `place` picks one of those per-engine plans:

- `best-fit` (the default): the best configuration that fits on some engine, then the least
  loaded engine among the equally good. Plans rank by reason (`fit` > `fallback` > `wait`; a
  plan the SLO loop would shed just above `wait`), then by the objective's own score of the
  chosen configuration (recorded on the plan's `Choice`: the need under `quality`, minus the
  predicted delay under `latency`, the utility under `balanced`; the need when there is no cost
  model), then by `bestfit._rank`; ties go to
  the engine with the most blocks left after this plan's reservation, then to fewer plans in
  flight, then to the earlier engine. With one block size, the configurations that fit on an
  engine grow with its available blocks, so the engine with the most room holds every
  candidate the others hold: its pick is the objective's pick over the whole pool.
- `least-loaded` (the field's default, load only): the engine with the fewest plans in flight
  (ties: most blocks left, then the earlier one), whatever configuration fits there.
- `round-robin` (load blind): the next engine in turn.

Under every strategy, a plan that is not `wait` fits the engine it names (each plan was
decided against that engine's own free blocks and reservations), and an engine that is not
healthy is never placed on while any engine is. `place` returns None only for an empty pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from ragctl.scheduler.bestfit import _rank
from ragctl.types import Plan

Strategy = Literal["best-fit", "least-loaded", "round-robin"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

_REASON_RANK = {"fit": 2, "fallback": 1, "wait": 0}
SHED_RANK = 0.5
"""A plan the SLO loop sheds ranks below every plan that runs, above waiting everywhere."""


@dataclass(frozen=True)
class EngineOption:
    """One engine's answer to a query: its plan and its load when it was decided."""

    plan: Plan
    healthy: bool = True
    inflight: int = 0
    """Plans admitted on this engine and not finished."""
    total_blocks: int = 0
    """The engine's whole KV cache (to tell a query that could never fit there)."""

    @property
    def left_after(self) -> int:
        """Blocks available on the engine once this plan is reserved (wait: before it)."""
        p = self.plan
        return p.available_blocks - (p.need_blocks if p.config is not None else 0)


def objective_score(plan: Plan) -> float:
    """The score the plan's objective gave its chosen configuration (its need without one)."""
    if plan.config is None:
        return float("-inf")
    if plan.choice is not None:
        for c in plan.choice.candidates:
            if c.config == plan.config:
                return c.score
    return float(plan.need_blocks)


def _could_fit(option: EngineOption) -> bool:
    p = option.plan
    return p.config is not None or not option.total_blocks or p.need_blocks <= option.total_blocks


def plan_rank(option: EngineOption) -> tuple[object, ...]:
    """best-fit's sort key over options (larger wins); see the module docstring."""
    p = option.plan
    if p.config is None:
        # Waiting everywhere: the engine whose cache could ever hold the query, most room first.
        return (0, p.need_blocks <= option.total_blocks, option.left_after, -option.inflight)
    # A plan the SLO loop would shed is a refusal: any engine that would run the query wins.
    reason = SHED_RANK if p.slo_action == "shed" else _REASON_RANK.get(p.reason, 0)
    return (
        reason,
        objective_score(p),
        _rank(p.need_blocks, p.config),
        option.left_after,
        -option.inflight,
    )


def place(
    options: Sequence[EngineOption], strategy: Strategy = "best-fit", turn: int = 0
) -> int | None:
    """The index of the option to carry out (see the module docstring); `turn` is round-robin's
    counter (the caller advances it). Unhealthy engines count only when no engine is healthy
    (then the query tries them anyway and fails with the engine's own error, as it would
    with a single engine)."""
    if not options:
        return None
    candidates = [i for i, o in enumerate(options) if o.healthy] or list(range(len(options)))
    # An engine whose whole cache could never hold the query is no candidate while one could.
    candidates = [i for i in candidates if _could_fit(options[i])] or candidates
    if strategy == "best-fit":
        # max() keeps the first of equals: ties go to the earlier engine.
        return max(candidates, key=lambda i: plan_rank(options[i]))
    if strategy == "least-loaded":
        return min(candidates, key=lambda i: (options[i].inflight, -options[i].left_after, i))
    if strategy == "round-robin":
        return candidates[turn % len(candidates)]
    raise ValueError(f"unknown placement strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
