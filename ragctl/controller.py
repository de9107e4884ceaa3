"""The one place that awaits: retrieve ‖ profile -> rules -> best-fit -> synthesis -> Answer.

Per query (`aask` without a configuration): retrieval (at the largest chunk count any rule can ask
for) and the LLM profiler run concurrently; the rules turn a trusted profile into a pruned space
(else the space of the collection's recent confident queries, else the rules' default); the
best-fit scheduler picks the largest configuration of that space that fits the engine's free KV
cache minus what in-flight plans reserved, waiting in the admission queue when nothing fits; the
synthesis method runs on the shared engine while the plan's blocks stay reserved. Every answer
carries the Decision that explains it.

`aask(question, config)` runs a configuration the caller chose (the fixed-configuration
baseline); it still reserves its blocks, so adaptive queries sharing the engine see it, but never
waits. Many `aask` calls may run at once on one Controller: they share the engine, which batches
them. `ask`/`batch` are the blocking forms (see `Controller.open`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, TypeVar

from ragctl.engine.base import Engine, gather_or_cancel
from ragctl.errors import InvalidRequest, PromptTooLong, RagctlError
from ragctl.profiler import ProfileOutcome, Profiler
from ragctl.rules import RuleSet, default_space, evaluate, load_rules, merge_spaces
from ragctl.runner import LoopThread
from ragctl.scheduler import AdmissionQueue, KVLedger, NeedTable, choose
from ragctl.scheduler.slo import Mitigation, SLOTracker, Tracked, choose_within_slo
from ragctl.synthesis.methods import CallSizer, Step, Synthesizer
from ragctl.types import (
    Answer,
    Chunk,
    Config,
    ConfigSpace,
    Decision,
    KVState,
    Message,
    Plan,
    StageRecord,
    SynthesisResult,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

GOLDEN_CONFIG = Config("map_reduce", 30, 300)
"""The most expensive configuration: what a query "should" have looked like (paper section 4.1)."""


class Retriever(Protocol):
    def search(self, question: str, k: int) -> list[Chunk]: ...


@dataclass(frozen=True)
class CollectionInfo:
    """What the profiler is told about the collection a query runs against."""

    name: str
    metadata: str
    """The dataset card's one-line description."""
    chunk_tokens: int
    """Chunk size in tokens of the serving model."""

    @classmethod
    def of(cls, retriever: Any) -> CollectionInfo:
        """From a `retrieval.index.Retriever` (its dataset card)."""
        card = retriever.card
        return cls(card.name, card.metadata, card.chunking.size)


@dataclass(frozen=True)
class AdaptivePolicy:
    """The adaptive path's knobs (see `Settings` for what each means)."""

    confidence_threshold: float = 0.9
    history_size: int = 10
    golden_every: int = 30
    golden_config: Config = GOLDEN_CONFIG
    kv_buffer_blocks: int = 1
    queue_size: int = 256
    slo_ms: float | None = None
    """SLO of requests that carry none (None: no SLO)."""
    collection_slo_ms: Mapping[str, float] = field(default_factory=dict)
    """Per-collection SLO defaults, over `slo_ms`."""
    mitigation: Mitigation = field(default_factory=Mitigation)

    @classmethod
    def from_settings(cls, settings: Any) -> AdaptivePolicy:
        return cls(
            confidence_threshold=settings.confidence_threshold,
            history_size=settings.history_size,
            golden_every=settings.golden_every,
            kv_buffer_blocks=settings.kv_buffer_blocks,
            queue_size=settings.queue_size,
            slo_ms=settings.slo_ms,
            collection_slo_ms=dict(settings.collection_slo_ms),
            mitigation=Mitigation.parse(settings.slo_mitigation),
        )

    def slo_for(self, collection: str) -> float | None:
        return self.collection_slo_ms.get(collection, self.slo_ms)


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
) -> SpaceChoice:
    """A confident profile goes through the rules; otherwise the collection's recent confident
    spaces (merged), else the rules' conservative default."""
    profile = outcome.profile
    if profile is not None and profile.confidence is not None and profile.confidence >= threshold:
        return SpaceChoice(evaluate(rules, profile), True, "", profile.joint_reasoning)
    if profile is None:
        note = f"profiler error: {outcome.error or 'no profile'}"
    elif profile.confidence is None:
        note = "low-confidence: no log-probs"
    else:
        note = f"low-confidence {profile.confidence:.2f} < {threshold:.2f}"
    space = merge_spaces(list(history)) if history else default_space(rules)
    # Joint reasoning unless the space only answers from single chunks.
    joint = any(m != "map_rerank" for m in space.methods)
    return SpaceChoice(space, False, note, joint)


def best_fit(
    choice: SpaceChoice,
    sizer: CallSizer,
    chunks: int,
    buffer_blocks: int,
    *,
    predict: Callable[[Config], float | None] | None = None,
    budget_s: Callable[[], float] | None = None,
) -> Callable[[KVState, int], Plan]:
    """The admission queue's `decide`: best-fit over the query's space, sized by `sizer`.
    With `predict` and `budget_s` (the SLO loop's configuration mechanism), best-fit keeps
    to the configurations predicted to finish within the time left when it decides."""

    def decide(kv: KVState, reserved: int) -> Plan:
        need = NeedTable(sizer, kv.block_size, buffer_blocks)
        kwargs = {"joint_reasoning": choice.joint_reasoning, "max_chunks": chunks}
        if predict is None or budget_s is None:
            return choose(choice.space, kv, reserved, need, **kwargs)
        return choose_within_slo(
            choice.space, kv, reserved, need, predict=predict, budget_s=budget_s(), **kwargs
        )

    return decide


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
    )


class Controller:
    """Answers questions over one collection on a shared engine.

    One line for a collection with the settings' defaults (engine, rules, profiler)::

        ctl = Controller.open("squad")            # blocking use: ctl.ask(q), ctl.close()
        ctl = await Controller.aopen("squad")     # in async code: await ctl.aask(q)

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
    ) -> None:
        """`settings` (a `ragctl.Settings`) fills what is not given explicitly: answer budget,
        temperature, adaptive policy, rules file. `owns_engine`: `aclose` stops the engine and
        profiler (False when several controllers share them)."""
        if answer_max_tokens is None:
            answer_max_tokens = (settings and settings.answer_max_tokens) or 64
        if temperature is None:
            temperature = settings.temperature if settings is not None else 0.0
        self.engine = engine
        self.retriever = retriever
        self.synthesizer = Synthesizer(
            engine.tokenizer, engine.max_model_len, answer_max_tokens, temperature
        )
        self.collection = collection or _collection_of(retriever)
        if rules is None:
            rules = load_rules(settings.rules_file if settings is not None else None)
        self.rules = rules
        self.profiler = profiler if profiler is not None else Profiler(engine)
        if policy is None:
            policy = AdaptivePolicy.from_settings(settings) if settings else AdaptivePolicy()
        self.policy = policy
        # One ledger and queue per engine: controllers of several collections on one engine
        # pass the same AdmissionQueue.
        # `is None`, not `or`: an empty AdmissionQueue has len 0 and is falsy.
        if admission is None:
            admission = AdmissionQueue(KVLedger(), engine.kv_state, maxsize=self.policy.queue_size)
        self.admission = admission
        # One tracker per engine, like the admission queue: flags and pauses span collections.
        self.slo = slo if slo is not None else SLOTracker(self.policy.mitigation)
        self.owns_engine = owns_engine
        self.history: dict[str, deque[ConfigSpace]] = {}
        self.counters: Counter[str] = Counter()
        """profiled, profile_used, low_confidence, profiler_errors, fallback, queued, golden_runs,
        golden_errors: running totals for metrics and reports."""
        self._queries = 0
        self._background: set[asyncio.Task[None]] = set()
        self._runner: LoopThread | None = None
        self._closed = False

    # -- construction from settings -------------------------------------------------------------

    @classmethod
    def open(cls, collection: str, settings: Any | None = None, **overrides: Any) -> Controller:
        """A controller of `collection` for blocking use, on the settings' defaults (plus
        `overrides`, e.g. `model=...`, `engine_url=...`). Its engine runs on a private event
        loop thread; `ask`, `batch`, `aask` and `abatch` all work. Close it with `close()` or
        a `with` block."""
        runner = LoopThread()
        try:
            controller = runner.run(cls.aopen(collection, settings, **overrides))
        except BaseException:
            runner.stop()
            raise
        controller._runner = runner
        return controller

    @classmethod
    async def aopen(
        cls, collection: str, settings: Any | None = None, **overrides: Any
    ) -> Controller:
        """`open` for async code: the engine runs on the calling event loop."""
        from ragctl.service import open_controller
        from ragctl.settings import Settings

        settings = (settings or Settings()).with_overrides(**overrides)
        return await open_controller(settings, collection)

    # -- entry points ---------------------------------------------------------------------------

    def check_question(self, question: str, history: Sequence[Message] = ()) -> str:
        """The question, stripped; a clear error if it is empty or cannot fit the context."""
        q = question.strip() if isinstance(question, str) else ""
        if not q:
            raise InvalidRequest("the question is empty")
        need = self.synthesizer.question_overhead(with_history(q, history))
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
    ) -> Answer:
        """Answer `question`: adaptively, or with `config` when given.

        `history`: earlier turns of a conversation; the synthesis prompts see them, retrieval
        and the profiler see the question alone. `max_chunks`: a cap on the chunks the adaptive
        path may use. `slo_ms`: the request's latency SLO (default: the collection's, from the
        settings); the Decision's `slo` says what the SLO loop did."""
        if self._elsewhere():
            return await self._runner.arun(  # type: ignore[union-attr]
                self.aask(question, config, history=history, max_chunks=max_chunks, slo_ms=slo_ms)
            )
        start = time.perf_counter()
        q = self.check_question(question, history)
        if max_chunks is not None and max_chunks < 1:
            raise InvalidRequest(f"max_chunks must be at least 1, got {max_chunks}")
        if slo_ms is not None and not slo_ms > 0:
            raise InvalidRequest(f"slo_ms must be positive, got {slo_ms}")
        if slo_ms is None:
            slo_ms = self.policy.slo_for(self.collection.name)
        tracked = self.slo.start(slo_ms)
        ok = False
        try:
            await self.slo.gate(tracked)
            if config is not None:
                answer = await self._ask_fixed(q, config, start, history, tracked)
            else:
                answer = await self._ask_adaptive(q, start, history, max_chunks, tracked)
            ok = True
        finally:
            record = self.slo.finish(tracked, ok=ok)
        if record is None:
            return answer
        return replace(answer, decision=replace(answer.decision, slo=record))

    def ask(
        self,
        question: str,
        config: Config | None = None,
        *,
        history: Sequence[Message] = (),
        max_chunks: int | None = None,
        slo_ms: float | None = None,
    ) -> Answer:
        """`aask`, blocking (not from inside a running event loop: use `await aask` there)."""
        return self._blocking(
            self.aask(question, config, history=history, max_chunks=max_chunks, slo_ms=slo_ms)
        )

    async def abatch(self, questions: Sequence[str], config: Config | None = None) -> list[Answer]:
        """Several questions at once on the shared engine (it batches them); answers in
        question order. One failure fails the batch and cancels the rest."""
        if self._elsewhere():
            return await self._runner.arun(self.abatch(questions, config))  # type: ignore[union-attr]
        return await gather_or_cancel([self.aask(q, config) for q in questions])

    def batch(self, questions: Sequence[str], config: Config | None = None) -> list[Answer]:
        """`abatch`, blocking."""
        return self._blocking(self.abatch(questions, config))

    async def profile(self, question: str) -> tuple[ProfileOutcome, SpaceChoice]:
        """The profile of `question` and the space it would get (history is not updated)."""
        if self._elsewhere():
            return await self._runner.arun(self.profile(question))  # type: ignore[union-attr]
        q = self.check_question(question)
        outcome = await self._profile(q)
        return outcome, self._space_for(outcome, record=False)

    async def aclose(self) -> None:
        """Stop background feedback runs, then (when it owns them) the profiler and engine."""
        if self._elsewhere():
            await self._runner.arun(self.aclose())  # type: ignore[union-attr]
            self._runner.stop()  # type: ignore[union-attr]
            return
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.owns_engine:
            await self.profiler.aclose()
            await self.engine.aclose()

    def close(self) -> None:
        """`aclose`, blocking; also stops the private event loop of `open`."""
        runner = self._runner
        if runner is None:
            self._blocking(self.aclose())
            runner = self._runner
        else:
            runner.run(self.aclose())
        if runner is not None:
            runner.stop()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Controller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _elsewhere(self) -> bool:
        """Whether the engine lives on this controller's private loop and the caller does not:
        then a call must be handed over to that loop."""
        return self._runner is not None and not self._runner.is_current()

    def _blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._runner is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                # Explicitly built controller used from blocking code: give it its own loop.
                self._runner = LoopThread()
            else:
                coro.close()
                raise InvalidRequest(
                    "this blocking call was made inside a running event loop; use the async "
                    "form (await controller.aask(...) / abatch(...))"
                )
        return self._runner.run(coro)

    # -- the two paths --------------------------------------------------------------------------

    async def _ask_fixed(
        self,
        q: str,
        config: Config,
        start: float,
        history: Sequence[Message],
        tracked: Tracked | None = None,
    ) -> Answer:
        timings: dict[str, float] = {}
        chunks = await self._retrieve(q, config.num_chunks, timings)
        if tracked is not None:
            self.slo.enter(tracked, "queue")
            self.slo.planned(tracked, config)
        kv = await self.engine.kv_state()
        sq = with_history(q, history)
        need = self._need_fn(self.synthesizer.sizer(sq, chunks), kv.block_size)(config)
        decision = Decision(
            config=config,
            reason="fixed",
            kv=kv,
            templates=self.synthesizer.template_versions,
            need_blocks=need,
        )
        # Reserved for the accounting of adaptive queries on the same engine; never waits.
        with self.admission.ledger.reserve(need):
            return await self._synthesize(q, sq, chunks, decision, timings, start, tracked)

    async def _ask_adaptive(
        self,
        q: str,
        start: float,
        history: Sequence[Message],
        max_chunks: int | None,
        tracked: Tracked | None = None,
    ) -> Answer:
        timings: dict[str, float] = {}
        k = self.rules.max_num_chunks
        if max_chunks is not None:
            k = min(k, max_chunks)
        retrieval = asyncio.ensure_future(self._retrieve(q, k, timings))
        try:
            outcome = await self._profile(q, timings)
            chunks = await retrieval
        finally:
            if not retrieval.done():
                retrieval.cancel()
        t = time.perf_counter()
        choice = self._space_for(outcome, record=True)
        sq = with_history(q, history)
        slo_budget = None
        if tracked is not None:
            self.slo.enter(tracked, "queue")
            if tracked.slo_s is not None and self.slo.mitigation.config:
                slo_budget = partial(self.slo.budget_s, tracked)
        decide = best_fit(
            choice,
            self.synthesizer.sizer(sq, chunks),
            len(chunks),
            self.policy.kv_buffer_blocks,
            predict=self.slo.stats.predict_synthesis if slo_budget else None,
            budget_s=slo_budget,  # type: ignore[arg-type]
        )
        timings["decide"] = time.perf_counter() - t
        admitted = await self.admission.admit(decide)
        timings["queue"] = admitted.queued_s
        plan = admitted.plan
        if tracked is not None:
            assert plan.config is not None
            self.slo.planned(tracked, plan.config, plan.slo_action or "none")
        self.counters["fallback"] += plan.reason == "fallback"
        self.counters["queued"] += admitted.queued
        templates = {**self.synthesizer.template_versions, **self._profiler_templates()}
        decision = adaptive_decision(plan, admitted.kv, choice, outcome, templates, admitted.queued)
        with admitted.reservation:
            answer = await self._synthesize(q, sq, chunks, decision, timings, start, tracked)
        self._maybe_golden(q, chunks)
        return answer

    # -- steps ----------------------------------------------------------------------------------

    async def _retrieve(self, q: str, k: int, timings: dict[str, float]) -> list[Chunk]:
        t = time.perf_counter()
        asearch = getattr(self.retriever, "asearch", None)
        if asearch is not None:
            # Batched with concurrent requests' embedding and search (`BatchingRetriever`).
            chunks = await asearch(q, k)
        else:
            # Embedding and search are CPU work: keep the event loop free for other requests.
            chunks = await asyncio.to_thread(self.retriever.search, q, k)
        timings["retrieve"] = time.perf_counter() - t
        return chunks

    async def _profile(self, q: str, timings: dict[str, float] | None = None) -> ProfileOutcome:
        c = self.collection
        outcome = await self.profiler.profile(q, c.metadata, c.chunk_tokens, collection=c.name)
        if timings is not None:
            timings["profile"] = outcome.seconds
        return outcome

    def _space_for(self, outcome: ProfileOutcome, *, record: bool) -> SpaceChoice:
        history = self.history.setdefault(
            self.collection.name, deque(maxlen=self.policy.history_size)
        )
        choice = resolve_space(outcome, self.rules, history, self.policy.confidence_threshold)
        if record:
            self.counters["profiled"] += 1
            if choice.profile_used:
                self.counters["profile_used"] += 1
                history.append(choice.space)
            elif outcome.profile is None:
                self.counters["profiler_errors"] += 1
            else:
                self.counters["low_confidence"] += 1
        return choice

    def _need_fn(self, sizer: CallSizer, block_size: int) -> NeedTable:
        return NeedTable(sizer, block_size, self.policy.kv_buffer_blocks)

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
        tracked: Tracked | None = None,
    ) -> Answer:
        t = time.perf_counter()
        step = self.synthesizer.plan(decision.config, synthesis_question, chunks)
        result, stages = await self.run_synthesis(step, tracked)
        timings["synthesis"] = time.perf_counter() - t
        for s in stages:
            timings[f"synthesis.{s.name}"] = s.seconds
        timings["total"] = time.perf_counter() - start
        by_id = {c.id: c for c in chunks}
        return Answer(
            question=q,
            text=result.answer,
            decision=decision,
            chunks=tuple(by_id[i] for i in result.used_chunk_ids),
            stages=stages,
            timings=timings,
            synthesis=result,
        )

    async def run_synthesis(
        self, step: Step | SynthesisResult, tracked: Tracked | None = None
    ) -> tuple[SynthesisResult, tuple[StageRecord, ...]]:
        """Run a method's steps on the engine, one stage after another. With `tracked`, the
        SLO loop times each stage and decides, just before it goes, each stage's priority."""
        stages: list[StageRecord] = []
        while isinstance(step, Step):
            t = time.perf_counter()
            requests = step.requests
            if tracked is not None:
                self.slo.enter(tracked, step.name)
                priority = self.slo.priority(tracked, len(requests))
                if priority:
                    requests = tuple(replace(r, priority=priority) for r in requests)
            gens = await self.engine.generate(requests)
            stages.append(
                StageRecord(
                    name=step.name,
                    calls=len(gens),
                    prompt_tokens=sum(g.prompt_tokens for g in gens),
                    output_tokens=sum(g.output_tokens for g in gens),
                    seconds=time.perf_counter() - t,
                )
            )
            step = step.finish(gens)
        return step, tuple(stages)

    # -- golden-configuration feedback ----------------------------------------------------------

    def _maybe_golden(self, q: str, chunks: list[Chunk]) -> None:
        """Every `golden_every` adaptive queries, rerun one with the golden configuration and
        ask the profiler what profile would have been right; in the background, so the user's
        answer is not delayed."""
        self._queries += 1
        every = self.policy.golden_every
        if not every or self._queries % every:
            return
        task = asyncio.ensure_future(self._golden(q, chunks))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _golden(self, q: str, chunks: list[Chunk]) -> None:
        config = self.policy.golden_config
        config = Config(
            config.method, min(config.num_chunks, len(chunks)), config.intermediate_length
        )
        try:
            kv = await self.engine.kv_state()
            need = self._need_fn(self.synthesizer.sizer(q, chunks), kv.block_size)(config)
            with self.admission.ledger.reserve(need):
                result, _ = await self.run_synthesis(self.synthesizer.plan(config, q, chunks))
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


HISTORY_TURNS = 6
"""Earlier messages of a conversation carried into the synthesis prompts (the latest ones)."""


def with_history(question: str, history: Sequence[Message]) -> str:
    """The question as the synthesis prompts see it: with the conversation's latest earlier
    turns in front, so a follow-up ("and who founded it?") can be answered."""
    turns = [m for m in history if m.content.strip()][-HISTORY_TURNS:]
    if not turns:
        return question
    lines = [f"{m.role.capitalize()}: {' '.join(m.content.split())}" for m in turns]
    return "(conversation so far)\n" + "\n".join(lines) + f"\n(current question) {question}"


def _collection_of(retriever: Any) -> CollectionInfo:
    if getattr(retriever, "card", None) is not None:
        return CollectionInfo.of(retriever)
    return CollectionInfo("default", "a document collection", 256)
