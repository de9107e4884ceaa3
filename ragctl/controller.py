"""The one place that awaits: retrieve ‖ profile -> policy -> admission -> synthesis -> Answer.

Per query (`aask` without a configuration): retrieval (at the largest chunk count any rule can ask
for) and the LLM profiler run concurrently; `ragctl.policy` turns the profile into a pruned space
and a best-fit `decide`; the admission queue runs it against the engine's free KV cache minus
what in-flight plans reserved, waiting when nothing fits; the synthesis method runs on the shared
engine while the plan's blocks stay reserved. Every answer carries the Decision that explains it,
and every step is reported to the SLO loop through the request's one `RequestTrace`.

`aask(question, config)` runs a configuration the caller chose (the fixed-configuration
baseline); it still reserves its blocks, so adaptive queries sharing the engine see it, but never
waits. Many `aask` calls may run at once on one Controller: they share the engine, which batches
them. `ask`/`batch`/`close` are the blocking forms: they run on the controller's `Bridge`.

Streaming: a method's final step that makes one call whose text is the answer (`Step.streams`:
stuff's answer, map_reduce's reducer) runs through `Engine.stream`, on every request, so the
time to the first answer token (`timings["ttft"]`) is always measured; `aask(on_token=...)`
receives the deltas and `astream`/`stream` yield them. Final steps that select (map_rerank) give
the answer as one delta when they finish. It is one code path: `astream` is `aask` with a queue
behind `on_token`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ragctl.bridge import Bridge, stream_through
from ragctl.engine.base import Engine, gather_or_cancel
from ragctl.engine.pool import EnginePool, label_of
from ragctl.errors import (
    EngineError,
    EngineUnreachable,
    InvalidRequest,
    InvalidSetting,
    PromptTooLong,
    RagctlError,
    SLOUnmeetable,
)
from ragctl.policy import (
    AdaptivePolicy,
    CostModels,
    SpaceChoice,
    Trust,
    adaptive_decision,
    best_fit,
    chunk_cap,
    fallback_space,
    no_better_profile,
    outcome_counter,
    planned_work,
    resolve_space,
    unasked_profile,
    untrusted_profile,
    with_history,
)
from ragctl.profiler import ProfileOutcome, Profiler
from ragctl.profiler.auto import RetrievalSignals
from ragctl.profiler.labels import GridCell, label_query
from ragctl.profiler.learned import query_features
from ragctl.profiler.store import LabelRecord, llm_beliefs
from ragctl.rules import RuleSet, fast_corner, load_rules
from ragctl.scheduler import AdmissionQueue, KVLedger, NeedTable
from ragctl.scheduler.admission import EngineSlot
from ragctl.scheduler.cost import QualityModel, StageWork, WorkTable
from ragctl.scheduler.placement import Strategy
from ragctl.scheduler.slo import RequestTrace, SLOTracker, StageHooks
from ragctl.synthesis.methods import CallSizer, Step, Synthesizer
from ragctl.types import (
    Answer,
    AnswerOptions,
    Chunk,
    CollectionInfo,
    Config,
    ConfigSpace,
    Decision,
    Generation,
    GenerationRequest,
    KVState,
    Message,
    Objective,
    Plan,
    StageRecord,
    SynthesisResult,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Proposal:
    """The adaptive path's decision for one query, not carried out (`Controller.propose`)."""

    outcome: ProfileOutcome
    choice: SpaceChoice
    plan: Plan
    # The profiler ran beside retrieval, so only its seconds beyond retrieval add delay; False
    # where it waited for the chunks (or was not asked).
    profile_beside_retrieval: bool = False


@dataclass(frozen=True)
class _Chosen:
    """The adaptive path up to admission (`Controller._choose`)."""

    outcome: ProfileOutcome
    chunks: list[Chunk]
    choice: SpaceChoice
    decide: Callable[[KVState, int], Plan]
    profile_beside_retrieval: bool


LedgerFactory = Callable[[str], KVLedger]
"""The KV ledger of the engine with this key (`label_of(engine)`: its URL when remote);
ragctl.distributed's shares one with other replicas."""


def admission_for(
    engine: Engine,
    maxsize: int,
    strategy: Strategy = "best-fit",
    synthesis_engines: Sequence[int] = (),
    *,
    ledger_for: LedgerFactory | None = None,
) -> AdmissionQueue:
    """The admission queue of `engine`: one ledger over it, or, for an `EnginePool`, one slot
    (ledger, KV state, health) per member that runs synthesis (`synthesis_engines`: their
    indexes; empty: all), placed by `strategy`. `ledger_for`: each engine's ledger, by key
    (default: a local `KVLedger`)."""
    new_ledger = ledger_for or (lambda key: KVLedger())
    if not isinstance(engine, EnginePool):
        return AdmissionQueue(new_ledger(label_of(engine)), engine.kv_state, maxsize=maxsize)
    members = engine.members
    if synthesis_engines:
        bad = [i for i in synthesis_engines if not 0 <= i < len(members)]
        if bad:
            raise InvalidSetting(
                f"synthesis_engines names engine {bad[0]}; the pool has {len(members)} (0-based)"
            )
        members = tuple(members[i] for i in sorted(set(synthesis_engines)))
    slots = [
        EngineSlot(m.label, m.kv_state, new_ledger(m.label), (lambda m=m: m.healthy), m)
        for m in members
    ]
    return AdmissionQueue.over(slots, maxsize, strategy=strategy)


NO_HOOKS = StageHooks()
"""The hooks of a run outside any request (golden feedback, `run_synthesis` by itself)."""

OnToken = Callable[[str], None]
"""Receives the answer's text deltas as they are decoded (on the engine's event loop)."""


class AnswerStream:
    """The answer's deltas on their way to `on_token`: the answer's surrounding whitespace
    left out (deltas join to exactly `Answer.text`, which is stripped), the first one timed."""

    def __init__(self, on_token: OnToken | None = None) -> None:
        self.on_token = on_token
        self.first_at: float | None = None
        """perf_counter() when the first delta went out."""
        self.sent: list[str] = []
        self.finish_reason = "stop"
        self._started = False
        self._held = ""  # trailing whitespace: sent only when more text follows

    def feed(self, delta: str) -> None:
        if not self._started:
            delta = delta.lstrip()
            if not delta:
                return
            self._started = True
        body = delta.rstrip()
        if not body:
            self._held += delta
            return
        text, self._held = self._held + body, delta[len(body) :]
        self._emit(text)

    def complete(self, answer: str) -> None:
        """The method's final answer: sent whole when nothing streamed (map_rerank picks)."""
        if not self.sent and answer:
            self._emit(answer)

    def _emit(self, text: str) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.sent.append(text)
        if self.on_token is not None:
            self.on_token(text)


class Retriever(Protocol):
    def search(self, question: str, k: int) -> list[Chunk]: ...


class Controller:
    """Answers questions over one collection on a shared engine.

    One line for a collection with the settings' defaults (engine, rules, profiler)::

        ctl = ragctl.open("squad")            # blocking use: ctl.ask(q), ctl.close()
        ctl = await ragctl.aopen("squad")     # in async code: await ctl.aask(q)

    or explicitly from parts: `Controller(engine, retriever, rules=..., settings=...)`.
    """

    def __init__(
        self,
        engine: Engine,
        retriever: Retriever,
        *,
        settings: Any | None = None,
        answer_max_tokens: int | None = None,
        temperature: float | None = None,
        collection: CollectionInfo | None = None,
        rules: RuleSet | None = None,
        profiler: Profiler | None = None,
        policy: AdaptivePolicy | None = None,
        admission: AdmissionQueue | None = None,
        slo: SLOTracker | None = None,
        owns_engine: bool = True,
        bridge: Bridge | None = None,
    ) -> None:
        """`settings` (a `ragctl.Settings`) fills what is not given explicitly: answer budget,
        temperature, adaptive policy, rules file. `owns_engine`: `aclose` stops the engine and
        profiler (False when several controllers share them). `bridge`: the event loop the
        engine runs on (default: the caller's; a private one on the first blocking call)."""
        if answer_max_tokens is None:
            answer_max_tokens = (settings and settings.answer_max_tokens) or 64
        if temperature is None:
            temperature = settings.temperature if settings is not None else 0.0
        self.engine = engine
        self.retriever = retriever
        self.collection = collection or CollectionInfo.of(retriever)
        self.synthesizer = Synthesizer(
            engine.tokenizer, engine.max_model_len, answer_max_tokens, temperature,
            collection=self.collection.name,
        )  # fmt: skip
        if rules is None:
            rules = load_rules(settings.rules_file if settings is not None else None)
        self.rules = rules
        # The least work any profile's space can hold, per method (`no_better_profile`'s bound).
        self.corner = fast_corner(rules)
        self.profiler = profiler if profiler is not None else Profiler(engine)
        if policy is None:
            policy = AdaptivePolicy.from_settings(settings) if settings else AdaptivePolicy()
        self.policy = policy
        # One ledger and queue per engine: controllers of several collections on one engine
        # pass the same AdmissionQueue.
        # `is None`, not `or`: an empty AdmissionQueue has len 0 and is falsy.
        if admission is None:
            admission = admission_for(
                engine, self.policy.queue_size, self.policy.placement,
                self.policy.synthesis_engines,
            )  # fmt: skip
        self.admission = admission
        # One tracker per engine, like the admission queue: flags and pauses span collections.
        # It holds the engine's delay model and load meter, shared the same way.
        if slo is None:
            slo = self.policy.tracker()
        self.slo = slo
        for slot in self.admission.slots:
            member = self._engine_of(slot)
            if (steps := getattr(member, "steps", None)) is not None:
                self.slo.watch_steps(label_of(member), steps)
        self.quality = QualityModel()
        """Predicted quality of configurations in this collection (best-fit's objective); fed
        with outcome labels by `quality.add_label`."""
        self.owns_engine = owns_engine
        self.bridge = bridge or Bridge()
        self.history: dict[str, deque[ConfigSpace]] = {}
        self.trust: dict[tuple[str, Objective], Trust] = {}
        """Per collection and objective: whether its recent profiles were trusted."""
        self.counters: Counter[str] = Counter()
        """profiled, profile_used, low_confidence, profiler_errors, fallback, queued, golden_runs,
        golden_errors: running totals for metrics and reports."""
        self._queries = 0
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- entry points: async forms hand over to the engine's loop, blocking forms wait ---------

    def check_question(
        self,
        question: str,
        history: Sequence[Message] = (),
        options: AnswerOptions | None = None,
    ) -> str:
        """The question, stripped; a clear error if it is empty or cannot fit the context."""
        q = question.strip() if isinstance(question, str) else ""
        if not q:
            raise InvalidRequest("the question is empty")
        need = self.synthesizer.for_request(options).question_overhead(with_history(q, history))
        if need > self.engine.max_model_len:
            raise PromptTooLong(
                f"the question needs {need} tokens with the prompt and answer budget; the model's "
                f"context is {self.engine.max_model_len} tokens"
            )
        return q

    async def aask(
        self,
        question: str,
        config: Config | None = None,
        *,
        history: Sequence[Message] = (),
        max_chunks: int | None = None,
        slo_ms: float | None = None,
        options: AnswerOptions | None = None,
        on_token: OnToken | None = None,
    ) -> Answer:
        """Answer `question`: adaptively, or with `config` when given.

        `history`: earlier turns of a conversation; the synthesis prompts see them, retrieval
        and the profiler see the question alone. `max_chunks`: a cap on the chunks the adaptive
        path may use. `slo_ms`: the request's latency SLO (default: the collection's, from the
        settings; `math.inf`: none); the Decision's `slo` says what the SLO loop did.
        `options`: max_tokens (at most the collection's answer budget, which sizes the KV plan)
        and sampling fields for the final stage. `on_token`: called with each answer delta as
        it is decoded (on the engine's loop; keep it quick), see `astream`."""
        return await self.bridge.arun(
            self._aask(question, config, history, max_chunks, slo_ms, options, on_token)
        )

    async def astream(
        self,
        question: str,
        config: Config | None = None,
        *,
        history: Sequence[Message] = (),
        max_chunks: int | None = None,
        slo_ms: float | None = None,
        options: AnswerOptions | None = None,
    ) -> AsyncIterator[str | Answer]:
        """`aask`, streamed: the answer's text deltas (str) as the final stage decodes them,
        then the `Answer`. stuff and map_reduce stream token by token; map_rerank yields its
        chosen answer in one piece when the ranking is done. Closing the iterator early (or
        cancelling its consumer) cancels the request and aborts its engine calls."""
        stream = stream_through(
            lambda sink: self.aask(
                question, config, history=history, max_chunks=max_chunks, slo_ms=slo_ms,
                options=options, on_token=sink,
            )
        )  # fmt: skip
        # Closed with this iterator, not when collected: that cancels the request at once.
        async with aclosing(stream):
            async for item in stream:
                yield item

    def stream(
        self,
        question: str,
        config: Config | None = None,
        *,
        history: Sequence[Message] = (),
        max_chunks: int | None = None,
        slo_ms: float | None = None,
        options: AnswerOptions | None = None,
    ) -> Iterator[str | Answer]:
        """`astream`, blocking (from plain code): deltas, then the Answer; closing the
        iterator early cancels the request."""
        return self.bridge.iterate(
            lambda sink: self._aask(question, config, history, max_chunks, slo_ms, options, sink)
        )

    def ask(
        self,
        question: str,
        config: Config | None = None,
        *,
        history: Sequence[Message] = (),
        max_chunks: int | None = None,
        slo_ms: float | None = None,
        options: AnswerOptions | None = None,
    ) -> Answer:
        """`aask`, blocking (not from inside a running event loop: use `await aask` there)."""
        return self.bridge.run(self._aask(question, config, history, max_chunks, slo_ms, options))

    async def abatch(self, questions: Sequence[str], config: Config | None = None) -> list[Answer]:
        """Several questions at once on the shared engine (it batches them); answers in
        question order. One failure fails the batch and cancels the rest."""
        return await self.bridge.arun(self._abatch(questions, config))

    def batch(self, questions: Sequence[str], config: Config | None = None) -> list[Answer]:
        """`abatch`, blocking."""
        return self.bridge.run(self._abatch(questions, config))

    async def profile(self, question: str) -> tuple[ProfileOutcome, SpaceChoice]:
        """The profile of `question` and the space it would get (history is not updated)."""
        return await self.bridge.arun(self._profile_only(question))

    def trust_for(self, objective: Objective | None = None) -> Trust:
        """Whether the profiles `objective` (default: the policy's) asked on this collection
        were trusted (`policy.untrusted_profile` reads it)."""
        return self.trust.setdefault(
            (self.collection.name, objective or self.policy.objective),
            Trust(deque(maxlen=max(self.policy.untrusted_window, 1))),
        )

    async def retrieval_signals(self, question: str) -> RetrievalSignals:
        """What retrieval computes for `question` anyway (the query embedding it searched with,
        the scores of the chunks found): the learned profiler's input."""
        return await self.bridge.arun(self._signals(self.check_question(question)))

    async def propose(
        self, question: str, objective: Objective | None = None, *, ask: bool = False
    ) -> Proposal:
        """What the adaptive path would decide for `question` now, without answering it: the
        real profiler, rules and best-fit against the engine's KV state (policy replay). Like
        `aask`, it updates the collection's history of confident spaces. `ask`: profile even
        where the adaptive path would leave the profiler unasked (`unasked_profile`), for the
        baselines that read the profile."""
        return await self.bridge.arun(self._propose(question, objective, ask))

    async def aclose(self) -> None:
        """Stop background feedback runs, then (when it owns them) the profiler and engine;
        then a private event loop."""
        try:
            await self.bridge.arun(self._aclose())
        finally:
            await self.bridge.aclose()

    def close(self) -> None:
        """`aclose`, blocking."""
        try:
            self.bridge.run(self._aclose())
        finally:
            self.bridge.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Controller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- on the engine's loop -------------------------------------------------------------------

    async def _aask(
        self,
        question: str,
        config: Config | None,
        history: Sequence[Message],
        max_chunks: int | None,
        slo_ms: float | None,
        options: AnswerOptions | None = None,
        on_token: OnToken | None = None,
    ) -> Answer:
        start = time.perf_counter()
        q = self.check_question(question, history, options)
        synth = self.synthesizer.for_request(options)
        sink = AnswerStream(on_token)
        if max_chunks is not None and max_chunks < 1:
            raise InvalidRequest(f"max_chunks must be at least 1, got {max_chunks}")
        if slo_ms is not None and not slo_ms > 0:
            raise InvalidRequest(f"slo_ms must be positive, got {slo_ms}")
        if slo_ms is None:
            slo_ms = self.policy.slo_for(self.collection.name)
        elif slo_ms == math.inf:
            slo_ms = None  # explicitly none, whatever the settings' default
        trace = RequestTrace(self.slo, slo_ms)
        ok = False
        try:
            await trace.gate()
            if config is not None:
                answer = await self._ask_fixed(q, config, start, history, trace, synth, sink)
            else:
                objective = options.objective if options is not None else None
                answer = await self._ask_adaptive(
                    q, start, history, max_chunks, trace, synth, sink, objective,
                    ask=options is not None and options.ask_profiler,
                )  # fmt: skip
            ok = True
        finally:
            record = trace.finish(ok=ok)
        if record is None:
            return answer
        return replace(answer, decision=replace(answer.decision, slo=record))

    async def _abatch(self, questions: Sequence[str], config: Config | None) -> list[Answer]:
        return await gather_or_cancel([self._aask(q, config, (), None, None) for q in questions])

    async def _profile_only(self, question: str) -> tuple[ProfileOutcome, SpaceChoice]:
        q = self.check_question(question)
        signals = await self._signals(q) if self._needs_signals() else None
        outcome = await self._profile(q, None, signals)
        return outcome, self._space_for(outcome, record=False)

    async def _signals(self, q: str) -> RetrievalSignals:
        chunks, vector = await self._retrieve_with_vector(q, self.rules.max_num_chunks, {})
        return RetrievalSignals(vector, tuple(c.score or 0.0 for c in chunks))

    async def _aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.owns_engine:
            await self.profiler.aclose()
            await self.engine.aclose()

    # -- the two paths --------------------------------------------------------------------------

    async def _ask_fixed(
        self,
        q: str,
        config: Config,
        start: float,
        history: Sequence[Message],
        trace: StageHooks,
        synth: Synthesizer,
        sink: AnswerStream,
    ) -> Answer:
        timings: dict[str, float] = {}
        chunks = await self._retrieve(q, config.num_chunks, timings)
        trace.on_stage("queue")
        sq = with_history(q, history)
        trace.on_plan(config, work=planned_work(synth.sizer(sq, chunks), config))
        slot, engine = self._fixed_slot()
        kv = await engine.kv_state()
        need = self._need(sq, chunks, kv.block_size, config, synth)
        decision = Decision(
            config=config,
            reason="fixed",
            kv=kv,
            templates=synth.template_versions,
            need_blocks=need,
            engine=label_of(engine),
        )
        # Reserved for the accounting of adaptive queries on the same engine; never waits.
        with slot.ledger.reserve(need):
            return await self._synthesize(
                q, sq, chunks, decision, timings, start, trace, synth, sink, engine
            )

    def _fixed_slot(self) -> tuple[EngineSlot, Engine]:
        """Where a run outside admission (a fixed configuration, a feedback run) goes: the
        healthy engine with the fewest plans in flight (the only engine outside a pool)."""
        slots = self.admission.slots
        if len(slots) == 1:
            return slots[0], self._engine_of(slots[0])
        healthy = [s for s in slots if s.healthy()] or list(slots)
        slot = min(healthy, key=lambda s: s.ledger.held)
        return slot, self._engine_of(slot)

    def _engine_of(self, slot: EngineSlot | None) -> Engine:
        return slot.engine if slot is not None and slot.engine is not None else self.engine

    async def _ask_adaptive(
        self,
        q: str,
        start: float,
        history: Sequence[Message],
        max_chunks: int | None,
        trace: StageHooks,
        synth: Synthesizer,
        sink: AnswerStream,
        objective: Objective | None = None,
        ask: bool = False,
    ) -> Answer:
        timings: dict[str, float] = {}
        sq = with_history(q, history)
        chosen = await self._choose(q, sq, max_chunks, timings, trace, synth, objective, ask)
        outcome, chunks, choice = chosen.outcome, chosen.chunks, chosen.choice
        queued_s = 0.0
        tried = 0
        while True:
            admitted = await self.admission.admit(chosen.decide)
            queued_s += admitted.queued_s
            timings["queue"] = queued_s
            plan = admitted.plan
            assert plan.config is not None  # admitted plans are runnable
            trace.on_plan(
                plan.config, plan.slo_action, planned_work(synth.sizer(sq, chunks), plan.config)
            )
            if plan.slo_action == "shed":
                admitted.reservation.release()
                self.counters["shed"] += 1
                raise SLOUnmeetable(
                    f"refused before any engine call: even the fastest configuration that fits "
                    f"now ({plan.config.label}) is predicted to miss this request's SLO under "
                    f"the current load (SLO mitigation 'shed'); retry later or with a longer SLO"
                )
            engine = self._engine_of(admitted.slot)
            templates = {**synth.template_versions, **self._profiler_templates()}
            decision = adaptive_decision(
                plan, admitted.kv, choice, outcome, templates, admitted.queued
            )
            decision = replace(decision, engine=label_of(engine))
            tried += 1
            self.counters["fallback"] += plan.reason == "fallback"
            self.counters["queued"] += admitted.queued
            try:
                with admitted.reservation:
                    answer = await self._synthesize(
                        q, sq, chunks, decision, timings, start, trace, synth, sink, engine
                    )
            except EngineUnreachable as e:
                # The engine could not be reached: the call never started. Re-plan on the
                # rest of the pool (the member is out of it now), unless an answer token went
                # out already or every engine was tried.
                if sink.sent or not self._replannable(tried):
                    raise
                self.counters["replanned"] += 1
                self.counters["fallback"] -= plan.reason == "fallback"
                self.counters["queued"] -= admitted.queued
                log.warning("re-planning a query away from %s: %s", decision.engine, e)
                continue
            break
        self._maybe_golden(q, chunks, outcome)
        return answer

    def _replannable(self, tried: int) -> bool:
        """Whether a query whose engine was unreachable may be planned again: in a pool, with
        a healthy engine left, at most once per engine."""
        slots = self.admission.slots
        return len(slots) > 1 and tried < len(slots) and any(s.healthy() for s in slots)

    async def _choose(
        self,
        q: str,
        synthesis_question: str,
        max_chunks: int | None,
        timings: dict[str, float],
        trace: StageHooks = NO_HOOKS,
        synth: Synthesizer | None = None,
        objective: Objective | None = None,
        ask: bool = False,
    ) -> _Chosen:
        """The adaptive path up to the admission queue: retrieval ‖ profile (unless no answer
        could buy anything: `unasked_profile`; `ask` profiles anyway), the pruned space (the
        collection's history learns from it), and best-fit's `decide`."""
        k = self.rules.max_num_chunks
        if max_chunks is not None:
            k = min(k, max_chunks)
        objective = objective or self.policy.objective
        trust = self.trust_for(objective)
        unasked = unasked_profile(self.quality, objective) or untrusted_profile(
            trust, self.policy.untrusted_window, objective
        )
        if ask:
            unasked = None
        sizer: CallSizer | None = None
        beside = False
        if unasked is None and not ask and self._profile_may_buy_nothing(objective):
            # Whether a profile could buy a better choice depends on the chunks' sizes, so
            # retrieval (milliseconds) goes first here instead of beside the profiler.
            chunks, vector = await self._retrieve_with_vector(
                q, k, timings, vector=self._needs_signals()
            )
            sizer = (synth or self.synthesizer).sizer(synthesis_question, chunks)
            unasked = self._no_better_profile(objective, chunks, sizer)
            if unasked is None:
                signals = None
                if self._needs_signals():
                    signals = RetrievalSignals(vector, tuple(c.score or 0.0 for c in chunks))
                outcome = await self._profile(q, timings, signals)
            else:
                outcome = unasked
        elif unasked is not None:
            chunks = await self._retrieve(q, k, timings)
            outcome = unasked
        elif self._needs_signals():
            # The learned profiler reads the query embedding and the retrieval scores, so it
            # waits for retrieval (milliseconds) instead of running beside it.
            chunks, vector = await self._retrieve_with_vector(q, k, timings)
            signals = RetrievalSignals(vector, tuple(c.score or 0.0 for c in chunks))
            outcome = await self._profile(q, timings, signals)
        else:
            retrieval = asyncio.ensure_future(self._retrieve(q, k, timings))
            try:
                outcome = await self._profile(q, timings)
                chunks = await retrieval
            finally:
                if not retrieval.done():
                    retrieval.cancel()
            beside = True
        t = time.perf_counter()
        choice = self._space_for(outcome, record=True)
        if not ask:  # a profile asked for a baseline is not this objective's
            trust.record(outcome, choice)
        trace.on_stage("queue")
        cap = chunk_cap(
            choice.space, [c.score or 0.0 for c in chunks], self.policy.retrieval_aware_k
        )
        decide = best_fit(
            choice,
            sizer or (synth or self.synthesizer).sizer(synthesis_question, chunks),
            cap,
            self.policy.kv_buffer_blocks,
            cost=self._cost_models(objective),
            **trace.planning(),
        )
        timings["decide"] = time.perf_counter() - t
        return _Chosen(outcome, chunks, choice, decide, beside)

    async def _propose(
        self, question: str, objective: Objective | None = None, ask: bool = False
    ) -> Proposal:
        q = self.check_question(question)
        timings: dict[str, float] = {}
        chosen = await self._choose(q, q, None, timings, objective=objective, ask=ask)
        slot = self.admission.slots[0]
        plan = chosen.decide(await slot.kv_state(), slot.ledger.reserved)
        return Proposal(chosen.outcome, chosen.choice, plan, chosen.profile_beside_retrieval)

    # -- steps ----------------------------------------------------------------------------------

    async def _retrieve(self, q: str, k: int, timings: dict[str, float]) -> list[Chunk]:
        chunks, _ = await self._retrieve_with_vector(q, k, timings, vector=False)
        return chunks

    async def _retrieve_with_vector(
        self, q: str, k: int, timings: dict[str, float], *, vector: bool = True
    ) -> tuple[list[Chunk], Any]:
        """The chunks, and (with `vector`, when the retriever exposes it) the query embedding
        retrieval searched with."""
        t = time.perf_counter()
        with_vector = getattr(self.retriever, "asearch_with_vector", None)
        if vector and with_vector is not None:
            found = await with_vector(q, k)
            timings["retrieve"] = time.perf_counter() - t
            return found
        asearch = getattr(self.retriever, "asearch", None)
        if asearch is not None:
            # Batched with concurrent requests' embedding and search (`BatchingRetriever`).
            chunks = await asearch(q, k)
        else:
            # Embedding and search are CPU work: keep the event loop free for other requests.
            chunks = await asyncio.to_thread(self.retriever.search, q, k)
        timings["retrieve"] = time.perf_counter() - t
        return chunks, None

    async def _profile(
        self,
        q: str,
        timings: dict[str, float] | None = None,
        signals: RetrievalSignals | None = None,
    ) -> ProfileOutcome:
        c = self.collection
        extra = {"retrieval": signals} if signals is not None else {}
        outcome = await self.profiler.profile(
            q, c.metadata, c.chunk_tokens, collection=c.name, **extra
        )
        if timings is not None:
            timings["profile"] = outcome.seconds
        self.counters[f"profiler_{outcome.profiler}"] += 1
        return outcome

    def _profile_may_buy_nothing(self, objective: Objective) -> bool:
        """Whether `no_better_profile` could leave the profiler unasked: `latency`, or
        `balanced` with measured outcomes."""
        return objective == "latency" or (objective == "balanced" and bool(self.quality.measured()))

    def _no_better_profile(
        self, objective: Objective, chunks: list[Chunk], sizer: CallSizer
    ) -> ProfileOutcome | None:
        """`policy.no_better_profile` on this query's chunks, at the engine's load now."""
        fallback = self._fallback_space()
        cap = chunk_cap(fallback, [c.score or 0.0 for c in chunks], self.policy.retrieval_aware_k)
        works, load = WorkTable(sizer), self.slo.load.now()
        return no_better_profile(
            self.quality, objective, fallback, self.corner, cap,
            lambda c: self.slo.delay.predict(works(c), load), self.policy.delay_weight,
        )  # fmt: skip

    def _fallback_space(self) -> ConfigSpace:
        """The space a query with no trusted profile gets now (`policy.fallback_space`)."""
        return fallback_space(
            self.rules, self.history.get(self.collection.name, ()),
            learned=self.quality.label_space(), labelled=self.quality.label_space(min_labels=1),
        )  # fmt: skip

    def _space_for(self, outcome: ProfileOutcome, *, record: bool) -> SpaceChoice:
        history = self.history.setdefault(
            self.collection.name, deque(maxlen=self.policy.history_size)
        )
        choice = resolve_space(
            outcome, self.rules, history, self.policy.confidence_threshold,
            learned=self.quality.label_space(),
            labelled=self.quality.label_space(min_labels=1),
        )  # fmt: skip
        if record:
            self.counters["profiled"] += 1
            self.counters[outcome_counter(outcome, choice)] += 1
            if choice.profile_used:
                history.append(choice.space)
        return choice

    def _cost_models(self, objective: Objective | None = None) -> CostModels:
        """Best-fit's predictors and objective (`objective`: this request's, else the
        policy's)."""
        return CostModels(
            delay=self.slo.delay,
            load=self.slo.load.now,
            quality=self.quality,
            objective=objective or self.policy.objective,
            delay_weight=self.policy.delay_weight,
            explore=self.policy.explore_delay,
        )

    def _need(
        self,
        q: str,
        chunks: list[Chunk],
        block_size: int,
        config: Config,
        synth: Synthesizer | None = None,
    ) -> int:
        sizer = (synth or self.synthesizer).sizer(q, chunks)
        return NeedTable(sizer, block_size, self.policy.kv_buffer_blocks)(config)

    def _needs_signals(self) -> bool:
        """Whether the profiler reads retrieval signals for this collection (then retrieval
        runs first, instead of beside the profiler)."""
        wants = getattr(self.profiler, "needs_retrieval", None)
        return bool(wants(self.collection.name)) if callable(wants) else False

    def _profiler_templates(self) -> dict[str, str]:
        return {f"profiler.{k}": v for k, v in self.profiler.templates.items()}

    async def _synthesize(
        self,
        q: str,
        synthesis_question: str,
        chunks: list[Chunk],
        decision: Decision,
        timings: dict[str, float],
        start: float,
        trace: StageHooks,
        synth: Synthesizer,
        sink: AnswerStream,
        engine: Engine | None = None,
    ) -> Answer:
        if not await trace.hold(decision.engine):
            self.counters["shed"] += 1
            raise SLOUnmeetable(
                f"refused before any engine call: held while its prefill would have pushed "
                f"requests in flight past their deadlines, until {decision.config.label} was "
                f"predicted to miss this request's own SLO ({trace.refusal()}; SLO mitigation "
                f"'hold'); retry later or with a longer SLO"
            )
        # No await between the hold and the first stage's start: the next held request must
        # see this one's prefill among the stalls of the requests in flight.
        t = time.perf_counter()
        step = synth.plan(decision.config, synthesis_question, chunks)
        planned = planned_work(synth.sizer(synthesis_question, chunks), decision.config)
        result, stages = await self.run_synthesis(step, trace, sink, planned, engine)
        end = time.perf_counter()
        timings["synthesis"] = end - t
        for s in stages:
            timings[f"synthesis.{s.name}"] = s.seconds
        timings["total"] = end - start
        timings["ttft"] = (sink.first_at or end) - start
        by_id = {c.id: c for c in chunks}
        return Answer(
            question=q,
            text=result.answer,
            decision=decision,
            chunks=tuple(by_id[i] for i in result.used_chunk_ids),
            stages=stages,
            timings=timings,
            synthesis=result,
            finish_reason=sink.finish_reason,
            max_tokens=synth.answer_max_tokens,
        )

    async def run_synthesis(
        self,
        step: Step | SynthesisResult,
        trace: StageHooks = NO_HOOKS,
        sink: AnswerStream | None = None,
        planned: Sequence[StageWork] = (),
        engine: Engine | None = None,
    ) -> tuple[SynthesisResult, tuple[StageRecord, ...]]:
        """Run a method's steps on the engine, one stage after another, telling `trace` each
        stage as it starts (the SLO loop times it and decides its calls' priority). With a
        `sink`, a streaming step's call goes through `Engine.stream` and its deltas to the sink;
        the final answer completes it (sent whole if nothing streamed).
        Every stage counts in the engine's load meter while it runs, and the engine's delay
        model learns from it (its tokens, the load when it started, its seconds); `planned`
        (the configuration's planned work per stage) sizes its tokens in the meter. `engine`:
        the engine of the pool the plan was placed on (default: the controller's)."""
        engine = engine or self.engine
        stages: list[StageRecord] = []
        by_stage = {w.stage: w for w in planned}
        while isinstance(step, Step):
            t = time.perf_counter()
            trace.on_stage(step.name)
            requests = step.requests
            priority = trace.priority_for(len(requests))
            if priority:
                requests = tuple(replace(r, priority=priority) for r in requests)
            stage_plan = by_stage.get(step.name)
            budget = StageWork(
                step.name,
                len(requests),
                stage_plan.prompt_tokens if stage_plan is not None else 0,
                max(r.max_tokens for r in requests),
                sum(r.max_tokens for r in requests),
                width=stage_plan.width if stage_plan is not None else 1,
                collection=self.collection.name,
            )
            load = self.slo.load.now()
            with self.slo.load.running(len(requests), budget.prompt_tokens + budget.output_tokens):
                if sink is not None and step.streams:
                    gens = [await self._stream_call(requests[0], sink, engine)]
                else:
                    gens = await engine.generate(requests)
            seconds = time.perf_counter() - t
            stages.append(
                StageRecord(
                    name=step.name,
                    calls=len(gens),
                    prompt_tokens=sum(g.prompt_tokens for g in gens),
                    output_tokens=sum(g.output_tokens for g in gens),
                    seconds=seconds,
                )
            )
            observed = StageWork(
                step.name,
                len(gens),
                stages[-1].prompt_tokens,
                max((g.output_tokens for g in gens), default=0),
                stages[-1].output_tokens,
            )
            self.slo.observe_stage(observed, load, seconds, budget)
            step = step.finish(gens)
        if sink is not None:
            sink.complete(step.answer)
        return step, tuple(stages)

    async def _stream_call(
        self, request: GenerationRequest, sink: AnswerStream, engine: Engine | None = None
    ) -> Generation:
        final = None
        async with aclosing((engine or self.engine).stream(request)) as events:
            async for event in events:
                if isinstance(event, Generation):
                    final = event
                else:
                    sink.feed(event)
        if final is None:
            raise EngineError("the engine's stream ended without its result")
        sink.finish_reason = final.finish_reason or "stop"
        return final

    # -- golden-configuration feedback ----------------------------------------------------------

    def _maybe_golden(self, q: str, chunks: list[Chunk], outcome: ProfileOutcome) -> None:
        """Every `golden_every` adaptive queries, rerun one with the golden configuration and
        the feedback budget's candidates, label it, and ask the profiler what profile would have
        been right; in the background, so the user's answer is not delayed."""
        self._queries += 1
        every = self.policy.golden_every
        if not every or self._queries % every:
            return
        task = asyncio.ensure_future(self._golden(q, chunks, outcome))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _golden(self, q: str, chunks: list[Chunk], outcome: ProfileOutcome) -> None:
        config = self.policy.golden_for(len(chunks))
        try:
            result, golden = await self._feedback_cell(q, chunks, config)
            c = self.collection
            corrected = await self.profiler.feedback(
                q, c.metadata, c.chunk_tokens, result.answer, result.intermediate,
                collection=c.name,
            )  # fmt: skip
            self.counters["golden_runs"] += 1
            self.counters["golden_errors"] += corrected is None
        except RagctlError as e:
            # Feedback is best effort: a failure here must not touch any user's request.
            self.counters["golden_errors"] += 1
            log.warning("golden feedback run failed: %s", e)
            return
        try:
            await self._label(q, chunks, outcome, config, golden)
        except Exception:  # noqa: BLE001 - labelling is best effort, off every request's path
            self.counters["feedback_errors"] += 1
            log.warning("outcome labelling failed", exc_info=True)

    async def _feedback_cell(
        self, q: str, chunks: list[Chunk], config: Config
    ) -> tuple[SynthesisResult, GridCell]:
        """Answer `q` with `config` on the engine (reserved like any plan), as a labelling
        cell: its answer, solo-ish delay and prompt tokens."""
        t = time.perf_counter()
        slot, engine = self._fixed_slot()
        kv = await engine.kv_state()
        with slot.ledger.reserve(self._need(q, chunks, kv.block_size, config)):
            planned = planned_work(self.synthesizer.sizer(q, chunks), config)
            result, stages = await self.run_synthesis(
                self.synthesizer.plan(config, q, chunks), planned=planned, engine=engine
            )
        cell = GridCell(
            answer=result.answer,
            quality=None,
            delay_s=time.perf_counter() - t,
            prompt_tokens=sum(s.prompt_tokens for s in stages),
        )
        return result, cell

    async def _label(
        self,
        q: str,
        chunks: list[Chunk],
        outcome: ProfileOutcome,
        golden_config: Config,
        golden: GridCell,
    ) -> None:
        """Outcome feedback with no reference answer: the feedback budget's candidates are
        answered too, and the cheapest whose answer agrees with the golden one labels the query.
        The label feeds best-fit's quality model and, with the query's features and the LLM's
        raw beliefs, the profiler's state (calibration and learned profiler)."""
        candidates = [c for c in self.policy.feedback_for(len(chunks)) if c != golden_config]
        if not candidates:
            return
        cells: dict[Config, GridCell] = {golden_config: golden}
        for config in candidates:
            try:
                _, cells[config] = await self._feedback_cell(q, chunks, config)
            except RagctlError as e:
                log.info("feedback candidate %s failed: %s", config.label, e)
                cells[config] = GridCell(None, None, 0.0, failed=True)
        query_id = hashlib.sha1(q.encode()).hexdigest()[:16]
        label = label_query(query_id, cells, mode="golden", golden=golden_config)
        if label is None:
            return
        self.quality.add_label(label.config, dict(label.outcomes))
        self.counters["feedback_labels"] += 1
        add = getattr(self.profiler, "add_label", None)
        if add is None:
            return
        signals = await self._signals(q)
        features = None
        if signals.embedding is not None:
            features = tuple(float(x) for x in query_features(signals.embedding, signals.scores, q))
        llm = getattr(self.profiler, "llm", None)
        if llm_beliefs(outcome) is None and llm is not None:
            c = self.collection
            outcome = await llm.profile(q, c.metadata, c.chunk_tokens, collection=c.name)
        record = LabelRecord(label, q, features, llm_beliefs(outcome), template=outcome.template)
        await add(self.collection.name, record)
