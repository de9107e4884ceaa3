"""Offline throughput-maximising allocation (Patchwork-style): measure each component's latency
against batch size on this machine (`profile`), fit piecewise-linear curves (`curves`), solve a
MILP for batch sizes, thread shares and engine concurrency (`milp`), and write the plan file that
`serve` and `eval run` apply (`plan`). `run` strings them together for `ragctl allocate`.

The pure parts (curves, milp, plan) import nothing heavier than numpy, scipy and PyYAML; the
measuring part imports the engine and the retriever only when it runs."""

from ragctl.allocation.curves import Curve, PiecewiseLinear, fit_piecewise_linear
from ragctl.allocation.milp import (
    CpuComponent,
    EngineComponent,
    Problem,
    Solution,
    problem_from_curves,
    solve,
)
from ragctl.allocation.plan import PlanFile, load_plan, write_plan

__all__ = [
    "CpuComponent",
    "Curve",
    "EngineComponent",
    "PiecewiseLinear",
    "PlanFile",
    "Problem",
    "Solution",
    "fit_piecewise_linear",
    "load_plan",
    "problem_from_curves",
    "solve",
    "write_plan",
]
