"""The adaptive path's decisions, pure: which space a query gets (its profile through the rules,
else the collection's recent confident spaces, else the rules' default), the admission queue's
best-fit `decide` over that space, the Decision record, and the question the synthesis prompts
see. No engine and no awaiting here: `ragctl.controller` awaits, this decides."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ragctl.errors import InvalidSetting
from ragctl.profiler import ProfileOutcome
from ragctl.rules import RuleSet, default_space, evaluate, merge_spaces, span_spaces
from ragctl.scheduler import NeedTable, choose
from ragctl.scheduler.bestfit import clip_space
from ragctl.scheduler.cost import DelayModel, Load, QualityModel, StageWork, WorkTable
from ragctl.scheduler.objective import DEFAULT_DELAY_WEIGHT, choose_objective
from ragctl.scheduler.placement import Strategy
from ragctl.scheduler.slo import (
    Mitigation,
    Predictor,
    PrefillCost,
    SLOTracker,
    choose_within_slo,
)
from ragctl.synthesis import registry
from ragctl.synthesis.methods import CallSizer
from ragctl.synthesis.registry import GOLDEN_CONFIG
from ragctl.types import Config, ConfigSpace, Decision, KVState, Message, Objective, Plan

HISTORY_TURNS = 6
"""Earlier messages of a conversation carried into the synthesis prompts (the latest ones)."""


@dataclass(frozen=True)
class AdaptivePolicy:
    """The adaptive path's knobs (see `Settings` for what each means)."""

    confidence_threshold: float = 0.9
    history_size: int = 10
    untrusted_window: int = 20
    """Profiles in a row untrusted before the profiler is asked only every N-th query."""
    golden_every: int = 30
    golden_config: Config = GOLDEN_CONFIG
    kv_buffer_blocks: int = 1
    queue_size: int = 256
    slo_ms: float | None = None
    """SLO of requests that carry none (None: no SLO)."""
    collection_slo_ms: Mapping[str, float] = field(default_factory=dict)
    """Per-collection SLO defaults, over `slo_ms`."""
    mitigation: Mitigation = field(default_factory=Mitigation)
    retrieval_aware_k: bool = False
    """Cut the chunk count inside a space's range at the largest retrieval-score gap."""
    feedback_configs: tuple[Config, ...] = ()
    """The golden run's candidate configurations (its feedback budget)."""
    objective: Objective = "balanced"
    """How best-fit chooses among the fitting configurations (`scheduler.objective`)."""
    delay_weight: float = DEFAULT_DELAY_WEIGHT
    """`balanced`: quality worth the fastest fitting configuration's time."""
    explore_delay: bool = False
    """Predict best-fit's delays with sampled output shares (`CostModels.explore`)."""
    explore_seed: int = 0
    """Seed of those draws (`DelayModel.draw_shares`)."""
    slo_predictor: Predictor = "model"
    """The SLO loop's time predictor (`SLOTracker`)."""
    slo_prefill_cost: PrefillCost = "steps"
    """Where holding reads a prefill's cost (`SLOTracker.prefill_s`)."""
    placement: Strategy = "best-fit"
    """Which engine of a pool runs a plan (`scheduler.placement`)."""
    synthesis_engines: tuple[int, ...] = ()
    """The engines of a pool (indexes) that run synthesis plans (empty: all)."""

    @classmethod
    def from_settings(cls, settings: Any) -> AdaptivePolicy:
        return cls(
            confidence_threshold=settings.confidence_threshold,
            history_size=settings.history_size,
            untrusted_window=settings.untrusted_window,
            golden_every=settings.golden_every,
            kv_buffer_blocks=settings.kv_buffer_blocks,
            queue_size=settings.queue_size,
            slo_ms=settings.slo_ms,
            collection_slo_ms=dict(settings.collection_slo_ms),
            mitigation=Mitigation.parse(settings.slo_mitigation),
            retrieval_aware_k=settings.retrieval_aware_k,
            feedback_configs=parse_config_list(settings.feedback_configs),
            objective=settings.objective,
            delay_weight=settings.delay_weight,
            explore_delay=settings.explore_delay,
            explore_seed=settings.explore_seed,
            slo_predictor=settings.slo_predictor,
            slo_prefill_cost=settings.slo_prefill_cost,
            placement=settings.placement,
            synthesis_engines=tuple(settings.int_list(settings.synthesis_engines)),
        )

    def tracker(self) -> SLOTracker:
        """A new engine's SLO tracker, with its delay model and load meter."""
        return SLOTracker(
            self.mitigation,
            predictor=self.slo_predictor,
            delay=DelayModel(seed=self.explore_seed),
            prefill_cost=self.slo_prefill_cost,
        )

    def slo_for(self, collection: str) -> float | None:
        return self.collection_slo_ms.get(collection, self.slo_ms)

    def feedback_for(self, chunks: int) -> tuple[Config, ...]:
        """The golden run's candidates, on at most the `chunks` retrieved (deduplicated)."""
        out = [Config(c.method, min(c.num_chunks, chunks), c.intermediate_length)
               for c in self.feedback_configs]  # fmt: skip
        return tuple(dict.fromkeys(out))

    def golden_for(self, chunks: int) -> Config:
        """The golden configuration, on at most the `chunks` retrieved."""
        c = self.golden_config
        return Config(c.method, min(c.num_chunks, chunks), c.intermediate_length)


@dataclass(frozen=True)
class SpaceChoice:
    """The pruned space for one query, and whether the query's own profile produced it."""

    space: ConfigSpace
    profile_used: bool
    note: str
    """Why the profile was not used (empty when it was)."""
    joint_reasoning: bool
    """What the fallback assumes when nothing in the space fits."""


def resolve_space(
    outcome: ProfileOutcome,
    rules: RuleSet,
    history: Sequence[ConfigSpace],
    threshold: float,
    learned: ConfigSpace | None = None,
    labelled: ConfigSpace | None = None,
) -> SpaceChoice:
    """A confident profile goes through the rules; otherwise the space the collection's
    labelled queries needed (`learned`: `QualityModel.label_space`, once there are enough),
    else its recent confident spaces (merged), else the rules' conservative default; either
    widened by what the fewer labels so far needed (`labelled`: the same span under the
    minimum): too few to bound the space, they still show configurations that answered this
    collection's queries, so they can add to a fixed box but never take from it."""
    profile = outcome.profile
    if profile is not None and profile.confidence is not None and profile.confidence >= threshold:
        return SpaceChoice(evaluate(rules, profile), True, "", profile.joint_reasoning)
    if profile is None and outcome.profiler == UNASKED:
        note = outcome.llm_note
    elif profile is None:
        note = f"profiler error: {outcome.error or 'no profile'}"
    elif profile.confidence is None:
        note = "low-confidence: no log-probs"
    else:
        note = f"low-confidence {profile.confidence:.2f} < {threshold:.2f}"
    space = fallback_space(rules, history, learned, labelled)
    # Joint reasoning unless the space only answers from single chunks.
    joint = not all(registry.spec(m).fallback == "independent" for m in space.methods)
    return SpaceChoice(space, False, note, joint)


def fallback_space(
    rules: RuleSet,
    history: Sequence[ConfigSpace],
    learned: ConfigSpace | None = None,
    labelled: ConfigSpace | None = None,
) -> ConfigSpace:
    """The space of a query with no trusted profile (`resolve_space`'s arguments)."""
    if learned is not None:
        return learned
    space = merge_spaces(list(history)) if history else default_space(rules)
    if labelled is not None:
        space = span_spaces([space, labelled], source=f"{space.source}+labels")
    return space


UNASKED = "unasked"
"""`ProfileOutcome.profiler` of a profile the adaptive path did not ask for."""


def unasked_outcome(note: str) -> ProfileOutcome:
    """The outcome that stands for a profile left unasked, `note` saying why."""
    return ProfileOutcome(
        profile=None, error=None, error_kind=None, seconds=0.0, template="",
        profiler=UNASKED, llm_note=note,
    )  # fmt: skip


def unasked_profile(quality: QualityModel, objective: Objective) -> ProfileOutcome | None:
    """The outcome that stands for a profile left unasked, or None (ask). The profiler is not
    asked when no answer could buy anything: the objective chooses by predicted quality and
    delay (`balanced`, `latency`; METIS's `quality` rule reads the profile's space), the
    collection's labels give the space (`label_space`), and they show no configuration
    answering better than another (`indifferent`). Every candidate is then predicted equally
    good, so the choice is the fastest that fits, and the labels' space already holds the
    configurations their queries needed: a trusted profile could only narrow it. The profiler's
    seconds are saved; a label with a real difference between configurations asks again."""
    if objective == "quality" or quality.label_space() is None or not quality.indifferent():
        return None
    return unasked_outcome(
        f"not asked: the {len(quality.labels)} labels show no configuration "
        "answering better than another"
    )


def no_better_profile(
    quality: QualityModel,
    objective: Objective,
    fallback: ConfigSpace,
    corner: Sequence[Config],
    chunks: int,
    delay: Callable[[Config], float],
    delay_weight: float = DEFAULT_DELAY_WEIGHT,
) -> ProfileOutcome | None:
    """The outcome that stands for a profile left unasked because no profile could lead to a
    choice predicted better than the fallback's, or None (ask). `balanced` and `latency`
    choose by predicted quality and delay, and neither prediction reads the space (quality:
    while outcomes are measured), so a trusted profile only changes which configurations are
    candidates. The fallback's best (on the `chunks` retrieved, its objective's score with the
    fallback's fastest delay as the unit) is compared with an upper bound on every
    configuration any profile's space could hold: per method, the quality of its best measured
    configuration (`QualityModel.best_rate`) at the delay of its `corner` configuration
    (`rules.fast_corner`: no space holds less work of that method, and the delay model is
    non-decreasing in work). When no bound beats the fallback's best, the profile could only
    take candidates away. `latency` reads no quality, so it needs no labels; labels that show
    no configuration answering better than another (`indifferent`) make `balanced` choose the
    fastest too."""
    if objective == "quality" or chunks < 1 or not corner:
        return None
    configs = clip_space(fallback, chunks).configs()
    if not configs:
        return None
    if not quality.measured() and objective != "latency":
        return None  # the covers estimate reads the space: a profile could change it
    fastest = objective == "latency" or quality.indifferent()  # the choice is the fastest
    weight = 1.0 if fastest else delay_weight

    def q(c: Config) -> float:
        return 0.0 if fastest else quality.predict(c, fallback)

    def bound(c: Config) -> float:
        return 0.0 if fastest else quality.best_rate(c.method) or 0.0

    d = {c: delay(c) for c in configs}
    unit = max(min(d.values()), 1e-9)
    best = max(configs, key=lambda c: (q(c) - weight * d[c] / unit, -d[c]))
    top = q(best) - weight * d[best] / unit
    for c in corner:
        c = replace(c, num_chunks=min(c.num_chunks, chunks))
        if bound(c) - weight * delay(c) / unit > top + 1e-12:  # float noise: a tie is no gain
            return None
    return unasked_outcome(
        f"not asked: no space a profile could give holds a configuration predicted "
        f"better than {best.label} ({objective})"
    )


@dataclass
class Trust:
    """Whether the profiles one objective asked on a collection were trusted (newest last,
    the last `untrusted_window`), and the queries left unasked since its last ask."""

    recent: deque[bool]
    skipped: int = 0

    def record(self, outcome: ProfileOutcome, choice: SpaceChoice) -> None:
        if outcome.profiler == UNASKED:
            self.skipped += 1
        else:
            self.recent.append(choice.profile_used)
            self.skipped = 0


def untrusted_profile(trust: Trust, window: int, objective: Objective) -> ProfileOutcome | None:
    """The outcome that stands for a profile left unasked because none of the last `window`
    profiles asked was trusted: an untrusted profile leads to the fallback space, the same for
    every query, so its seconds would buy nothing. Every `window`-th query asks anyway (a
    probe: the calibration is refitted as labels come, and one trusted profile resumes asking
    on every query). Never under `quality` (METIS's rule reads every profile); 0: never skip."""
    if objective == "quality" or window <= 0 or len(trust.recent) < window:
        return None
    if any(trust.recent) or trust.skipped + 1 >= window:  # `recent` keeps `window`
        return None
    return unasked_outcome(
        f"not asked: the last {window} profiles asked were all untrusted (one query "
        f"in {window} asks)"
    )


def outcome_counter(outcome: ProfileOutcome, choice: SpaceChoice) -> str:
    """The counter a profiled query adds to besides `profiled`: `profile_used`,
    `profiler_errors`, `low_confidence` or `profile_unasked`."""
    if choice.profile_used:
        return "profile_used"
    if outcome.profiler == UNASKED:
        return "profile_unasked"
    return "profiler_errors" if outcome.profile is None else "low_confidence"


def gap_cut(scores: Sequence[float], lo: int, hi: int) -> int:
    """Adaptive-k (EMNLP 2025) inside a rule's range: the chunk count k in [lo, hi] after which
    the retrieval score drops the most (`scores` best first; k = all retrieved counts as a drop
    to nothing only when fewer than `hi` came back). Ties take the smaller k."""
    n = len(scores)
    if n == 0:
        return 0
    hi = min(hi, n)
    lo = max(1, min(lo, hi))
    if hi == lo:
        return hi

    def gap(k: int) -> float:
        return scores[k - 1] - scores[k] if k < n else float("inf")

    return max(range(lo, hi + 1), key=lambda k: (gap(k), -k))


def chunk_cap(space: ConfigSpace, scores: Sequence[float], retrieval_aware: bool) -> int:
    """The most chunks best-fit may use: all retrieved, or with `retrieval_aware` the gap cut
    inside the space's chunk range."""
    if not retrieval_aware:
        return len(scores)
    lo, hi = space.num_chunks
    return gap_cut(scores, lo, hi)


@dataclass(frozen=True)
class CostModels:
    """What cost-aware best-fit predicts with: the engine's delay model and the load on it
    now, the collection's quality model, and the objective (see `scheduler.objective`).
    `explore`: the delay and latency objectives predict with one draw of the output shares per
    decision (`DelayModel.draw_shares`, Thompson sampling) instead of their estimates."""

    delay: DelayModel
    load: Callable[[], Load]
    quality: QualityModel
    objective: Objective = "balanced"
    delay_weight: float = DEFAULT_DELAY_WEIGHT
    explore: bool = False


def best_fit(
    choice: SpaceChoice,
    sizer: CallSizer,
    chunks: int,
    buffer_blocks: int,
    *,
    predict: Callable[[Config, tuple[StageWork, ...]], float | None] | None = None,
    budget_s: Callable[[], float | None] | None = None,
    optimism: Callable[[], float] | None = None,
    calibration: Callable[[], float] | None = None,
    margin: Callable[[], float] | None = None,
    engine_idle: Callable[[], bool] | None = None,
    cost: CostModels | None = None,
) -> Callable[[KVState, int], Plan]:
    """The admission queue's `decide`: best-fit over the query's space, sized by `sizer`.
    With `cost`, best-fit chooses among the fitting configurations by its objective and the
    plan records the candidates (`quality`: the same configuration as without). With
    `predict(config, work)` and `budget_s` (the SLO loop's configuration mechanism), best-fit
    keeps to the configurations predicted to finish within the time left when it decides
    (`optimism()`: how much luck the SLO loop allows before it gives a request up; with
    `calibration()`, the loop sheds: predictions are read at its median error, and a request
    whose fastest configuration still misses is planned `shed`, unless `engine_idle()`: shedding
    is work-conserving; `margin()`: the error a cheaper configuration must meet at)."""
    works = WorkTable(sizer)

    def decide(kv: KVState, reserved: int) -> Plan:
        need = NeedTable(sizer, kv.block_size, buffer_blocks)
        kwargs = {"joint_reasoning": choice.joint_reasoning, "max_chunks": chunks}
        chooser: Callable[..., Plan] = choose
        if cost is not None:
            load = cost.load()  # once per decision: every candidate sees the same load
            # `quality` never reads the delays: no draw, so it stays METIS's best-fit exactly.
            draw = cost.explore and cost.objective != "quality"
            shares = cost.delay.draw_shares() if draw else None
            chooser = functools.partial(
                choose_objective,
                objective=cost.objective,
                delay=lambda c: cost.delay.predict(works(c), load, shares),
                quality=lambda c: cost.quality.predict(c, choice.space),
                delay_weight=cost.delay_weight,
                delay_source=cost.delay.source + (" (sampled shares)" if draw else ""),
            )
        left = budget_s() if budget_s is not None else None
        if predict is None or left is None:
            return chooser(choice.space, kv, reserved, need, **kwargs)
        return choose_within_slo(
            choice.space, kv, reserved, need,
            predict=lambda c: predict(c, works(c)), budget_s=left, chooser=chooser,
            optimism=optimism() if optimism is not None else 1.0,
            calibration=calibration() if calibration is not None else 1.0,
            margin=margin() if margin is not None else None,
            shed=calibration is not None,
            engine_idle=engine_idle is not None and engine_idle(), **kwargs,
        )  # fmt: skip

    return decide


def planned_work(sizer: CallSizer, config: Config) -> tuple[StageWork, ...]:
    """`config`'s planned work per stage (output budgets), for the SLO loop's predictions."""
    return WorkTable(sizer)(config)


def adaptive_decision(
    plan: Plan,
    kv: KVState,
    choice: SpaceChoice,
    outcome: ProfileOutcome,
    templates: dict[str, str],
    queued: bool,
) -> Decision:
    """The Decision record of an admitted adaptive query."""
    assert plan.config is not None  # admitted plans are runnable
    return Decision(
        config=plan.config,
        reason=plan.reason,
        kv=kv,
        templates=templates,
        profile=outcome.profile,
        profile_used=choice.profile_used,
        profile_note=choice.note,
        space=choice.space,
        need_blocks=plan.need_blocks,
        reserved_blocks=plan.reserved_blocks,
        queued=queued,
        profiler=outcome.profiler,
        beliefs=None if outcome.beliefs is None else outcome.beliefs.to_dict(),
        profiler_note=outcome.learned_note,
        choice=plan.choice,
    )


def with_history(question: str, history: Sequence[Message]) -> str:
    """The question as the synthesis prompts see it: with the conversation's latest earlier
    turns in front, so a follow-up ("and who founded it?") can be answered."""
    turns = [m for m in history if m.content.strip()][-HISTORY_TURNS:]
    if not turns:
        return question
    lines = [f"{m.role.capitalize()}: {' '.join(m.content.split())}" for m in turns]
    return "(conversation so far)\n" + "\n".join(lines) + f"\n(current question) {question}"


def parse_config_list(text: str) -> tuple[Config, ...]:
    """`stuff:3,map_rerank:1,...` as configurations (empty text: none); a malformed one is an
    `InvalidSetting` naming it."""
    out = []
    for raw in text.split(","):
        label = raw.strip()
        if not label:
            continue
        try:
            out.append(Config.parse(label))
        except ValueError as e:
            raise InvalidSetting(f"invalid setting feedback_configs: {label!r}: {e}") from None
    return tuple(dict.fromkeys(out))
