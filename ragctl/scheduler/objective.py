"""Cost-aware best-fit: among the configurations of a query's space that fit the free KV cache,
choose by predicted quality and predicted delay (pure).

The fit test, the fallback and the wait are exactly `bestfit.choose`'s; the objective only
picks among the space's fitting configurations F (when F is empty, the plan is `choose`'s):

- `quality`: `choose`'s pick, Q: the largest need (METIS: right where memory binds and time
  barely grows with size).
- `latency`: the smallest predicted delay d; ties go to the larger need (`bestfit._rank`).
- `balanced`: Q unless a faster candidate is worth more. Utility U(c) = q(c) - w * d(c) / d_min,
  with q the predicted quality (0-1), d_min the fastest fitting candidate's delay and
  w = `delay_weight`: the quality one is willing to give up for the time of one fastest
  candidate. Only candidates predicted strictly faster than Q may replace it, and only with a
  strictly larger U (ties: Q, then the larger need). So, exactly: when no candidate is faster
  than Q (a flat delay model), balanced picks Q; whatever it picks, d(pick) <= d(Q), and a
  pick c != Q satisfies q(Q) - q(c) < w * (d(Q) - d(c)) / d_min (the quality it loses is
  paid for by the time it saves).

Every plan carries a `Choice`: the objective, why the pick won, and the fitting candidates'
blocks, delays, qualities and scores (the top `record` by score).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ragctl.scheduler.bestfit import _rank, choose, clip_space, fallback_configs, unshown_reserved
from ragctl.types import Candidate, Choice, Config, ConfigSpace, KVState, Objective, Plan

DEFAULT_DELAY_WEIGHT = 0.1
"""`balanced`: quality (share of queries answered) worth the time of one fastest candidate."""
RECORD_CANDIDATES = 12
"""Candidates a Choice records (a space can hold ~100 configurations)."""


def choose_objective(
    space: ConfigSpace,
    kv: KVState,
    reserved_total: int,
    need: Callable[[Config], int],
    *,
    joint_reasoning: bool,
    max_chunks: int,
    objective: Objective,
    delay: Callable[[Config], float],
    quality: Callable[[Config], float],
    delay_weight: float = DEFAULT_DELAY_WEIGHT,
    admissible: Callable[[Config], bool] | None = None,
    delay_source: str = "",
    record: int = RECORD_CANDIDATES,
) -> Plan:
    """The plan for one query under `objective` (see the module docstring); `choose`'s
    arguments plus the predictors (`delay` in seconds, `quality` in [0, 1])."""
    if delay_weight < 0:
        raise ValueError(f"delay_weight must be >= 0, got {delay_weight}")
    base = choose(
        space, kv, reserved_total, need,
        joint_reasoning=joint_reasoning, max_chunks=max_chunks, admissible=admissible,
    )  # fmt: skip
    if base.config is None:
        return base
    available = kv.free_blocks - unshown_reserved(reserved_total, kv)
    clipped = clip_space(space, max_chunks)
    pool = (
        clipped.configs()
        if base.reason == "fit"
        else fallback_configs(clipped, joint_reasoning=joint_reasoning)
    )
    fitting = [c for c in pool if (admissible is None or admissible(c)) and need(c) <= available]
    if base.config not in fitting:  # need not monotone in chunks: keep choose's word
        fitting.append(base.config)
    d = {c: delay(c) for c in fitting}
    q = {c: quality(c) for c in fitting}
    n = {c: need(c) for c in fitting}
    d_min = max(min(d.values()), 1e-9)

    def rank(c: Config) -> tuple[int, int, int, int]:
        return _rank(n[c], c)

    top = base.config
    if objective == "quality" or base.reason != "fit":
        chosen = top
        score = {c: float(rank(c)[0]) for c in fitting}  # the need: quality's criterion
        why = (
            f"largest need that fits ({n[top]} of {available} blocks)"
            if base.reason == "fit"
            else f"nothing in the space fits; largest fallback that fits ({n[top]} blocks)"
        )
    elif objective == "latency":
        chosen = min(fitting, key=lambda c: (d[c], tuple(-x for x in rank(c))))
        score = {c: -d[c] for c in fitting}
        why = f"fastest predicted that fits ({d[chosen]:.3g} s)"
    elif objective == "balanced":
        score = {c: q[c] - delay_weight * d[c] / d_min for c in fitting}
        faster = [c for c in fitting if d[c] < d[top]]
        best = max(faster, key=lambda c: (score[c], rank(c)), default=None)
        if best is not None and score[best] > score[top]:
            chosen = best
            why = (
                f"{top.label} (largest that fits) would cost {d[top] - d[best]:.3g} s more "
                f"for {q[top] - q[best]:+.3f} predicted quality; worth less than "
                f"w={delay_weight:g} per {d_min:.3g} s"
            )
        else:
            chosen = top
            why = (
                "largest that fits; no faster candidate saves enough time for the quality it loses"
            )
    else:
        raise ValueError(f"unknown objective {objective!r}")
    ordered = sorted(fitting, key=lambda c: (c == chosen, score[c], rank(c)), reverse=True)
    choice = Choice(
        objective=objective,
        why=why,
        fitting=len(fitting),
        candidates=tuple(
            Candidate(c, n[c], d[c], q[c], score[c]) for c in ordered[: max(record, 1)]
        ),
        delay_source=delay_source,
    )
    return dataclasses.replace(base, config=chosen, need_blocks=n[chosen], choice=choice)
