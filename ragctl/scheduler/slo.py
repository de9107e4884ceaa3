"""SLO tracking and mitigation: Patchwork's online loop, plus changing a request's configuration.

- The predictor: the engine's load-aware `DelayModel` (`scheduler.cost`: seconds from each
  stage's tokens and the calls in flight, fitted online) once it is `ready` and the request's
  planned work is known; else `StageStats`, running averages of stage seconds per (stage,
  configuration), from which `predict_synthesis` estimates a configuration's synthesis time and
  `remaining_s` what an in-flight request still needs (`SLOTracker(predictor="averages")`
  keeps to them). `BaselineEstimator` (one running average of synthesis time, whatever the
  configuration) is what both are measured against: the tracker records the error of all three.
- `choose_within_slo` (pure) is best-fit restricted to the configurations predicted to meet the
  time left: the chosen one if it meets at face value; else the space's largest fitting one that
  meets at the predictor's 75th percentile error (`SLOTracker.margin`); else a cheaper one
  outside the space (`below-profile`); else the fastest that fits (`unmeetable`). The Plan says
  which.
- `SLOTracker` holds the in-flight requests of one engine. A request predicted to miss its
  deadline is flagged (sticky): its later engine calls get a better vLLM priority, and new
  requests wait at the gate while a flagged request can still make it (Patchwork pauses
  admissions). Triage: a request that cannot make it any more (past its deadline, or planned
  `unmeetable`) is hopeless: its calls go at a worse priority, behind everyone who still can,
  and it pauses nobody; it is still answered. Shedding (off by default, on in `admission`):
  predictions are read at the predictor's own median error (`SLOTracker.calibration`, the
  median of actual / predicted) and a request whose fastest fitting configuration is then
  predicted to miss is refused before any engine call (`SLOUnmeetable`): near capacity, its
  work would only make the requests that can still make it miss as well. Shedding is
  work-conserving: with nothing of ragctl's running on the engine, only a request with no time
  left is refused (`choose_within_slo`'s `engine_idle`). Holding (on in `admission`): a
  request about to start its synthesis waits while its prefill would push a request in flight
  past a deadline that request is projected to meet (`SLOTracker.hold`): the engine's steps
  wait for every prefill, so each arrival delays everyone running beside it, and near capacity
  it is the arrivals after a request started that make it miss. A request in flight is
  projected from its start: the delay model's prediction then, read at its record's
  `HOLD_QUANTILE`, plus the prefill seconds of every stage started beside it since (its
  `stalls_s`). A prefill's seconds come from the engine's own steps where it reports them
  (`step_costs`: a step's seconds fitted on the prompt and generated tokens in it), else from
  the delay model's per-prompt-token coefficient. A held request whose own prediction stops
  meeting its deadline is refused (with `shed`) or goes (without). `Mitigation` switches each
  mechanism on or off.

Only `SLOTracker.gate` and `SLOTracker.hold` await; the clock is injected, so everything is
testable without time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ragctl.engine.base import StepLog
from ragctl.errors import InvalidRequest
from ragctl.scheduler.bestfit import choose, clip_space, fallback_configs, unshown_reserved
from ragctl.scheduler.cost import (
    DelayModel,
    Load,
    LoadMeter,
    StageWork,
    StepCosts,
    fit_step_costs,
)
from ragctl.synthesis import registry
from ragctl.types import Config, ConfigSpace, KVState, Plan, SLORecord

Predictor = Literal["model", "averages"]
PREDICTORS: tuple[Predictor, ...] = ("model", "averages")
PrefillCost = Literal["steps", "model"]
PREFILL_COSTS: tuple[PrefillCost, ...] = ("steps", "model")

MECHANISMS = ("priority", "pause", "config", "triage", "shed", "hold")
MITIGATION_MODES: dict[str, frozenset[str]] = {
    "off": frozenset(),
    "patchwork": frozenset({"priority", "pause"}),
    "adaptive": frozenset({"priority", "pause", "config", "triage"}),
    "admission": frozenset(MECHANISMS),
}
PRE_STAGE = "pre"
"""Everything before synthesis: retrieval and profiling (concurrent) and the decision."""
FLAGGED_PRIORITY = -1
"""vLLM priority of a flagged request's calls (lower runs first; everything else runs at 0)."""
HOPELESS_PRIORITY = 1
"""vLLM priority of a hopeless request's calls under triage: after every request that can still
meet its SLO."""
OPTIMISM_QUANTILE = 0.1
RATIO_WINDOW = 64
MIN_RATIOS = 10
"""`SLOTracker.optimism`: the quantile of actual / predicted synthesis time, over how many of the
last requests, and after how many: the predictor's own error decides when a miss is certain."""
SHED_QUANTILE = 0.5
"""`SLOTracker.calibration`: shedding refuses a request when it is more likely to miss than to
meet by the predictor's own record (the median of actual / predicted)."""
REFIT_STEPS = 64
"""`SLOTracker.step_costs` refits an engine's step costs after this many new steps."""
CHANGE_QUANTILE = 0.75
"""`SLOTracker.margin`: a cheaper configuration, once the one chosen is predicted to miss, must
meet at this quantile of actual / predicted (a plan changed to one that meets only at face value
or at the median misses about as often as the one it replaced: the change must make the cut)."""
HOLD_QUANTILE = 0.75
"""`SLOTracker.hold_scale`: holding reads projections at this quantile of actual / (predicted
+ stalls) over the last `RATIO_WINDOW` requests: a request it protects should seldom take
longer than projected (a projection that runs short lets the prefill through that makes it
miss)."""


@dataclass(frozen=True)
class Mitigation:
    """Which SLO mechanisms are on."""

    priority: bool = True
    pause: bool = True
    config: bool = True
    triage: bool = True
    """A hopeless request (past its deadline, or planned `unmeetable`) yields: its calls go at
    `HOPELESS_PRIORITY` and it pauses nobody."""
    shed: bool = False
    """Refuse (`SLOUnmeetable`, before any engine call) a request whose fastest fitting
    configuration is predicted to miss at the predictor's median error. Needs `config` (the
    planning that predicts each configuration)."""
    hold: bool = False
    """Hold a request before its synthesis while its prefill would push a request in flight past
    a deadline it is projected to meet (`SLOTracker.hold`); refuse it there (with `shed`) once
    its own prediction misses its deadline."""
    max_pause_s: float = 2.0
    """Longest a new request waits at the gate: a bound, so that a flagged request that the
    pause cannot save does not stall admissions for long. A newcomer with an SLO waits at most
    its own slack (`SLOTracker.slack_s`): a pause must not make it miss in turn."""

    def __post_init__(self) -> None:
        if self.shed and not self.config:
            raise InvalidRequest(
                "SLO mitigation 'shed' needs 'config': it refuses a request only when even the "
                "fastest configuration is predicted to miss"
            )

    @classmethod
    def parse(cls, text: str) -> Mitigation:
        """`off`, `patchwork`, `adaptive`, `admission`, or a list joined by `,` or `+` of
        those modes and the mechanisms priority, pause, config, triage, shed, hold (their
        union: `adaptive+shed` is `admission` without `hold`)."""
        parts = [p.strip() for p in text.strip().lower().replace("+", ",").split(",")]
        parts = [p for p in parts if p]
        unknown = [p for p in parts if p not in MITIGATION_MODES and p not in MECHANISMS]
        if unknown or not parts:
            raise InvalidRequest(
                f"unknown SLO mitigation {text!r}: use {', '.join(MITIGATION_MODES)}, or join "
                f"modes and mechanisms ({', '.join(MECHANISMS)}) with ',' or '+'"
            )
        on = frozenset().union(*(MITIGATION_MODES.get(p, {p}) for p in parts))
        return cls(**{m: m in on for m in MECHANISMS})

    @property
    def label(self) -> str:
        on = frozenset(m for m in MECHANISMS if getattr(self, m))
        for name, mechanisms in MITIGATION_MODES.items():
            if on == mechanisms:
                return name
        return ",".join(m for m in MECHANISMS if m in on)


class RunningMean:
    """Exponentially weighted mean: the first observation starts it, later ones move it by
    `alpha` (recent load weighs more than old)."""

    __slots__ = ("alpha", "value", "count")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value = 0.0
        self.count = 0

    def add(self, x: float) -> None:
        self.value = x if self.count == 0 else self.value + self.alpha * (x - self.value)
        self.count += 1


class StageStats:
    """Running averages of stage seconds per (stage, configuration label)."""

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._means: dict[tuple[str, str], RunningMean] = {}

    def observe(self, stage: str, label: str, seconds: float) -> None:
        self._means.setdefault((stage, label), RunningMean(self.alpha)).add(seconds)

    def mean(self, stage: str, label: str) -> float | None:
        m = self._means.get((stage, label))
        return m.value if m is not None and m.count else None

    def stage_mean(self, stage: str, config: Config) -> float | None:
        """Seconds `stage` takes with `config`: its own running mean; unseen, a line over the
        chunk counts seen with the same method and summary budget (proportional when only one
        was seen); None when nothing comparable ran yet."""
        own = self.mean(stage, config.label)
        if own is not None:
            return own
        points = []
        for (s, label), m in self._means.items():
            if s != stage or not m.count:
                continue
            other = Config.parse(label)
            if (other.method, other.intermediate_length) == (
                config.method,
                config.intermediate_length,
            ):
                points.append((other.num_chunks, m.value))
        if not points:
            return None
        if len({k for k, _ in points}) == 1:
            k0 = points[0][0]
            return float(np.mean([v for _, v in points])) * config.num_chunks / k0
        ks, vs = np.array(points, dtype=float).T
        slope, intercept = np.polyfit(ks, vs, 1)
        # A line through noisy points may dip below zero for small k: never predict less
        # than half the fastest seen.
        return max(float(slope * config.num_chunks + intercept), float(vs.min()) / 2)

    def predict_synthesis(self, config: Config) -> float | None:
        """Seconds of all of `config`'s synthesis stages; None when any stage is unknown."""
        total = 0.0
        for stage in registry.spec(config.method).stages:
            s = self.stage_mean(stage, config)
            if s is None:
                return None
            total += s
        return total


class BaselineEstimator:
    """The configuration-blind estimate: one running mean of synthesis seconds."""

    def __init__(self, alpha: float = 0.3) -> None:
        self._mean = RunningMean(alpha)

    def observe(self, seconds: float) -> None:
        self._mean.add(seconds)

    def predict(self) -> float | None:
        return self._mean.value if self._mean.count else None


@dataclass
class _Errors:
    n: int = 0
    abs_s: float = 0.0
    rel: float = 0.0

    def add(self, actual: float, predicted: float) -> None:
        self.n += 1
        self.abs_s += abs(predicted - actual)
        self.rel += abs(predicted - actual) / max(actual, 1e-6)


@dataclass
class PredictionErrors:
    """Errors of synthesis-time predictions made at planning time: `predictor` (what the
    tracker used), `baseline` (configuration-blind) over the `n` requests where both existed;
    `averages` (running averages per configuration) and `model` (the delay model) over the
    requests where each could predict (`averages_n`, `model_n`), and over the `paired_n`
    requests where all three could (`paired_*`: the like-for-like comparison)."""

    n: int = 0
    predictor_abs_s: float = 0.0
    baseline_abs_s: float = 0.0
    predictor_rel: float = 0.0
    baseline_rel: float = 0.0
    averages: _Errors = field(default_factory=_Errors)
    model: _Errors = field(default_factory=_Errors)
    paired: dict[str, _Errors] = field(
        default_factory=lambda: {k: _Errors() for k in ("model", "averages", "baseline")}
    )

    def add(
        self,
        actual: float,
        predicted: float,
        baseline: float,
        *,
        averages: float | None = None,
        model: float | None = None,
    ) -> None:
        self.n += 1
        self.predictor_abs_s += abs(predicted - actual)
        self.baseline_abs_s += abs(baseline - actual)
        scale = max(actual, 1e-6)
        self.predictor_rel += abs(predicted - actual) / scale
        self.baseline_rel += abs(baseline - actual) / scale
        self.add_each(actual, baseline, averages=averages, model=model)

    def add_each(
        self,
        actual: float,
        baseline: float | None,
        *,
        averages: float | None = None,
        model: float | None = None,
    ) -> None:
        """The per-predictor errors alone (also where the tracker's own had no prediction)."""
        if averages is not None:
            self.averages.add(actual, averages)
        if model is not None:
            self.model.add(actual, model)
        if None not in (averages, model, baseline):
            for k, v in (("model", model), ("averages", averages), ("baseline", baseline)):
                self.paired[k].add(actual, v)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, float | int | None]:
        n = self.n

        def mean(x: float, k: int) -> float | None:
            return x / k if k else None

        pn = self.paired["model"].n
        return {
            "n": n,
            "predictor_mae_s": self.predictor_abs_s / n if n else None,
            "baseline_mae_s": self.baseline_abs_s / n if n else None,
            "predictor_mape": self.predictor_rel / n if n else None,
            "baseline_mape": self.baseline_rel / n if n else None,
            "averages_n": self.averages.n,
            "averages_mae_s": mean(self.averages.abs_s, self.averages.n),
            "averages_mape": mean(self.averages.rel, self.averages.n),
            "model_n": self.model.n,
            "model_mae_s": mean(self.model.abs_s, self.model.n),
            "model_mape": mean(self.model.rel, self.model.n),
            "paired_n": pn,
            **{f"paired_{k}_mape": mean(e.rel, pn) for k, e in self.paired.items()},
        }


def remaining_s(
    stats: StageStats,
    baseline: BaselineEstimator,
    stage: str,
    config: Config | None,
    in_stage_s: float,
) -> float | None:
    """Seconds a request still needs: what its current stage is expected to take beyond the
    `in_stage_s` already spent (at least 0), plus its later stages. Before planning (config
    None) the synthesis part is the baseline's. None when something is unknown yet."""
    if config is None:
        pre = stats.mean(PRE_STAGE, "*") if stage == PRE_STAGE else 0.0
        synth = baseline.predict()
        if pre is None or synth is None:
            return None
        return max(pre - in_stage_s, 0.0) + synth
    stages = registry.spec(config.method).stages
    if stage not in stages:  # planned, not yet synthesising (admission queue)
        return stats.predict_synthesis(config)
    left = 0.0
    for i, s in enumerate(stages[stages.index(stage) :]):
        expected = stats.stage_mean(s, config)
        if expected is None:
            return None
        left += max(expected - in_stage_s, 0.0) if i == 0 else expected
    return left


# -- planning under an SLO (pure) ---------------------------------------------------------------


def choose_within_slo(
    space: ConfigSpace,
    kv: KVState,
    reserved_total: int,
    need: Callable[[Config], int],
    *,
    joint_reasoning: bool,
    max_chunks: int,
    predict: Callable[[Config], float | None],
    budget_s: float,
    chooser: Callable[..., Plan] = choose,
    optimism: float = 1.0,
    calibration: float = 1.0,
    margin: float | None = None,
    shed: bool = False,
    engine_idle: bool = False,
) -> Plan:
    """Best-fit that keeps the request's time budget.

    1. best-fit over the space; if its choice is predicted to meet `budget_s` (or cannot be
       predicted yet while some time is left), that is the plan (no `slo_action`).
    2. else best-fit over the configurations predicted to meet it with `margin` (predicted x
       `margin` <= budget; `margin`, a high quantile of actual / predicted:
       `SLOTracker.margin`; None: read as the chosen one was): the largest of the space that
       fits (`cheaper-config`), else of the cheaper ones outside it (`below-profile`).
    3. else, of everything that fits now, the one predicted fastest: `unmeetable` only when
       even the predictor's optimistic error says it misses (predicted x `optimism` > budget;
       `optimism` <= 1, a low quantile of actual / predicted: `SLOTracker.optimism`), since
       triage gives such a request up; otherwise the fastest goes as a `cheaper-config` or
       `below-profile` plan that can still be saved.
    With `shed`, every prediction is read times `calibration` (the median of actual /
    predicted: `SLOTracker.calibration`) before it is held against the budget, and where step 3
    is reached and the fastest still misses so read (or no time is left at all), the plan is
    `shed`: the caller refuses the request instead of running it.
    Shedding and the margin are work-conserving: with `engine_idle` (no synthesis call of
    ragctl's runs), predictions are taken at face value and refuse nothing; only a request
    with no time left is shed. A refusal on an idle engine frees nothing for anyone, and the
    request it refuses is what would refresh the record and the predictor: refusing on a stale
    record (a burst taught it 4x; seen at 3x of 1/p50: 40 of 40 refused) or on stale running
    averages (learned from a few requests under load before the delay model was ready; seen
    near capacity: 40 of 40 refused, none held) leaves both stale for good and refuses
    everything after.
    A `wait` plan stays a wait: when nothing fits, nothing faster fits either.
    `chooser` is best-fit (`choose`, or `objective.choose_objective` with its predictors bound);
    "largest" above is its pick.
    """
    kwargs = {"joint_reasoning": joint_reasoning, "max_chunks": max_chunks}
    base = chooser(space, kv, reserved_total, need, **kwargs)
    if base.config is None:
        return base
    scale = calibration if shed and not engine_idle else 1.0
    change = 1.0 if engine_idle else scale if margin is None else margin
    predicted = predict(base.config)
    if predicted is None and budget_s > 0:
        return base  # time is left and nothing says this configuration would overrun it
    if predicted is not None and predicted * scale <= budget_s:
        return base

    def meets(c: Config) -> bool:
        p = predict(c)
        return p is not None and p * change <= budget_s

    plan = chooser(space, kv, reserved_total, need, admissible=meets, **kwargs)
    if plan.config is not None:
        action = "cheaper-config" if plan.reason == "fit" else "below-profile"
        return dataclasses.replace(plan, slo_action=action)
    available = kv.free_blocks - unshown_reserved(reserved_total, kv)
    clipped = clip_space(space, max_chunks)
    candidates = [
        c
        for c in (*clipped.configs(), *fallback_configs(clipped, joint_reasoning=joint_reasoning))
        if need(c) <= available
    ]
    known = [(p, c) for c in candidates if (p := predict(c)) is not None]
    if not known:
        return dataclasses.replace(base, slo_action="shed") if shed and budget_s <= 0 else base
    seconds, fastest = min(known, key=lambda pc: (pc[0], pc[1].num_chunks))
    if shed and (budget_s <= 0 or (not engine_idle and seconds * scale > budget_s)):
        action = "shed"
    elif seconds * min(optimism, 1.0) > budget_s:
        action = "unmeetable"
    else:
        action = "cheaper-config" if fastest in clipped.configs() else "below-profile"
    return dataclasses.replace(base, config=fastest, need_blocks=need(fastest), slo_action=action)


# -- the online loop ----------------------------------------------------------------------------


_ids = itertools.count()


@dataclass(eq=False)
class Tracked:
    """One in-flight request as the tracker sees it."""

    slo_s: float | None
    arrival: float
    id: int = field(default_factory=lambda: next(_ids))
    stage: str = PRE_STAGE
    stage_start: float = 0.0
    config: Config | None = None
    flagged: bool = False
    boosted_calls: int = 0
    demoted_calls: int = 0
    paused_s: float = 0.0
    predicted_s: float | None = None
    baseline_s: float | None = None
    plan_action: str = "none"
    synthesis_start: float | None = None
    work: tuple[StageWork, ...] | None = None
    """The planned configuration's work per stage (output budgets), when the planner gave it."""
    averages_s: float | None = None
    model_s: float | None = None
    projected_s: float | None = None
    """Synthesis seconds predicted when its synthesis started (under the load then): what
    holding projects it from."""
    stalls_s: float = 0.0
    """Prefill seconds (`SLOTracker.prefill_s`) of the stages other requests started beside
    it since its synthesis started: what the projection adds for them."""
    held_s: float = 0.0
    hold_own: tuple[float, float] | None = None
    """Its own synthesis seconds as `hold`'s last check read them (the prediction under the
    load then, times `hold_scale`), and the seconds then left until its deadline: what it was
    released or refused on; None when it was not held or has no SLO."""
    engine: str = ""
    """The engine of a pool its synthesis runs on (its label; set by `hold`): prefills stall
    the requests of their own engine only."""

    @property
    def deadline(self) -> float | None:
        return None if self.slo_s is None else self.arrival + self.slo_s


class SLOTracker:
    """The in-flight requests of one engine, their predictions, flags and SLO counters."""

    def __init__(
        self,
        mitigation: Mitigation | None = None,
        *,
        stats: StageStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 0.02,
        delay: DelayModel | None = None,
        predictor: Predictor = "model",
        prefill_cost: PrefillCost = "steps",
    ) -> None:
        """`delay`: the engine's delay model (default: a new one with the neutral prior);
        `predictor`: `model` (the delay model once ready, the running averages until then) or
        `averages` (the running averages only: the comparison's old predictor);
        `prefill_cost`: where `prefill_s` reads a prefill's cost, `steps` (the engine's step
        costs once known, `watch_steps`) or `model` (the delay model only)."""
        if predictor not in PREDICTORS:
            raise InvalidRequest(f"unknown SLO predictor {predictor!r}: use model or averages")
        if prefill_cost not in PREFILL_COSTS:
            raise InvalidRequest(f"unknown prefill cost {prefill_cost!r}: use steps or model")
        self.prefill_cost = prefill_cost
        self.mitigation = mitigation or Mitigation()
        self.stats = stats or StageStats()
        self.delay = delay if delay is not None else DelayModel()
        self.load = LoadMeter()
        """The synthesis calls in flight on the engine (the controller counts them)."""
        self.predictor = predictor
        self.baseline = BaselineEstimator(self.stats.alpha)
        self.errors = PredictionErrors()
        self.ratios: deque[float] = deque(maxlen=RATIO_WINDOW)
        """actual / predicted synthesis seconds of the last requests planned with a prediction
        (`optimism` reads them)."""
        self.hold_ratios: deque[float] = deque(maxlen=RATIO_WINDOW)
        """actual / (projected + stalls) synthesis seconds of the last requests (`hold_scale`
        reads them)."""
        self.clock = clock
        self.poll_s = poll_s
        self.inflight: dict[int, Tracked] = {}
        self.counters = {
            "requests": 0,
            "met": 0,
            "violated": 0,
            "flagged": 0,
            "paused_requests": 0,
            "cheaper-config": 0,
            "below-profile": 0,
            "unmeetable": 0,
            "shed": 0,
            "held_requests": 0,
            "held_shed": 0,
        }
        self.paused_s = 0.0
        """Total seconds requests waited at the gate."""
        self.held_s = 0.0
        """Total seconds requests were held before their synthesis (`hold`)."""
        self.step_logs: dict[str, StepLog] = {}
        """The steps of each engine (by the Decision's label) that reports them."""
        self._step_fits: dict[str, tuple[int, StepCosts | None]] = {}
        self._released = asyncio.Event()

    # -- request lifecycle ----------------------------------------------------------------------

    def start(self, slo_ms: float | None) -> Tracked:
        now = self.clock()
        t = Tracked(slo_s=None if slo_ms is None else slo_ms / 1000, arrival=now, stage_start=now)
        self.inflight[t.id] = t
        return t

    def enter(self, t: Tracked, stage: str) -> None:
        """`t` starts `stage`; the stage it leaves is recorded in the running averages."""
        now = self.clock()
        self._record(t, now)
        t.stage, t.stage_start = stage, now
        if t.config and stage in registry.spec(t.config.method).stages:
            if t.synthesis_start is None:
                t.synthesis_start = now
                t.projected_s = self.predict(t.config, t.work)
            self._stall_others(t, stage)

    def _stall_others(self, t: Tracked, stage: str) -> None:
        """`t`'s `stage` starts: its prefill delays every other request synthesising now."""
        work = next((w for w in t.work or () if w.stage == stage), None)
        if work is None:
            return
        seconds = self.prefill_s(work, t.engine)
        for k in self.inflight.values():
            if k is not t and k.synthesis_start is not None and k.engine == t.engine:
                k.stalls_s += seconds

    def planned(
        self,
        t: Tracked,
        config: Config,
        plan_action: str = "none",
        work: tuple[StageWork, ...] | None = None,
    ) -> None:
        """`t` was planned with `config` (`work`: its stages' planned work): its synthesis time
        is predicted now by each predictor (and kept, to measure their errors when it
        finishes)."""
        t.config = config
        t.work = work
        t.averages_s = self.stats.predict_synthesis(config)
        t.model_s = (
            self.delay.predict(work, self.load.now())
            if work is not None and self.delay.ready
            else None
        )
        t.predicted_s = self._active(t.averages_s, t.model_s)
        t.baseline_s = self.baseline.predict()
        t.plan_action = plan_action
        if plan_action in self.counters:
            self.counters[plan_action] += 1

    def _active(self, averages: float | None, model: float | None) -> float | None:
        return model if self.predictor == "model" and model is not None else averages

    def predict(self, config: Config, work: tuple[StageWork, ...] | None) -> float | None:
        """Seconds of `config`'s synthesis if it started now: the delay model under the load
        now (with `work`, once ready, unless the predictor is `averages`), else the running
        averages (None: nothing comparable ran yet)."""
        if self.predictor == "model" and work is not None and self.delay.ready:
            return self.delay.predict(work, self.load.now())
        return self.stats.predict_synthesis(config)

    def observe_stage(
        self, work: StageWork, load: Load, seconds: float, budget: StageWork | None = None
    ) -> str | None:
        """A synthesis stage ran (its observed work, the load when it started, its seconds):
        the delay model learns from it. None, or why it was ignored."""
        return self.delay.observe(work, load, seconds, budget=budget)

    def budget_s(self, t: Tracked) -> float | None:
        """Seconds left until `t`'s deadline (None without an SLO)."""
        return None if t.deadline is None else t.deadline - self.clock()

    def finish(self, t: Tracked, *, ok: bool) -> SLORecord | None:
        """`t` is done (answered when `ok`); its record, None without an SLO. Failed requests
        leave the averages alone and count as violations when they carried an SLO."""
        now = self.clock()
        self.inflight.pop(t.id, None)
        if ok:
            self._record(t, now)
            if t.synthesis_start is not None:
                actual = now - t.synthesis_start
                self.baseline.observe(actual)
                if t.predicted_s is not None and t.predicted_s > 0:
                    self.ratios.append(actual / t.predicted_s)
                if t.projected_s is not None and t.projected_s + t.stalls_s > 0:
                    self.hold_ratios.append(actual / (t.projected_s + t.stalls_s))
                if t.predicted_s is not None and t.baseline_s is not None:
                    self.errors.add(
                        actual, t.predicted_s, t.baseline_s,
                        averages=t.averages_s, model=t.model_s,
                    )  # fmt: skip
                else:
                    self.errors.add_each(
                        actual, t.baseline_s, averages=t.averages_s, model=t.model_s
                    )
        self._released.set()
        if t.slo_s is None:
            return None
        delay = now - t.arrival
        met = ok and delay <= t.slo_s
        self.counters["requests"] += 1
        self.counters["met" if met else "violated"] += 1
        return SLORecord(
            slo_ms=t.slo_s * 1000,
            mitigation=self.mitigation.label,
            predicted_ms=None if t.predicted_s is None else t.predicted_s * 1000,
            plan_action=t.plan_action,
            flagged=t.flagged,
            boosted_calls=t.boosted_calls,
            demoted_calls=t.demoted_calls,
            paused_ms=t.paused_s * 1000,
            held_ms=t.held_s * 1000,
            projected_ms=None if t.projected_s is None else t.projected_s * 1000,
            stalls_ms=t.stalls_s * 1000,
            hold_own_ms=None if t.hold_own is None else t.hold_own[0] * 1000,
            delay_ms=delay * 1000,
            met=met,
        )

    def _record(self, t: Tracked, now: float) -> None:
        seconds = now - t.stage_start
        if t.stage == PRE_STAGE:
            self.stats.observe(PRE_STAGE, "*", seconds)
        elif t.config is not None and t.stage in registry.spec(t.config.method).stages:
            self.stats.observe(t.stage, t.config.label, seconds)

    # -- flagging, priority, the gate -----------------------------------------------------------

    def predicted_miss(self, t: Tracked, now: float) -> bool:
        if t.deadline is None:
            return False
        if now > t.deadline:
            return True
        left = self.remaining(t, now)
        return left is not None and now + left > t.deadline

    def remaining(self, t: Tracked, now: float) -> float | None:
        """Seconds `t` still needs: by the delay model under the load now, when it predicts
        (its current stage's own calls taken out of the load), else `remaining_s`."""
        in_stage = now - t.stage_start
        if (
            self.predictor == "model"
            and self.delay.ready
            and t.work is not None
            and t.config is not None
        ):
            names = [w.stage for w in t.work]
            if t.stage not in names:  # planned, not synthesising yet (admission queue)
                return self.delay.predict(t.work, self.load.now())
            i = names.index(t.stage)
            load = self.load.now()
            own = t.work[i]
            others = Load(max(load.seqs - own.calls, 0.0), max(load.tokens - _tokens(own), 0.0))
            left = max(self.delay.predict_stage(own, others) - in_stage, 0.0)
            return left + self.delay.predict(t.work[i + 1 :], others)
        return remaining_s(self.stats, self.baseline, t.stage, t.config, in_stage)

    def check(self) -> int:
        """Flag every in-flight request now predicted to miss; returns how many are flagged."""
        now = self.clock()
        for t in self.inflight.values():
            if not t.flagged and self.predicted_miss(t, now):
                t.flagged = True
                self.counters["flagged"] += 1
        return sum(t.flagged for t in self.inflight.values())

    def hopeless(self, t: Tracked, now: float) -> bool:
        """`t` cannot meet its SLO whatever is done for it: past its deadline, or planned
        `unmeetable` (even the fastest configuration that fitted was predicted to miss)."""
        return t.deadline is not None and (now > t.deadline or t.plan_action == "unmeetable")

    def priority(self, t: Tracked, calls: int) -> int:
        """The engine priority for `t`'s next `calls` calls (checked just before they go):
        worse for a hopeless request under triage, better for a flagged one under priority."""
        self.check()
        if self.mitigation.triage and self.hopeless(t, self.clock()):
            t.demoted_calls += calls
            return HOPELESS_PRIORITY
        if t.flagged and self.mitigation.priority:
            t.boosted_calls += calls
            return FLAGGED_PRIORITY
        return 0

    def savable_flagged(self, exclude: Tracked | None = None) -> int:
        """Flagged requests a pause can help: their deadline has not passed yet and (under
        triage) they were not planned `unmeetable`."""
        self.check()
        now = self.clock()
        return sum(
            1
            for t in self.inflight.values()
            if t.flagged
            and t is not exclude
            and t.deadline is not None
            and now <= t.deadline
            and not (self.mitigation.triage and t.plan_action == "unmeetable")
        )

    def ratio_quantile(self, q: float) -> float | None:
        """The `q` quantile of actual / predicted synthesis seconds over the last
        `RATIO_WINDOW` requests; None until `MIN_RATIOS` were seen."""
        if len(self.ratios) < MIN_RATIOS:
            return None
        return float(np.quantile(np.fromiter(self.ratios, float), q))

    def calibration(self) -> float:
        """What shedding multiplies a prediction by before it is held against the time left:
        the median of actual / predicted over the record (`SHED_QUANTILE`; 1 until
        `MIN_RATIOS` were seen)."""
        ratio = self.ratio_quantile(SHED_QUANTILE)
        return 1.0 if ratio is None else ratio

    def margin(self) -> float:
        """What a cheaper configuration's prediction is multiplied by before it is held against
        the time left, once the chosen one is predicted to miss: the `CHANGE_QUANTILE` of
        actual / predicted over the record (1 until `MIN_RATIOS` were seen)."""
        ratio = self.ratio_quantile(CHANGE_QUANTILE)
        return 1.0 if ratio is None else ratio

    def engine_idle(self) -> bool:
        """No synthesis call of ragctl's runs on the engine (what shedding's work-conservation
        reads: `choose_within_slo`'s `engine_idle`)."""
        return self.load.now().seqs == 0

    def optimism(self) -> float:
        """How much faster than predicted a request may turn out, by this predictor's own
        record: the `OPTIMISM_QUANTILE` quantile of actual / predicted over the last
        `RATIO_WINDOW` requests, at most 1; 1 (take predictions as they are) until
        `MIN_RATIOS` were seen. Best-fit plans a request `unmeetable` only when even this
        much luck would not save it."""
        ratio = self.ratio_quantile(OPTIMISM_QUANTILE)
        return 1.0 if ratio is None else min(1.0, ratio)

    def slack_s(self, t: Tracked) -> float | None:
        """Seconds `t` could wait now and still meet its SLO by a configuration-blind estimate
        (the running means of the pre-synthesis stage and of synthesis); None without an SLO
        or before anything finished."""
        left = self.budget_s(t)
        synthesis = self.baseline.predict()
        if left is None or synthesis is None:
            return None
        return left - synthesis - (self.stats.mean(PRE_STAGE, "*") or 0.0)

    async def gate(self, t: Tracked) -> None:
        """Pause a new request while a flagged one can still be saved: at most `max_pause_s`,
        and at most the newcomer's own slack (none when it has none)."""
        if not self.mitigation.pause or not self.savable_flagged(exclude=t):
            return
        limit = self.mitigation.max_pause_s
        slack = self.slack_s(t)
        if slack is not None:
            limit = min(limit, slack)
        if limit <= 0:
            return
        start = self.clock()
        self.counters["paused_requests"] += 1
        try:
            while self.savable_flagged(exclude=t):
                left = limit - (self.clock() - start)
                if left <= 0:
                    break
                await self._until_released(min(self.poll_s, left))
        finally:
            waited = self.clock() - start
            t.paused_s += waited
            self.paused_s += waited
            # The gate's wait is not part of the request's pre-synthesis stage.
            t.stage_start = self.clock()

    async def _until_released(self, timeout_s: float) -> None:
        """Wait until a request finishes, at most `timeout_s` (waiters re-check on both)."""
        self._released.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._released.wait()
        except TimeoutError:
            pass

    # -- holding ----------------------------------------------------------------------------------

    def watch_steps(self, engine: str, log: StepLog) -> None:
        """Read `engine`'s (a Decision's engine label) prefill costs off its step log."""
        self.step_logs[engine] = log

    def step_costs(self, engine: str = "") -> StepCosts | None:
        """`engine`'s step costs, fitted on its logged steps (refitted every `REFIT_STEPS`
        new ones); None when it logs none or too few yet."""
        log = self.step_logs.get(engine)
        if log is None:
            return None
        seen, fit = self._step_fits.get(engine, (None, None))
        if seen is None or log.count - seen >= REFIT_STEPS:
            fit = fit_step_costs(log.steps)
            self._step_fits[engine] = (log.count, fit)
        return fit

    def _step_costs_dict(self, engine: str) -> dict[str, float | int] | None:
        costs = self.step_costs(engine)
        return None if costs is None else costs.to_dict()

    def prefill_s(self, work: StageWork, engine: str = "") -> float:
        """Seconds `work`'s prefill delays every sequence beside it on `engine`: by the
        engine's step costs when known, else by the delay model."""
        costs = self.step_costs(engine) if self.prefill_cost == "steps" else None
        if costs is not None:
            return costs.prefill_token_s * work.prompt_tokens
        return self.delay.prefill_s(work)

    def hold_scale(self) -> float:
        """What holding multiplies a request's predicted synthesis seconds by: the
        `HOLD_QUANTILE` of actual / (projected + stalls) over the last requests (1 until
        `MIN_RATIOS` were seen)."""
        if len(self.hold_ratios) < MIN_RATIOS:
            return 1.0
        return float(np.quantile(np.fromiter(self.hold_ratios, float), HOLD_QUANTILE))

    def projected_end(self, t: Tracked, now: float, scale: float) -> float | None:
        """When `t`, synthesising, is projected to finish (not before `now`); None before its
        synthesis started or when nothing could predict it."""
        if t.synthesis_start is None or t.projected_s is None:
            return None
        return max(t.synthesis_start + t.projected_s * scale + t.stalls_s, now)

    def threatened(self, t: Tracked, stall_s: float, scale: float | None = None) -> bool:
        """Whether starting `t` now, whose prefill costs `stall_s`, would push a request in
        flight past a deadline it is projected to meet (`scale`: `hold_scale()`, when the
        caller has it)."""
        now = self.clock()
        scale = self.hold_scale() if scale is None else scale
        for k in self.inflight.values():
            if k is t or k.deadline is None or k.engine != t.engine:
                continue
            end = self.projected_end(k, now, scale)
            if end is not None and end <= k.deadline < end + stall_s:
                return True
        return False

    async def hold(self, t: Tracked, engine: str = "") -> bool:
        """Hold `t` (planned, before its first engine call on `engine`, a pool member's label)
        while its first stage's prefill would push a request in flight on the same engine past
        a deadline it is projected to meet (`threatened`).
        Returns False when `t` has an SLO, its own prediction from now (read like a
        projection) stopped meeting it while held, and shedding is on: the caller refuses it.
        Without shedding it then goes; without an SLO it waits at most `max_pause_s`."""
        t.engine = engine
        if not self.mitigation.hold or not t.work or t.config is None:
            return True
        stall = self.prefill_s(t.work[0], engine)
        if not self.threatened(t, stall):
            return True
        start = self.clock()
        self.counters["held_requests"] += 1
        try:
            # One scale per poll: the own check and the projections read the same record.
            while self.threatened(t, stall, scale := self.hold_scale()):
                now = self.clock()
                if t.deadline is None:
                    if now - start >= self.mitigation.max_pause_s:
                        break
                else:
                    own = self.predict(t.config, t.work)
                    if own is not None:
                        own_s, left_s = own * scale, t.deadline - now
                        t.hold_own = (own_s, left_s)
                        if own_s > left_s:
                            if self.mitigation.shed:
                                self.counters["held_shed"] += 1
                                self.counters["shed"] += 1
                                return False
                            break
                await self._until_released(self.poll_s)
            return True
        finally:
            waited = self.clock() - start
            t.held_s += waited
            self.held_s += waited

    def reset(self, *, learned: bool = True) -> None:
        """Forget the counters, totals and prediction errors (what is reported), and with
        `learned` also what was learned: the averages, the delay model's observations and the
        records of actual / predicted (after the engine's slow first call). A warm-up that
        stands for the traffic a running server has already served keeps what it learned
        (`learned=False`). Requests in flight stay tracked."""
        if learned:
            self.stats = StageStats(self.stats.alpha)
            self.delay = self.delay.fresh()
            self.baseline = BaselineEstimator(self.stats.alpha)
            self.ratios.clear()
            self.hold_ratios.clear()
        self.errors = PredictionErrors()
        self.counters = dict.fromkeys(self.counters, 0)
        self.paused_s = 0.0
        self.held_s = 0.0

    def snapshot(self) -> dict[str, object]:
        c = self.counters
        return {
            "mitigation": self.mitigation.label,
            **c,
            "attainment": c["met"] / c["requests"] if c["requests"] else None,
            "flagged_inflight": sum(t.flagged for t in self.inflight.values()),
            "paused_s": self.paused_s,
            "held_s": self.held_s,
            "hold_scale": self.hold_scale(),
            "prefill_cost": self.prefill_cost,
            "step_costs": {name: self._step_costs_dict(name) for name in self.step_logs},
            "predictor": self.predictor,
            "optimism": self.optimism(),
            "calibration": self.calibration(),
            "margin": self.margin(),
            "prediction": self.errors.to_dict(),
            "delay_model": self.delay.to_dict(),
        }


# -- one request's reports ----------------------------------------------------------------------


class StageHooks:
    """What the controller reports of one run, stage by stage; these do nothing (a run outside
    any request, e.g. a golden feedback run). `RequestTrace` reports to the SLO tracker."""

    async def gate(self) -> None:
        """Wait at the admission gate while the tracker pauses new requests."""

    async def hold(self, engine: str = "") -> bool:
        """Wait, planned, before the first engine call (on `engine`, a pool member's label)
        while the tracker holds the request; False: it is refused (`SLOUnmeetable`)."""
        return True

    def refusal(self) -> str:
        """Why `hold` refused the request, in figures ("" when it did not)."""
        return ""

    def on_stage(self, stage: str) -> None:
        """The run enters `stage` (`queue`, then each synthesis stage)."""

    def on_plan(
        self,
        config: Config,
        action: str | None = None,
        work: tuple[StageWork, ...] | None = None,
    ) -> None:
        """The run was planned with `config` (`action`: the plan's `slo_action`; `work`: its
        stages' planned work)."""

    def priority_for(self, calls: int) -> int:
        """The engine priority of the next stage's `calls` calls."""
        return 0

    def planning(self) -> dict[str, Any]:
        """Best-fit's SLO arguments (`predict(config, work)`, `budget_s`) when it must keep a
        deadline."""
        return {}

    def finish(self, *, ok: bool) -> SLORecord | None:
        """The run is over; its SLO record (None without an SLO)."""
        return None


class RequestTrace(StageHooks):
    """One request as `tracker` sees it, from `start` (now) to `finish`."""

    def __init__(self, tracker: SLOTracker, slo_ms: float | None) -> None:
        self.tracker = tracker
        self.tracked = tracker.start(slo_ms)

    async def gate(self) -> None:
        await self.tracker.gate(self.tracked)

    async def hold(self, engine: str = "") -> bool:
        return await self.tracker.hold(self.tracked, engine)

    def refusal(self) -> str:
        t = self.tracked
        if t.hold_own is None:
            return ""
        own, left = t.hold_own
        return f"predicted {own:.2f} s with {left:.2f} s left after {t.held_s:.2f} s held"

    def on_stage(self, stage: str) -> None:
        self.tracker.enter(self.tracked, stage)

    def on_plan(
        self,
        config: Config,
        action: str | None = None,
        work: tuple[StageWork, ...] | None = None,
    ) -> None:
        self.tracker.planned(self.tracked, config, action or "none", work)

    def priority_for(self, calls: int) -> int:
        return self.tracker.priority(self.tracked, calls)

    def planning(self) -> dict[str, Any]:
        if self.tracked.slo_s is None or not self.tracker.mitigation.config:
            return {}
        shed = self.tracker.mitigation.shed
        return {
            "predict": self.tracker.predict,
            "budget_s": lambda: self.tracker.budget_s(self.tracked),
            "optimism": self.tracker.optimism,
            "calibration": self.tracker.calibration if shed else None,
            "margin": self.tracker.margin,
            "engine_idle": self.tracker.engine_idle,
        }

    def finish(self, *, ok: bool) -> SLORecord | None:
        return self.tracker.finish(self.tracked, ok=ok)


def _tokens(work: StageWork) -> float:
    """A stage's tokens as the load meter counts them (prompt + output budget)."""
    return float(work.prompt_tokens + work.output_tokens)
