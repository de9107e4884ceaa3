"""The throughput-maximising allocation as a small MILP (scipy's HiGHS), Patchwork-style.

Pure: plain dataclasses in, a `Solution` out; nothing here measures or starts anything.

Model. `T` is the end-to-end throughput in queries/s. Each component `c` is visited `visits_c`
times per query (embed 1, search 1, profile 1, map = mean mapper calls per query, ...).

- A CPU component picks one (batch b, threads t) option (binary `x[c,b,t]`); a batch of b takes
  `L_c(b,t)` seconds, so it serves at most `b / L_c(b,t)` visits/s:
  `sum_o x[c,o] * b_o / L_c(o) >= visits_c * T`. The chosen threads of all CPU components share
  the CPU budget: `sum x[c,o] * t_o <= cpu_threads` (each component runs its own batch worker, so
  their threads add up). Components named together in `same_threads` must pick one thread count
  (ragctl has one `retrieval_threads` setting for embedding and search).
- Each engine picks its max concurrent sequences b (binary `x[e,b]`). Engine calls of every kind
  run batched up to b, so a call of kind c costs the engine `L_c(b) / b` seconds; each engine
  component is assigned to one engine (binary `z[c,e]`; `same_engine` groups go together, e.g.
  all synthesis kinds), and an engine's busy fraction must stay within 1:
  `sum_c visits_c * T * L_c(b_e) / b_e <= 1`. That product of T with binaries is linearised
  exactly: `u[c,e,b] = x[e,b] AND z[c,e]` (u <= x, u <= z, u >= x + z - 1) and `w[c,e,b] = T * u`
  by McCormick over `0 <= T <= T_max` (w <= T_max u, w <= T, w >= T - T_max (1 - u), w >= 0),
  which is exact because u is binary. Then `sum_{c,b} visits_c L_c(b) / b * w[c,e,b] <= 1`.
- An optional latency cap removes every option whose batch takes longer than the cap.

Maximise T; then, among allocations within 1e-6 of that T, prefer the shortest batches (lower
latency) and fewest threads (a second solve), so components that are not the bottleneck do not
batch or spread more than they need to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragctl.allocation.curves import CPU_COMPONENTS, SYNTHESIS_COMPONENTS, Curve
from ragctl.errors import InvalidRequest, MissingDependency, RuntimeFailure

MIN_LATENCY_S = 1e-9
"""Latencies are clamped up to this (a zero would mean unbounded capacity)."""
TIE_TOLERANCE = 1e-6
"""Relative throughput given up, at most, in the second solve that prefers short batches."""


@dataclass(frozen=True)
class CpuComponent:
    """A component that runs on this process's CPU threads."""

    name: str
    visits: float
    """Visits per query."""
    latency: Mapping[tuple[int, int], float]
    """(batch size, threads) -> seconds to process one batch."""


@dataclass(frozen=True)
class EngineComponent:
    """A kind of engine call."""

    name: str
    visits: float
    """Calls per query."""
    latency: Mapping[int, float]
    """b calls submitted at once -> seconds until all b are done."""


@dataclass(frozen=True)
class Problem:
    cpu: tuple[CpuComponent, ...] = ()
    engine: tuple[EngineComponent, ...] = ()
    cpu_threads: int = 1
    """CPU threads the CPU components share."""
    engines: int = 1
    engine_batch_sizes: tuple[int, ...] | None = None
    """Candidate max concurrent sequences per engine. None: the batch sizes every engine
    component has a latency for."""
    latency_cap_s: float | None = None
    """Longest a batch (CPU) or a batch of engine calls may take; None: no cap."""
    same_threads: tuple[tuple[str, ...], ...] = ()
    """Groups of CPU components that must use one thread count."""
    same_engine: tuple[tuple[str, ...], ...] = ()
    """Groups of engine components that must run on the same engine."""


@dataclass(frozen=True)
class CpuChoice:
    batch: int
    threads: int
    latency_s: float
    """Seconds per batch at this choice."""
    utilisation: float
    """Share of the component's capacity the planned throughput uses (1: binding)."""


@dataclass(frozen=True)
class EngineChoice:
    max_num_seqs: int
    components: tuple[str, ...]
    busy: float
    """Busy fraction of the engine at the planned throughput (1: binding)."""
    shares: Mapping[str, float] = field(default_factory=dict)
    """Busy fraction by component."""


@dataclass(frozen=True)
class Solution:
    throughput_qps: float
    cpu: Mapping[str, CpuChoice]
    engines: tuple[EngineChoice, ...]
    assignment: Mapping[str, int]
    """Engine component -> engine index."""
    engine_latency_s: Mapping[str, float]
    """Engine component -> seconds for a batch of its engine's max_num_seqs calls."""
    bottleneck: str
    """The binding component: the busiest CPU component, or the biggest share of the busiest
    engine."""
    bottleneck_resource: str
    """`cpu:<component>` or `engine<i>`."""
    utilisation: Mapping[str, float]
    """Resource (`cpu:<component>`, `engine<i>`) -> busy fraction at the planned throughput."""
    status: str
    cpu_threads_used: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "throughput_qps": self.throughput_qps,
            "bottleneck": self.bottleneck,
            "bottleneck_resource": self.bottleneck_resource,
            "status": self.status,
            "cpu_threads_used": self.cpu_threads_used,
            "cpu": {k: vars(v) for k, v in self.cpu.items()},
            "engines": [
                {
                    "max_num_seqs": e.max_num_seqs,
                    "components": list(e.components),
                    "busy": e.busy,
                    "shares": dict(e.shares),
                }
                for e in self.engines
            ],
            "assignment": dict(self.assignment),
            "engine_latency_s": dict(self.engine_latency_s),
            "utilisation": dict(self.utilisation),
        }


class _Vars:
    """Column bookkeeping for the MILP."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []

    def add(self, lb: float, ub: float, integer: bool) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(1 if integer else 0)
        return len(self.lb) - 1

    def __len__(self) -> int:
        return len(self.lb)


class _Rows:
    def __init__(self) -> None:
        self.rows: list[dict[int, float]] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, coefs: Mapping[int, float], lo: float, hi: float) -> None:
        row: dict[int, float] = {}
        for j, a in coefs.items():
            row[j] = row.get(j, 0.0) + a
        self.rows.append(row)
        self.lo.append(lo)
        self.hi.append(hi)

    def matrix(self, n: int) -> np.ndarray:
        a = np.zeros((len(self.rows), n))
        for i, row in enumerate(self.rows):
            for j, v in row.items():
                a[i, j] = v
        return a


def _check(problem: Problem) -> None:
    names = [c.name for c in problem.cpu] + [c.name for c in problem.engine]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InvalidRequest(f"component names must be unique: {sorted(dup)}")
    if problem.cpu_threads < 1:
        raise InvalidRequest(f"the CPU thread budget must be >= 1, got {problem.cpu_threads}")
    if problem.engines < 1:
        raise InvalidRequest(f"the number of engines must be >= 1, got {problem.engines}")
    if problem.latency_cap_s is not None and problem.latency_cap_s <= 0:
        raise InvalidRequest(f"the latency cap must be positive, got {problem.latency_cap_s}")
    for c in (*problem.cpu, *problem.engine):
        if not math.isfinite(c.visits) or c.visits < 0:
            raise InvalidRequest(f"{c.name}: visits per query must be >= 0, got {c.visits}")
        if not c.latency:
            raise InvalidRequest(f"{c.name}: no latency measurements")
        for key, s in c.latency.items():
            b = key[0] if isinstance(key, tuple) else key
            if b < 1 or not math.isfinite(s) or s < 0:
                raise InvalidRequest(f"{c.name}: bad latency {s!r} at batch {key!r}")
    cpu_names = {c.name for c in problem.cpu}
    engine_names = {c.name for c in problem.engine}
    for group in problem.same_threads:
        unknown = set(group) - cpu_names
        if unknown:
            raise InvalidRequest(f"same_threads names unknown CPU components: {sorted(unknown)}")
    for group in problem.same_engine:
        unknown = set(group) - engine_names
        if unknown:
            raise InvalidRequest(f"same_engine names unknown engine components: {sorted(unknown)}")


def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def solve(problem: Problem) -> Solution:
    """The allocation that maximises throughput (see the module docstring). Components with no
    visits are left out. Raises `InvalidRequest` when nothing meets the latency cap (naming the
    component), `RuntimeFailure` when the solver fails otherwise."""
    _check(problem)
    cap = problem.latency_cap_s
    cpu = [c for c in problem.cpu if c.visits > 0]
    eng = [c for c in problem.engine if c.visits > 0]
    if not cpu and not eng:
        raise InvalidRequest("no component is visited: nothing to allocate")

    # -- candidate options, with the latency cap applied -------------------------------------
    cpu_opts: dict[str, list[tuple[int, int, float]]] = {}
    for c in cpu:
        opts = [
            (b, t, max(s, MIN_LATENCY_S))
            for (b, t), s in sorted(c.latency.items())
            if t <= problem.cpu_threads
        ]
        if not opts:
            raise InvalidRequest(
                f"{c.name}: no measured option uses at most {problem.cpu_threads} CPU threads"
            )
        within = [o for o in opts if cap is None or o[2] <= cap]
        if not within:
            fastest = min(o[2] for o in opts)
            raise InvalidRequest(
                f"latency cap {_ms(cap or 0)} is infeasible: {c.name} takes at least "
                f"{_ms(fastest)} per batch"
            )
        cpu_opts[c.name] = within
    if len(cpu) > problem.cpu_threads:
        raise InvalidRequest(
            f"{len(cpu)} CPU components ({', '.join(c.name for c in cpu)}) need a thread each; "
            f"the CPU thread budget is {problem.cpu_threads}"
        )
    sizes = problem.engine_batch_sizes
    if sizes is None:
        common = set.intersection(*(set(c.latency) for c in eng)) if eng else set()
        sizes = tuple(sorted(common))
    sizes = tuple(sorted(set(sizes)))
    if eng and not sizes:
        raise InvalidRequest("the engine components share no measured batch size")
    lat: dict[tuple[str, int], float] = {}
    for c in eng:
        missing = [b for b in sizes if b not in c.latency]
        if missing:
            raise InvalidRequest(f"{c.name}: no latency at engine batch sizes {missing}")
        for b in sizes:
            lat[c.name, b] = max(c.latency[b], MIN_LATENCY_S)
        if cap is not None and all(lat[c.name, b] > cap for b in sizes):
            fastest = min(lat[c.name, b] for b in sizes)
            raise InvalidRequest(
                f"latency cap {_ms(cap)} is infeasible: {c.name} calls take at least "
                f"{_ms(fastest)} per batch"
            )

    # Upper bound on T: every component alone at its best option.
    caps = [max(b / (c.visits * s) for b, _, s in cpu_opts[c.name]) for c in cpu]
    caps += [max(b / (c.visits * lat[c.name, b]) for b in sizes) for c in eng]
    t_max = min(caps) * 1.01

    # -- variables ----------------------------------------------------------------------------
    v = _Vars()
    T = v.add(0.0, t_max, False)
    x_cpu = {(c.name, b, t): v.add(0, 1, True) for c in cpu for b, t, _ in cpu_opts[c.name]}
    E = range(problem.engines)
    x_eng = {(e, b): v.add(0, 1, True) for e in E for b in sizes} if eng else {}
    z = {(c.name, e): v.add(0, 1, True) for c in eng for e in E}
    u: dict[tuple[str, int, int], int] = {}
    w: dict[tuple[str, int, int], int] = {}
    for c in eng:
        for e in E:
            for b in sizes:
                allowed = cap is None or lat[c.name, b] <= cap
                u[c.name, e, b] = v.add(0, 1 if allowed else 0, True)
                w[c.name, e, b] = v.add(0.0, t_max, False)

    # -- constraints --------------------------------------------------------------------------
    r = _Rows()
    for c in cpu:
        opts = cpu_opts[c.name]
        r.add({x_cpu[c.name, b, t]: 1.0 for b, t, _ in opts}, 1, 1)
        # Capacity: sum x * b / L >= visits * T.
        row = {x_cpu[c.name, b, t]: b / s for b, t, s in opts}
        row[T] = -c.visits
        r.add(row, 0.0, np.inf)
    if cpu:
        r.add({x_cpu[k]: float(k[2]) for k in x_cpu}, -np.inf, problem.cpu_threads)
    for group in problem.same_threads:
        members = [g for g in group if g in cpu_opts]
        threads = sorted({t for g in members for _, t, _ in cpu_opts[g]})
        for a, b_ in zip(members, members[1:], strict=False):
            for t in threads:
                row = {x_cpu[a, bb, tt]: 1.0 for bb, tt, _ in cpu_opts[a] if tt == t}
                for bb, tt, _ in cpu_opts[b_]:
                    if tt == t:
                        row[x_cpu[b_, bb, tt]] = row.get(x_cpu[b_, bb, tt], 0.0) - 1.0
                r.add(row, 0, 0)
    if eng:
        for e in E:
            r.add({x_eng[e, b]: 1.0 for b in sizes}, 1, 1)
        for c in eng:
            r.add({z[c.name, e]: 1.0 for e in E}, 1, 1)
        for group in problem.same_engine:
            members = [g for g in group if any(g == c.name for c in eng)]
            for a, b_ in zip(members, members[1:], strict=False):
                for e in E:
                    r.add({z[a, e]: 1.0, z[b_, e]: -1.0}, 0, 0)
        for c in eng:
            for e in E:
                for b in sizes:
                    ui, wi, xi, zi = u[c.name, e, b], w[c.name, e, b], x_eng[e, b], z[c.name, e]
                    r.add({ui: 1.0, xi: -1.0}, -np.inf, 0)
                    r.add({ui: 1.0, zi: -1.0}, -np.inf, 0)
                    r.add({ui: 1.0, xi: -1.0, zi: -1.0}, -1.0, np.inf)
                    r.add({wi: 1.0, ui: -t_max}, -np.inf, 0)
                    r.add({wi: 1.0, T: -1.0}, -np.inf, 0)
                    r.add({wi: 1.0, T: -1.0, ui: -t_max}, -t_max, np.inf)
        for e in E:
            busy = {w[c.name, e, b]: c.visits * lat[c.name, b] / b for c in eng for b in sizes}
            r.add(busy, -np.inf, 1.0)

    # -- solve: max T, then the shortest batches at (almost) that T ------------------------------
    n = len(v)
    obj = np.zeros(n)
    obj[T] = -1.0
    first, status = _milp(obj, r, v, n)
    if first is None:
        raise InvalidRequest(
            "no allocation meets the constraints"
            + (f" (latency cap {_ms(cap)})" if cap is not None else "")
        )
    best_t = float(first[T])
    r.add({T: 1.0}, best_t * (1 - TIE_TOLERANCE), np.inf)
    obj2 = np.zeros(n)
    scale = max(
        [s for o in cpu_opts.values() for _, _, s in o] + list(lat.values()) + [MIN_LATENCY_S]
    )
    for (_, _, t), j in x_cpu.items():
        obj2[j] += 1e-3 * t / problem.cpu_threads
    for c in cpu:
        for b, t, s in cpu_opts[c.name]:
            obj2[x_cpu[c.name, b, t]] += s / scale
    for (name, _, b), j in u.items():
        obj2[j] += lat[name, b] / scale
    second, status2 = _milp(obj2, r, v, n)
    if second is not None:
        first, status = second, status2
    return _solution(problem, first, status, cpu, cpu_opts, eng, sizes, lat, x_cpu, x_eng, z)


def _milp(obj: np.ndarray, rows: _Rows, v: _Vars, n: int) -> tuple[np.ndarray | None, str]:
    """The solver's x (None when infeasible) and its status in words."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as e:
        raise MissingDependency(
            f"the allocation MILP needs scipy >= 1.9: pip install 'ragctl[eval]' ({e})"
        ) from e

    cons = [LinearConstraint(rows.matrix(n), rows.lo, rows.hi)] if rows.rows else []
    res = milp(
        obj,
        constraints=cons,
        integrality=np.array(v.integer),
        bounds=Bounds(v.lb, v.ub),
        options={"mip_rel_gap": 1e-9, "time_limit": 60.0},
    )
    if res.status == 2:  # infeasible
        return None, "infeasible"
    if res.x is None:
        raise RuntimeFailure(f"the allocation MILP failed: {res.message}")
    return np.asarray(res.x), "optimal" if res.status == 0 else f"feasible ({res.message})"


def _solution(
    problem: Problem,
    x: np.ndarray,
    status: str,
    cpu: Sequence[CpuComponent],
    cpu_opts: Mapping[str, list[tuple[int, int, float]]],
    eng: Sequence[EngineComponent],
    sizes: tuple[int, ...],
    lat: Mapping[tuple[str, int], float],
    x_cpu: Mapping[tuple[str, int, int], int],
    x_eng: Mapping[tuple[int, int], int],
    z: Mapping[tuple[str, int], int],
) -> Solution:
    # Read the choices, then compute the throughput they allow exactly (the solver's T is
    # within its tolerances, and the second solve may give up TIE_TOLERANCE of it).
    picked = {
        c.name: max(cpu_opts[c.name], key=lambda o, n=c.name: x[x_cpu[n, o[0], o[1]]]) for c in cpu
    }
    loads: dict[str, float] = {}  # resource -> busy fraction per unit of throughput
    for c in cpu:
        b, _, s = picked[c.name]
        loads[f"cpu:{c.name}"] = c.visits * s / b
    chosen_b: dict[int, int] = {}
    per_unit: dict[int, dict[str, float]] = {}
    for e in range(problem.engines if eng else 0):
        b = max(sizes, key=lambda bb, e=e: x[x_eng[e, bb]])
        chosen_b[e] = b
        per_unit[e] = {c.name: c.visits * lat[c.name, b] / b for c in eng if x[z[c.name, e]] > 0.5}
        loads[f"engine{e}"] = sum(per_unit[e].values())
    tput = min(1 / v for v in loads.values() if v > 0)
    util = {k: v * tput for k, v in loads.items()}
    cpu_choice = {
        c.name: CpuChoice(picked[c.name][0], picked[c.name][1], picked[c.name][2],
                          util[f"cpu:{c.name}"])
        for c in cpu
    }  # fmt: skip
    engines: list[EngineChoice] = []
    assignment: dict[str, int] = {}
    eng_lat: dict[str, float] = {}
    for e, b in chosen_b.items():
        shares = {name: v * tput for name, v in per_unit[e].items()}
        for name in shares:
            assignment[name] = e
            eng_lat[name] = lat[name, b]
        engines.append(EngineChoice(b, tuple(shares), util[f"engine{e}"], shares))
    resource = max(util, key=lambda k: util[k])
    if resource.startswith("cpu:"):
        bottleneck = resource[4:]
    else:
        shares = engines[int(resource[len("engine") :])].shares
        bottleneck = max(shares, key=lambda k: shares[k]) if shares else resource
    return Solution(
        throughput_qps=tput,
        cpu=cpu_choice,
        engines=tuple(engines),
        assignment=assignment,
        engine_latency_s=eng_lat,
        bottleneck=bottleneck,
        bottleneck_resource=resource,
        utilisation=util,
        status=status,
        cpu_threads_used=sum(ch.threads for ch in cpu_choice.values()),
    )


def problem_from_curves(
    curves: Sequence[Curve],
    visits: Mapping[str, float],
    *,
    cpu_threads: int,
    engines: int = 1,
    engine_batch_sizes: Sequence[int] | None = None,
    latency_cap_s: float | None = None,
    same_threads: Sequence[Sequence[str]] = (CPU_COMPONENTS,),
    same_engine: Sequence[Sequence[str]] = (SYNTHESIS_COMPONENTS,),
) -> Problem:
    """The MILP over measured curves: curves with a thread count are CPU components (options:
    every measured batch size at every measured thread count), the others engine call kinds
    (candidates: `engine_batch_sizes`, else the batch sizes measured for all of them). Latencies
    are the fits' predictions. Components without visits are left out. Defaults: embed and
    search share one thread count (ragctl's `retrieval_threads`), and all synthesis kinds run on
    one engine (the profiler may get its own)."""
    cpu: dict[str, dict[tuple[int, int], float]] = {}
    eng: dict[str, Curve] = {}
    for c in curves:
        if c.threads is None:
            if c.component in eng:
                raise InvalidRequest(f"two engine curves for {c.component}")
            eng[c.component] = c
        else:
            opts = cpu.setdefault(c.component, {})
            for b in c.batch_sizes:
                opts[b, c.threads] = c.predict(b)
    if engine_batch_sizes is None and eng:
        sizes = set.intersection(*(set(c.batch_sizes) for c in eng.values()))
    else:
        sizes = set(engine_batch_sizes or ())
    cpu_names = [n for n in cpu if visits.get(n, 0) > 0]
    eng_names = [n for n in eng if visits.get(n, 0) > 0]
    return Problem(
        cpu=tuple(CpuComponent(n, float(visits[n]), cpu[n]) for n in cpu_names),
        engine=tuple(
            EngineComponent(n, float(visits[n]), {b: eng[n].predict(b) for b in sorted(sizes)})
            for n in eng_names
        ),
        cpu_threads=cpu_threads,
        engines=engines,
        engine_batch_sizes=tuple(sorted(sizes)) if eng_names else None,
        latency_cap_s=latency_cap_s,
        same_threads=_groups(same_threads, cpu_names),
        same_engine=_groups(same_engine, eng_names),
    )


def _groups(groups: Sequence[Sequence[str]], present: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    out = []
    for g in groups:
        kept = tuple(n for n in g if n in present)
        if len(kept) > 1:
            out.append(kept)
    return tuple(out)
