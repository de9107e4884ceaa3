"""The systems `ragctl eval` compares, as pure policy over plain data.

- `ragctl`: the adaptive controller (profile -> rules -> best-fit on free KV memory), with the
  settings' objective; `ragctl:<objective>` (`ragctl:quality`, `ragctl:balanced`,
  `ragctl:latency`) with that best-fit objective, so several can run side by side.
- `fixed:<method>:<chunks>[:<ilen>]`: one static configuration for every query (`fixed` alone:
  the default grid, covering all three methods).
- `adaptiverag` (AdaptiveRAG*): the query's complexity class, from the same LLM profiler, picks
  the configuration that had the best quality for that class on a calibration split.
- `parrot` (Parrot*): the median configuration of the profiler's pruned space, run as is (the
  engine batches it), without looking at memory.
- `static` (Static*): one configuration for every query, chosen ahead on the same calibration
  split by `balanced`'s utility over what was measured there: what a team that picks one
  static configuration from a held-out split deploys. No profile, no adaptation.
- `oracle`: per query, the best configuration of the fixed grid in hindsight; derived from the
  fixed runs, never run itself.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ragctl.errors import InvalidRequest
from ragctl.scheduler.objective import DEFAULT_DELAY_WEIGHT
from ragctl.types import (
    METHODS,
    OBJECTIVES,
    TAKES_INTERMEDIATE,
    Config,
    ConfigSpace,
    Objective,
    Profile,
)

Kind = Literal["ragctl", "fixed", "adaptiverag", "parrot", "static"]

DEFAULT_GRID: tuple[Config, ...] = (
    Config("map_rerank", 5),
    Config("stuff", 3),
    Config("stuff", 6),
    Config("stuff", 9),
    Config("map_reduce", 5, 50),
    Config("map_reduce", 9, 100),
)
"""The fixed baselines: cheap to expensive, all three methods, up to the default space's top."""

RAGCTL = "ragctl"
BASELINES = ("adaptiverag", "parrot", "static")
FIXED_PREFIX = "fixed:"
ORACLE = "oracle"
DEFAULT_SYSTEMS = "ragctl,fixed,adaptiverag,parrot,oracle"
"""Methods from cheapest to most expensive (for medians)."""

DESCRIPTIONS = {
    "ragctl": "adaptive: profile -> rules -> best-fit on the engine's free KV cache",
    "ragctl:<objective>": "ragctl with best-fit's objective quality, balanced or latency",
    "fixed": "one static configuration for every query; `fixed` = the default grid",
    "adaptiverag": "AdaptiveRAG*: complexity class -> best configuration on a calibration split",
    "parrot": "Parrot*: median configuration of the profiler's pruned space, no memory awareness",
    "static": "Static*: one configuration chosen ahead on a calibration split (balanced's utility)",
    "oracle": "best fixed configuration per query in hindsight (derived from the fixed runs)",
}


@dataclass(frozen=True)
class System:
    name: str
    """As written in results: `ragctl`, `fixed:stuff:5`, `adaptiverag`, `parrot`."""
    kind: Kind
    config: Config | None = None
    """The configuration of a `fixed` system."""
    objective: Objective | None = None
    """Best-fit's objective of a `ragctl:<objective>` system (None: the settings')."""


def fixed_system(config: Config) -> System:
    return System(FIXED_PREFIX + config.label, "fixed", config)


@dataclass(frozen=True)
class Plan:
    """What `ragctl eval run` runs: the systems, and whether the oracle is derived."""

    systems: tuple[System, ...]
    oracle: bool

    @property
    def grid(self) -> tuple[Config, ...]:
        return tuple(s.config for s in self.systems if s.kind == "fixed" and s.config)

    @property
    def needs_calibration(self) -> bool:
        return any(s.kind in ("adaptiverag", "static") for s in self.systems)


def system_order(name: str) -> tuple[Any, ...]:
    """Sort key: ragctl, adaptiverag, parrot, static, other systems, then `fixed:*` by method,
    chunks and summary budget."""
    if name == RAGCTL:
        return (0, 0, "", 0, 0)
    if name.startswith(RAGCTL + ":"):
        return (0, 0, name, 0, 0)
    if name in BASELINES:
        return (0, 1 + BASELINES.index(name), "", 0, 0)
    if name.startswith(FIXED_PREFIX):
        try:
            c = Config.parse(name[len(FIXED_PREFIX) :])
        except ValueError:
            return (3, 0, name, 0, 0)
        return (2, 0, c.method, c.num_chunks, c.intermediate_length or 0)
    return (1, 0, name, 0, 0)


def parse_systems(text: str, grid: Sequence[Config] = DEFAULT_GRID) -> Plan:
    """`ragctl,fixed,adaptiverag,parrot,oracle`; `fixed` expands to `grid`, `fixed:stuff:5`
    names one configuration. Unknown names are a clear error."""
    systems: dict[str, System] = {}
    oracle = False
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name == ORACLE:
            oracle = True
        elif name == "fixed":
            for c in grid:
                systems[FIXED_PREFIX + c.label] = fixed_system(c)
        elif name.startswith(FIXED_PREFIX):
            try:
                config = Config.parse(name[len(FIXED_PREFIX) :])
            except ValueError as e:
                raise InvalidRequest(f"system {name!r}: {e}") from None
            systems[FIXED_PREFIX + config.label] = fixed_system(config)
        elif name.startswith(RAGCTL + ":"):
            objective = name[len(RAGCTL) + 1 :]
            if objective not in OBJECTIVES:
                raise InvalidRequest(
                    f"system {name!r}: the objective must be one of {', '.join(OBJECTIVES)}"
                )
            systems[name] = System(name, "ragctl", objective=objective)  # type: ignore[arg-type]
        elif name in (RAGCTL, *BASELINES):
            systems[name] = System(name, name)  # type: ignore[arg-type]
        else:
            known = ", ".join(DESCRIPTIONS)
            raise InvalidRequest(
                f"unknown system {name!r}; known: {known}, fixed:<config>"
            )
    if not systems:
        raise InvalidRequest("no systems to run")
    plan = Plan(tuple(systems.values()), oracle)
    if oracle and len(plan.grid) < 2:
        raise InvalidRequest("the oracle picks among fixed configurations: add `fixed` or several")
    return plan


def complexity_class(profile: Profile | None) -> str:
    """AdaptiveRAG*'s query class: the profiler's complexity (and joint reasoning)."""
    if profile is None:
        return "unknown"
    return f"{profile.complexity}-{'joint' if profile.joint_reasoning else 'single'}"


STATIC = "static"
"""The calibration table's entry for Static*'s configuration (no complexity class is named so)."""


def calibrate(
    rows: Iterable[Mapping[str, Any]],
    classes: Mapping[str, str],
    delay_weight: float = DEFAULT_DELAY_WEIGHT,
) -> dict[str, str]:
    """The calibration table: AdaptiveRAG*'s configuration per class, the fixed configuration
    with the best mean primary score over that class's calibration queries (ties: the lower
    mean delay), plus `*`, the best overall, for classes calibration never saw; and under
    `STATIC`, Static*'s: the best mean primary score q less `delay_weight` x its mean delay d
    over the fastest one's (`balanced`'s utility, `scheduler.objective`, on measured means;
    ties: the lower d). `rows` are fixed-system sample rows; `classes` maps query id -> class.
    A configuration that failed a query scores 0 on it; a query without references (no score
    for anyone) is left out."""
    by: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if not str(r["system"]).startswith(FIXED_PREFIX):
            continue
        primary = 0.0 if r.get("error") else (r.get("scores") or {}).get(r["primary"])
        if primary is None:
            continue
        config = str(r["system"])[len(FIXED_PREFIX) :]
        for cls in (classes.get(r["query_id"], "unknown"), "*"):
            by[(cls, config)].append((float(primary), float(r["delay_s"])))
    best: dict[str, tuple[float, float, str]] = {}
    means: dict[str, tuple[float, float]] = {}
    for (cls, config), values in sorted(by.items()):
        quality = statistics.fmean(v[0] for v in values)
        delay = statistics.fmean(v[1] for v in values)
        if cls == "*":
            means[config] = (quality, delay)
        key = (quality, -delay, config)
        if cls not in best or key > (best[cls][0], -best[cls][1], best[cls][2]):
            best[cls] = (quality, delay, config)
    if "*" not in best:
        raise InvalidRequest("calibration produced no scored answers; nothing to calibrate on")
    table = {cls: v[2] for cls, v in best.items()}
    unit = max(min(d for _, d in means.values()), 1e-9)
    table[STATIC] = max(
        means, key=lambda c: (means[c][0] - delay_weight * means[c][1] / unit, -means[c][1], c)
    )
    return table


def static_config(table: Mapping[str, str]) -> Config:
    """Static*'s configuration from the calibration table."""
    if STATIC not in table:
        raise InvalidRequest(
            "static needs a calibration table with its choice (made before it existed): "
            "calibrate again in a new --out folder"
        )
    return Config.parse(table[STATIC])


def adaptiverag_config(table: Mapping[str, str], profile: Profile | None) -> Config:
    return Config.parse(table.get(complexity_class(profile), table["*"]))


def median_config(space: ConfigSpace) -> Config:
    """Parrot*'s pick: the median of each knob of the pruned space (lower median; methods from
    cheapest to most expensive)."""
    methods = sorted(space.methods, key=METHODS.index)
    method = methods[(len(methods) - 1) // 2]
    lo, hi = space.num_chunks
    n = (lo + hi) // 2
    if method not in TAKES_INTERMEDIATE:
        return Config(method, n)
    lengths = sorted(space.intermediate_lengths)
    return Config(method, n, lengths[(len(lengths) - 1) // 2])


def split(items: Sequence[Any], limit: int, calibration: int, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the first `limit` for testing and the last `calibration` for
    calibration: the two never overlap, and a larger `limit` keeps the earlier test items."""
    import random

    if limit < 1:
        raise InvalidRequest(f"--limit must be at least 1, got {limit}")
    order = list(items)
    random.Random(seed).shuffle(order)
    if limit + calibration > len(order):
        raise InvalidRequest(
            f"{limit} test + {calibration} calibration queries exceed the {len(order)} there are"
        )
    test = order[:limit]
    calib = order[len(order) - calibration :] if calibration else []
    return test, calib
