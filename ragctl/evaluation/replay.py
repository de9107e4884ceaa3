"""Policy replay (`ragctl eval replay`): each system's decision path only, answered from the grid.

Per test query, in order, the real controller decides what it would run (`Controller.propose`:
the real profiler, rules and best-fit against the idle engine's KV state, the collection's
history of confident spaces learning as it goes); AdaptiveRAG* and Parrot* decide from the same
profile; fixed systems and the oracle need no decision. Each chosen configuration is looked up
in the outcome grid (`grid`), and one outside it is answered live once and added to it.
After each query, each ragctl objective's delay model (its own copy of the warmed one) learns
from the cells that objective chose for it, as a serving controller running it learns from the
answers it gives (`Replayer.learn`): every decision is still predicted from earlier queries
only, and objectives replayed together do not teach one another.

The rows replay writes have the shape of `eval run`'s samples (closed loop, one in flight), so
the summaries, paired intervals, ratios and report are the same code. A row's delay is the
cell's solo delay with the profiler's seconds added where the system profiles (less the part
that overlapped retrieval, where it ran beside it live). Replay says nothing about load: that
is what `eval run` measures.

Profiles are cached beside the grid (`profiles.jsonl`, keyed by the question, the profiler's
model and templates, and the collection line), so a second replay makes no LLM call at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragctl.errors import InvalidRequest
from ragctl.evaluation.grid import GridStore, answer_cold, cell_observations
from ragctl.evaluation.metrics import primary_metric
from ragctl.evaluation.systems import (
    FIXED_PREFIX,
    Plan,
    adaptiverag_config,
    calibrate,
    complexity_class,
    median_config,
    static_config,
)
from ragctl.evaluation.writers import SampleWriter, read_rows
from ragctl.profiler import ProfileOutcome
from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.types import Config, Profile

if TYPE_CHECKING:
    from ragctl.controller import Controller, Proposal
    from ragctl.retrieval.collection import DatasetCard
    from ragctl.scheduler.cost import DelayModel, StageWork
    from ragctl.types import Query

PROFILES_FILE = "profiles.jsonl"
_NOBODY = object()
"""Replay's stand-in objective for a fixed system or a baseline: no delay model learns from
its cells."""
REPLAY_CONCURRENCY = 1
"""Replay rows are a closed loop of one: every delay is a solo delay."""


# -- the profile cache -------------------------------------------------------------------------


def outcome_from_dict(d: Mapping[str, Any]) -> ProfileOutcome:
    """A `ProfileOutcome.to_dict()` read back."""
    p = d.get("profile")
    profile = None
    if p is not None:
        profile = Profile(
            complexity=p["complexity"],
            joint_reasoning=p["joint_reasoning"],
            pieces=p["pieces"],
            summary_length=tuple(p["summary_length"]),
            confidence=p.get("confidence"),
        )
    return ProfileOutcome(
        profile=profile,
        error=d.get("error"),
        error_kind=d.get("error_kind"),
        seconds=float(d["seconds"]),
        template=str(d["template"]),
        raw=d.get("raw", ""),
        prompt_tokens=int(d.get("prompt_tokens", 0)),
        output_tokens=int(d.get("output_tokens", 0)),
        examples=int(d.get("examples", 0)),
        finish_reason=d.get("finish_reason"),
        beliefs=None if d.get("beliefs") is None else FieldBeliefs.from_dict(d["beliefs"]),
        raw_beliefs=(
            None if d.get("raw_beliefs") is None else FieldBeliefs.from_dict(d["raw_beliefs"])
        ),
        profiler=str(d.get("profiler") or "json"),
        learned_note=str(d.get("learned_note") or ""),
    )


class CachedProfiler:
    """The controller's profiler, remembering its outcomes on disk. Only outcomes of prompts
    without feedback examples are cached (replay makes no golden runs), and of failures only
    unusable output (greedy decoding gives it again): a timeout or an engine error is the
    machine's state, not the query's. The key holds the profiler's fitted state where it keeps
    one (`fingerprint`): after `ragctl profiler train`, outcomes are asked again."""

    def __init__(self, inner: Any, path: Path, model: str) -> None:
        self.inner = inner
        self.path = path
        self.model = model
        self.hits = 0
        self.misses = 0
        self._cache: dict[str, dict[str, Any]] = {}
        if path.exists():
            for row in read_rows(path)[0]:
                self._cache[str(row["key"])] = row["outcome"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def key(
        self, question: str, metadata: str, chunk_tokens: int, collection: str | None = None
    ) -> str:
        parts: list[Any] = [
            question, metadata, chunk_tokens, self.model, sorted(self.inner.templates.items())
        ]  # fmt: skip
        fingerprint = getattr(self.inner, "fingerprint", None)
        if collection is not None and callable(fingerprint):
            parts.append(fingerprint(collection))
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]

    def has(
        self, question: str, metadata: str, chunk_tokens: int, collection: str | None = None
    ) -> bool:
        return self.key(question, metadata, chunk_tokens, collection) in self._cache

    async def profile(
        self,
        question: str,
        metadata: str,
        chunk_tokens: int,
        *,
        collection: str | None = None,
        **signals: Any,
    ) -> ProfileOutcome:
        """The inner profiler's outcome (`signals`: the retrieval signals a profiler that
        `needs_retrieval` takes), from the cache when it has it."""
        key = self.key(question, metadata, chunk_tokens, collection)
        if key in self._cache:
            self.hits += 1
            return outcome_from_dict(self._cache[key])
        self.misses += 1
        outcome = await self.inner.profile(
            question, metadata, chunk_tokens, collection=collection, **signals
        )
        if (outcome.ok or outcome.error_kind == "garbage") and outcome.examples == 0:
            self._cache[key] = outcome.to_dict()
            writer = SampleWriter(self.path)
            try:
                writer.write({"key": key, "question": question, "outcome": outcome.to_dict()})
            finally:
                writer.close()
        return outcome


# -- replay ------------------------------------------------------------------------------------


@dataclass
class ReplayStats:
    decisions: int = 0
    live_cells: int = 0
    """Chosen configurations the grid lacked, answered live and added to it."""
    learned: int = 0
    """Stage observations the delay model took from ragctl's chosen cells, after deciding."""


@dataclass
class Replayer:
    controller: Controller
    card: DatasetCard
    store: GridStore
    stats: ReplayStats
    planned: Callable[[Query, Config], Sequence[StageWork]] | None = None
    """The planned work of a configuration on a query (its output budgets), for `learn`."""
    _live: set[tuple[str, Config, Any]] = field(default_factory=set)
    """Cells answered live here, with the objective whose delay model learned them as they
    ran."""
    _models: dict[Any, DelayModel] = field(default_factory=dict)
    """One delay model per ragctl objective replayed, each learning from its own choices only,
    as a deployment running that objective would (copies of the warmed model)."""
    _base: DelayModel | None = None

    def _use(self, objective: Any) -> None:
        """Make `objective`'s delay model the controller's (`_NOBODY`: a scratch copy that
        nothing keeps): it predicts the next decision and learns from a cell answered live.
        Only once `rows` has kept the warmed model as `_base`."""
        assert self._base is not None
        delay = self._models.get(objective)
        if delay is None:
            delay = copy.deepcopy(self._base)
            if objective is not _NOBODY:
                self._models[objective] = delay
        self.controller.slo.delay = delay

    async def cell(self, query: Query, config: Config, learner: Any = _NOBODY) -> dict[str, Any]:
        """The grid's cell, or answered live and added; `learner`: the ragctl objective it was
        chosen for (`_NOBODY`: a fixed system or a baseline), whose model learns it as it
        runs."""
        found = self.store.get(query.id, config)
        if found is None:
            if self._base is not None:
                self._use(learner)
            found = await answer_cold(self.controller, self.card, query, config)
            self.store.add(found)
            self.stats.live_cells += 1
            self._live.add((query.id, config, learner))
        return found

    async def warm_trust(self, calib: Sequence[Query], plan: Plan) -> None:
        """Each ragctl objective's record of trusted profiles starts from the calibration
        split's profiles, as a deployment would have asked them before the test queries (like
        the delay model, warmed from their cells)."""
        objectives = {_objective(s) for s in plan.systems if s.kind == "ragctl"}
        for q in calib:
            outcome, choice = await self.controller.profile(q.question)
            for objective in objectives:
                self.controller.trust_for(objective).record(outcome, choice)

    async def adaptiverag_table(
        self, calib: Sequence[Query], grid: Sequence[Config]
    ) -> dict[str, str]:
        """The calibration table (AdaptiveRAG*'s and Static*'s: `systems.calibrate`) from the
        grid's cells of the calibration queries."""
        if not calib:
            raise InvalidRequest(
                "adaptiverag and static need calibration queries (--calibration N)"
            )
        rows, classes = [], {}
        for q in calib:
            for c in grid:
                cell = await self.cell(q, c)
                rows.append({**cell, "system": FIXED_PREFIX + c.label})
            outcome, _ = await self.controller.profile(q.question)
            classes[q.id] = complexity_class(outcome.profile)
        return calibrate(rows, classes, self.controller.policy.delay_weight)

    async def rows(
        self,
        test: Sequence[Query],
        plan: Plan,
        table: Mapping[str, str] | None,
        on_row: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        if self._base is None:
            self._base = self.controller.slo.delay
        learners = {_objective(s) for s in plan.systems if s.kind == "ragctl"}

        def model(objective: Any) -> Any:
            return objective if objective in learners else _NOBODY

        out = []
        try:
            for q in test:
                ran: dict[Any, dict[Config, Mapping[str, Any]]] = {}
                # One decision per ragctl objective asked for (`ragctl:<objective>`; None: the
                # settings'), in the systems' order, as live, each with its objective's own
                # delay model; and one for the baselines, which read the profile (and pay for
                # it) whatever ragctl does: asked for them, so it is no objective's record of
                # trusted profiles either.
                proposals: dict[Any, Proposal] = {}
                for s in plan.systems:
                    key = _proposal_key(s)
                    if key is not None and key not in proposals:
                        mine = s.kind == "ragctl"
                        self._use(model(_objective(s)) if mine else _NOBODY)
                        proposals[key] = await self.controller.propose(
                            q.question, _objective(s), ask=not mine
                        )
                        self.stats.decisions += 1
                for s in plan.systems:
                    key = _proposal_key(s)
                    proposal = proposals[key] if key is not None else None
                    config, why = self.choose(s.kind, s.config, proposal, table)
                    mine = s.kind == "ragctl"
                    learner = _objective(s) if mine else _NOBODY
                    cell = await self.cell(q, config, learner) if config is not None else None
                    profile_s = proposal.outcome.seconds if proposal and s.kind != "fixed" else None
                    out.append(self.row(s.name, q, config, cell, profile_s, proposal, why))
                    if mine and cell is not None and (q.id, config, learner) not in self._live:
                        ran.setdefault(learner, {}).setdefault(config, cell)
                    if on_row is not None:
                        on_row()
                for objective, cells in ran.items():
                    self.learn(q, cells.values(), self._models[objective])
        finally:
            self.controller.slo.delay = self._base
        return out

    def learn(self, query: Query, cells: Iterable[Mapping[str, Any]], delay: DelayModel) -> None:
        """What a serving controller learns from the answers it gave: `delay` observes the
        stages of the cells one ragctl objective chose for `query`, after every decision on it
        was made (prequential: each decision is predicted from earlier queries only). Only that
        objective's own choices teach it, as deployed; other objectives', the fixed systems' and
        the baselines' cells do not."""
        for cell in cells:
            for work, load, seconds, budget in cell_observations(cell, query, self.planned):
                if delay.observe(work, load, seconds, budget=budget) is None:
                    self.stats.learned += 1

    @staticmethod
    def choose(
        kind: str,
        fixed: Config | None,
        proposal: Proposal | None,
        table: Mapping[str, str] | None,
    ) -> tuple[Config | None, str | None]:
        """The system's configuration for the query, or None and why not."""
        if kind == "fixed":
            return fixed, None
        if kind == "static":
            assert table is not None
            return static_config(table), None
        assert proposal is not None
        if kind == "ragctl":
            if proposal.plan.config is None:
                return None, "Waits: nothing fits the idle engine"
            return proposal.plan.config, None
        if kind == "adaptiverag":
            assert table is not None
            return adaptiverag_config(table, proposal.outcome.profile), None
        return median_config(proposal.choice.space), None

    def row(
        self,
        system: str,
        q: Query,
        config: Config | None,
        cell: Mapping[str, Any] | None,
        profile_s: float | None,
        proposal: Proposal | None,
        why: str | None,
    ) -> dict[str, Any]:
        base = {
            "dataset": self.card.name, "system": system, "query_id": q.id, "rate": None,
            "concurrency": REPLAY_CONCURRENCY, "arrival_s": 0.0, "queue_s": 0.0,
            "primary": primary_metric(self.card), "slo_ms": None,
            "profile_s": profile_s, "config": config.label if config else None,
            "replayed": True,
        }  # fmt: skip
        if cell is None or cell.get("error"):
            error = why or (cell or {}).get("error") or "no answer"
            return {**base, "error": error, "delay_s": None, "end_s": None, "ttft_s": None,
                    "scores": {}, "tokens": None, "answer": None, "decision": None}  # fmt: skip
        # Live, a profiler that ran beside retrieval adds only its seconds beyond it; one that
        # waited for the chunks (the learned profiler, or after `no_better_profile`) adds all.
        extra = 0.0
        if profile_s is not None:
            beside = proposal is not None and proposal.profile_beside_retrieval
            extra = max(0.0, profile_s - float(cell.get("retrieve_s") or 0.0) * beside)
        delay = float(cell["delay_s"]) + extra
        ttft = cell.get("ttft_s")  # None in a cell built before streaming
        decision = None
        if proposal is not None and system != "fixed":
            decision = {
                "profile": proposal.outcome.to_dict(),
                "profile_used": proposal.choice.profile_used,
                "space_note": proposal.choice.note,
                "reason": proposal.plan.reason,
                "choice": proposal.plan.choice.to_dict() if proposal.plan.choice else None,
            }
        return {
            **base, "error": None, "delay_s": round(delay, 4), "end_s": round(delay, 4),
            "ttft_s": None if ttft is None else round(float(ttft) + extra, 4),
            "scores": cell.get("scores") or {}, "tokens": cell.get("tokens"),
            "answer": cell.get("answer"), "decision": decision,
        }  # fmt: skip


@dataclass(frozen=True)
class DelayCheck:
    """A ragctl system's delay predictions on the test queries (each made before the delay
    model learned from that query's chosen cells: `Replayer.learn`) against the grid's solo
    delays of the same cells: every recorded candidate of every decision, and whether the
    chosen one was the fastest of those predicted to answer as well as it (where every
    candidate is predicted alike, the choice is only as right as this ranking)."""

    system: str
    pairs: int
    """(query, candidate) pairs with a grid cell."""
    median_error: float | None
    """Median of |predicted / solo - 1| over the pairs."""
    queries: int
    """Decisions with at least two such candidates predicted as good as the chosen one."""
    chose_fastest: int
    """Of them, where the chosen one's solo delay was the smallest."""
    regret: float | None
    """Mean over those decisions of the chosen one's solo delay / the smallest one's."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def delay_check(rows: Sequence[Mapping[str, Any]], store: GridStore) -> list[DelayCheck]:
    """`DelayCheck` per ragctl system of replayed `rows` (see its docstring)."""
    by_system: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        choice = (r.get("decision") or {}).get("choice")
        if r["system"].split(":")[0] == "ragctl" and choice and r.get("config"):
            by_system.setdefault(r["system"], []).append(r)
    out = []
    for system, mine in by_system.items():
        errors: list[float] = []
        regrets: list[float] = []
        for r in mine:
            solo: dict[str, tuple[float, float | None]] = {}
            for c in r["decision"]["choice"]["candidates"]:
                cell = store.get(r["query_id"], Config.parse(c["config"]))
                if cell is None or cell.get("error") or cell.get("delay_s") is None:
                    continue
                actual = float(cell["delay_s"])
                if c.get("delay_s") is not None and actual > 0:
                    errors.append(abs(float(c["delay_s"]) / actual - 1.0))
                solo[c["config"]] = (actual, c.get("quality"))
            if r["config"] not in solo:
                continue
            chosen_s, chosen_q = solo[r["config"]]
            rivals = [
                s for s, q in solo.values() if chosen_q is None or (q or 0.0) >= chosen_q - 1e-9
            ]
            if len(rivals) >= 2:
                regrets.append(chosen_s / min(rivals))
        out.append(
            DelayCheck(
                system=system,
                pairs=len(errors),
                median_error=float(np.median(errors)) if errors else None,
                queries=len(regrets),
                chose_fastest=sum(x <= 1.0 + 1e-9 for x in regrets),
                regret=float(np.mean(regrets)) if regrets else None,
            )
        )
    return out


def _proposal_key(system: Any) -> tuple[Any, ...] | None:
    """Which proposal a system reads: its objective's (ragctl), the baselines' or none
    (fixed, static)."""
    if system.kind in ("fixed", "static"):
        return None
    return ("ragctl", _objective(system)) if system.kind == "ragctl" else ("baselines",)


def _objective(system: Any) -> Any:
    """The objective a system decides with: a `ragctl:<objective>`'s own, else the settings'
    (None), which AdaptiveRAG* and Parrot* read too."""
    return system.objective if system.kind == "ragctl" else None


# -- replay against a live run -----------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """One system's replayed rows against the same system's live rows, on the queries both
    answered."""

    system: str
    n: int
    same_config: int
    same_answer: int
    live_quality: float | None
    replay_quality: float | None
    disagreements: list[dict[str, Any]]
    """Per query that differs: its configurations, answers and primary scores."""


def agreement(
    live: Sequence[Mapping[str, Any]], replayed: Sequence[Mapping[str, Any]]
) -> list[Agreement]:
    """Does replay tell what a live run (closed loop, one in flight, greedy decoding) got?"""

    def index(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
        return {(str(r["system"]), str(r["query_id"])): r for r in rows if r.get("error") is None}

    a, b = index(live), index(replayed)
    out = []
    for system in sorted({s for s, _ in a} & {s for s, _ in b}):
        pairs = [(a[k], b[k]) for k in a if k[0] == system and k in b]
        primary = next((str(r["primary"]) for r, _ in pairs if r.get("primary")), None)

        def q(r: Mapping[str, Any], primary: str | None = primary) -> float | None:
            v = (r.get("scores") or {}).get(primary) if primary else None
            return None if v is None else float(v)

        differ = [
            {"query_id": x["query_id"], "live": x.get("config"), "replay": y.get("config"),
             "live_answer": x.get("answer"), "replay_answer": y.get("answer"),
             "live_score": q(x), "replay_score": q(y)}
            for x, y in pairs
            if x.get("config") != y.get("config") or x.get("answer") != y.get("answer")
        ]  # fmt: skip
        lq = [v for x, _ in pairs if (v := q(x)) is not None]
        rq = [v for _, y in pairs if (v := q(y)) is not None]
        out.append(
            Agreement(
                system=system,
                n=len(pairs),
                same_config=sum(x.get("config") == y.get("config") for x, y in pairs),
                same_answer=sum(x.get("answer") == y.get("answer") for x, y in pairs),
                live_quality=sum(lq) / len(lq) if lq else None,
                replay_quality=sum(rq) / len(rq) if rq else None,
                disagreements=differ,
            )
        )
    return out
