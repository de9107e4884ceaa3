"""The Controller over a small fake engine, retriever and profiler: the order of its steps,
fallback counting, KV reservations, the SLO hooks, and the blocking forms on the bridge. The
real-engine tests (tests/integration/test_adaptive.py, test_python_api.py) are the proof that it
works with vLLM; these pin the orchestration down."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import replace

import pytest

from ragctl.controller import Controller
from ragctl.engine.base import Engine
from ragctl.errors import EngineError, InvalidRequest
from ragctl.policy import AdaptivePolicy
from ragctl.profiler import ProfileOutcome
from ragctl.rules import default_space, evaluate, load_rules, merge_spaces, span_spaces
from ragctl.scheduler.cost import LABEL_SPACE_MIN
from ragctl.scheduler.slo import PRE_STAGE, Mitigation, SLOTracker
from ragctl.types import (
    Chunk,
    Config,
    ConfigSpace,
    Generation,
    GenerationRequest,
    KVState,
    Message,
    Profile,
)

RULES = load_rules(None)
NO_GOLDEN = AdaptivePolicy(golden_every=0)
GOLD = Config("stuff", 50)  # more chunks than are retrieved


class Words:
    """One token per word; a chat is its messages' words plus 4 per message."""

    def count(self, text: str) -> int:
        return len(text.split())

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [self.count(t) for t in texts]

    def count_chat(self, messages: Sequence[Message]) -> int:
        return sum(self.count(m.content) + 4 for m in messages)


class FakeEngine(Engine):
    """Answers every call with "Denver"; `fail_at`: the stage (0: the first generate call) that
    raises instead; `hold`: generate waits for it. Records the KV blocks reserved, the calls'
    tags and priorities and the event loop, stage by stage."""

    name = "fake"

    def __init__(self, total_blocks: int = 10_000, fail_at: int | None = None) -> None:
        self.tokenizer = Words()  # type: ignore[assignment]
        self.max_model_len = 4096
        self.total_blocks = total_blocks
        self.fail_at = fail_at
        self.stages = 0
        self.hold: asyncio.Event | None = None
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.ledger = None
        self.reserved_seen: list[int] = []
        self.tags: list[str] = []
        self.priorities: list[int] = []
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.closed = False

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.loops.append(asyncio.get_running_loop())
        self.tags.extend(r.tag for r in requests)
        self.priorities.extend(r.priority for r in requests)
        if self.ledger is not None:
            self.reserved_seen.append(self.ledger.reserved)
        self.started.set()
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        self.stages += 1
        if self.stages - 1 == self.fail_at:
            raise EngineError(f"the engine died in stage {self.fail_at}")
        return [Generation("Denver", 100, 1, "stop", (-0.1,)) for _ in requests]

    async def kv_state(self) -> KVState:
        return KVState(self.total_blocks, self.total_blocks, 16)

    async def aclose(self) -> None:
        self.closed = True


class FakeRetriever:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def search(self, question: str, k: int) -> list[Chunk]:
        self.calls.append(k)
        return [
            Chunk(f"c{i}", f"d{i}", f"Super Bowl 50 was played in Santa Clara {i}.", n_tokens=9)
            for i in range(k)
        ]


def a_profile(confidence: float | None) -> Profile:
    return Profile("high", True, 3, (60, 120), confidence=confidence)


class FakeProfiler:
    """Gives `outcome` for every question (a confident profile by default)."""

    templates = {"profile": "v1"}

    def __init__(self, outcome: ProfileOutcome | None = None) -> None:
        self.outcome = outcome or ProfileOutcome(a_profile(0.95), None, None, 0.0, "v1")
        self.closed = False

    async def profile(self, question, metadata, chunk_tokens, *, collection=None):
        return self.outcome

    async def feedback(self, *args, **kwargs):
        return None

    async def aclose(self) -> None:
        self.closed = True


def error_outcome() -> ProfileOutcome:
    return ProfileOutcome(None, "timeout: 30s", "timeout", 30.0, "v1")


def controller(engine=None, profiler=None, retriever=None, **kw) -> Controller:
    engine = engine or FakeEngine()
    kw.setdefault("policy", NO_GOLDEN)
    ctl = Controller(
        engine,
        retriever or FakeRetriever(),
        rules=RULES,
        profiler=profiler or FakeProfiler(),
        answer_max_tokens=16,
        **kw,
    )
    engine.ledger = ctl.admission.ledger
    return ctl


# -- ordering and policy -----------------------------------------------------------------------


async def test_retrieval_and_profiling_run_concurrently() -> None:
    """Each waits until the other has started: run one after the other, they never would."""
    retrieving, profiling = asyncio.Event(), asyncio.Event()

    class Retriever(FakeRetriever):
        async def asearch(self, question: str, k: int) -> list[Chunk]:
            retrieving.set()
            await profiling.wait()
            return self.search(question, k)

    class Profiler(FakeProfiler):
        async def profile(self, *args, **kwargs):
            profiling.set()
            await retrieving.wait()
            return self.outcome

    retriever = Retriever()
    ctl = controller(profiler=Profiler(), retriever=retriever)
    async with asyncio.timeout(5):
        answer = await ctl.aask("Where was Super Bowl 50 played?")
    # Retrieval asks for the most chunks any rule can use; the policy takes a prefix.
    assert retriever.calls == [RULES.max_num_chunks]
    d = answer.decision
    assert d.profile_used and d.profile_note == "" and d.reason == "fit"
    assert d.space == evaluate(RULES, a_profile(0.95))
    assert {"retrieve", "profile", "decide", "queue", "synthesis", "total"} <= set(answer.timings)
    assert ctl.counters["profiled"] == ctl.counters["profile_used"] == 1
    assert ctl.history["default"][-1] == d.space  # a confident space joins the history


async def test_profiler_error_falls_back_to_the_default_space() -> None:
    ctl = controller(profiler=FakeProfiler(error_outcome()))
    d = (await ctl.aask("Where was Super Bowl 50 played?")).decision
    assert not d.profile_used and d.profile_note == "profiler error: timeout: 30s"
    assert d.space == default_space(RULES) and d.profile is None
    assert ctl.counters["profiled"] == ctl.counters["profiler_errors"] == 1
    assert ctl.counters["profile_used"] == ctl.counters["low_confidence"] == 0
    assert not ctl.history["default"]  # a fallback space is not history


async def test_low_confidence_uses_the_collections_confident_history() -> None:
    profiler = FakeProfiler()
    ctl = controller(profiler=profiler)
    confident = (await ctl.aask("Where was Super Bowl 50 played?")).decision.space
    profiler.outcome = ProfileOutcome(a_profile(0.5), None, None, 0.0, "v1")
    d = (await ctl.aask("Who won it?")).decision
    assert not d.profile_used and d.profile_note == "low-confidence 0.50 < 0.90"
    assert d.space == merge_spaces([confident])
    assert d.profile == a_profile(0.5)  # recorded, not used
    assert (ctl.counters["profiled"], ctl.counters["low_confidence"]) == (2, 1)
    assert list(ctl.history["default"]) == [confident]


async def test_with_enough_labels_an_untrusted_query_gets_the_space_its_collection_needed() -> None:
    profiler = FakeProfiler()
    ctl = controller(profiler=profiler)
    await ctl.aask("Where was Super Bowl 50 played?")  # a confident space in the history
    profiler.outcome = ProfileOutcome(a_profile(0.5), None, None, 0.0, "v1")
    confident = ctl.history["default"][0]
    for i in range(LABEL_SPACE_MIN):
        label = Config("map_rerank", 1) if i % 2 else Config("stuff", 2)
        ctl.quality.add_label(label, {label: True, Config("stuff", 9): False})
        if i == LABEL_SPACE_MIN - 2:
            # Too few to bound the space, the labels still widen the fallback to what they
            # needed: never narrower than the history's space.
            d = (await ctl.aask("Who won it?")).decision
            assert d.space == span_spaces(
                [merge_spaces([confident]), ConfigSpace(("map_rerank", "stuff"), (1, 2))],
                "history+labels",
            )
            assert set(merge_spaces([confident]).configs()) <= set(d.space.configs())
    d = (await ctl.aask("Who won it?")).decision
    assert not d.profile_used and d.space.source == "labels"
    assert d.space == ConfigSpace(("map_rerank", "stuff"), (1, 2), source="labels")
    assert d.config in d.space.configs()  # best-fit chose inside it by its objective


async def test_nothing_fitting_the_space_is_a_counted_fallback() -> None:
    # Enough KV cache for a small configuration, not for any of the profile's space.
    ctl = controller(engine=FakeEngine(total_blocks=6))
    d = (await ctl.aask("Where was Super Bowl 50 played?")).decision
    assert d.reason == "fallback" and ctl.counters["fallback"] == 1
    assert d.config == Config("stuff", 1) and d.config not in d.space.configs()
    assert ctl.counters["queued"] == 0


# -- KV reservations ---------------------------------------------------------------------------


async def test_the_fixed_path_reserves_its_blocks_while_it_runs() -> None:
    engine = FakeEngine()
    ctl = controller(engine=engine)
    answer = await ctl.aask("Where was Super Bowl 50 played?", Config("stuff", 2))
    d = answer.decision
    assert d.reason == "fixed" and d.need_blocks > 0
    assert engine.reserved_seen == [d.need_blocks]
    assert ctl.admission.ledger.reserved == 0
    assert [c.id for c in answer.chunks] == ["c0", "c1"]


@pytest.mark.parametrize("config", [None, Config("map_reduce", 3, 40)])
async def test_an_engine_failure_mid_synthesis_releases_the_reservation(config) -> None:
    # The reducer (the second stage of map_reduce) fails, or the adaptive path's first stage.
    engine = FakeEngine(fail_at=1 if config else 0)
    ctl = controller(engine=engine)
    with pytest.raises(EngineError, match="died"):
        await ctl.aask("Where was Super Bowl 50 played?", config)
    assert engine.reserved_seen and all(r > 0 for r in engine.reserved_seen)
    assert ctl.admission.ledger.reserved == 0
    assert not ctl.slo.inflight  # the request's trace finished too
    if config is not None:
        assert engine.stages == 2 and len(engine.reserved_seen) == 2  # map ran, reduce failed


async def test_the_golden_run_reserves_too_and_reports_to_no_request() -> None:
    engine = FakeEngine()
    ctl = controller(engine=engine, policy=AdaptivePolicy(golden_every=1, golden_config=GOLD))
    await ctl.aask("Where was Super Bowl 50 played?")
    assert len(ctl._background) == 1
    await asyncio.gather(*ctl._background)
    assert ctl.policy.golden_for(RULES.max_num_chunks) == Config("stuff", RULES.max_num_chunks)
    assert engine.reserved_seen[-1] > 0  # while the golden stuff call ran
    assert ctl.admission.ledger.reserved == 0
    assert (ctl.counters["golden_runs"], ctl.counters["golden_errors"]) == (1, 1)  # no feedback
    assert ctl.slo.counters["requests"] == 0 and not ctl.slo.inflight


# -- the SLO hooks -----------------------------------------------------------------------------


async def test_every_request_reports_its_stages_and_only_an_slo_gets_a_record() -> None:
    ctl = controller()
    plain = await ctl.aask("Where was Super Bowl 50 played?", Config("stuff", 1))
    assert plain.decision.slo is None
    # The trace entered the stages: pre-synthesis and the answer stage are timed.
    assert ctl.slo.stats.mean(PRE_STAGE, "*") is not None
    assert ctl.slo.stats.mean("answer", "stuff:1") is not None
    timed = await ctl.aask("Where was Super Bowl 50 played?", Config("stuff", 1), slo_ms=60_000)
    rec = timed.decision.slo
    assert rec is not None and rec.met and rec.slo_ms == 60_000 and rec.plan_action == "none"
    assert ctl.slo.counters["requests"] == 1 and not ctl.slo.inflight


async def test_a_flagged_request_gets_a_better_priority_and_a_hopeless_one_a_worse() -> None:
    # A deadline already missed is flagged when its calls are about to go: Patchwork boosts
    # it; triage (on in `adaptive`) sends it behind the requests that can still make it.
    for mitigation, boosted, demoted, priority in (("patchwork", 1, 0, -1), ("adaptive", 0, 1, 1)):
        ctl = controller(slo=SLOTracker(Mitigation.parse(mitigation)))
        question = "Where was Super Bowl 50 played?"
        answer = await ctl.aask(question, Config("stuff", 1), slo_ms=1e-6)
        rec = answer.decision.slo
        assert rec.flagged and (rec.boosted_calls, rec.demoted_calls) == (boosted, demoted)
        assert ctl.engine.priorities == [priority], mitigation


async def test_bad_arguments_are_clear_errors() -> None:
    ctl = controller()
    for kwargs, match in [({"max_chunks": 0}, "max_chunks"), ({"slo_ms": 0}, "slo_ms")]:
        with pytest.raises(InvalidRequest, match=match):
            await ctl.aask("q?", **kwargs)
    with pytest.raises(InvalidRequest, match="empty"):
        await ctl.aask("   ")
    assert not ctl.slo.inflight


# -- the blocking forms and the bridge ---------------------------------------------------------


async def test_a_blocking_call_on_the_engines_loop_is_refused() -> None:
    ctl = controller()
    with pytest.raises(InvalidRequest, match="aask"):
        ctl.ask("Where was Super Bowl 50 played?")
    with pytest.raises(InvalidRequest, match="aask"):
        ctl.close()
    await ctl.aclose()
    assert ctl.engine.closed and ctl.profiler.closed


def test_blocking_use_runs_on_a_private_loop_and_other_loops_hand_over() -> None:
    engine = FakeEngine()
    ctl = controller(engine=engine)
    first = ctl.ask("Where was Super Bowl 50 played?", Config("stuff", 1))
    home = ctl.bridge.loop
    assert first.text == "Denver" and home is not None and engine.loops == [home]

    async def from_another_loop() -> int:
        one = await ctl.aask("Who won?", Config("stuff", 1))
        many = await ctl.abatch(["a?", "b?"], Config("stuff", 1))
        return len([one, *many])

    assert asyncio.run(from_another_loop()) == 3
    assert len(ctl.batch(["a?", "b?"], Config("stuff", 1))) == 2
    assert set(engine.loops) == {home}  # every engine call ran on the controller's loop
    ctl.close()
    assert engine.closed and home.is_closed()  # close stopped the loop thread
    with pytest.raises(InvalidRequest, match="not running"):
        ctl.ask("Who won?", Config("stuff", 1))


def test_cancelling_the_caller_cancels_the_engine_call() -> None:
    engine = FakeEngine()
    ctl = controller(engine=engine)
    ctl.ask("warm up?", Config("stuff", 1))  # starts the private loop
    engine.started.clear()
    engine.hold = asyncio.Event()  # never set: the call hangs until cancelled

    async def impatient() -> None:
        task = asyncio.ensure_future(ctl.aask("Who won?", Config("stuff", 1)))
        await asyncio.to_thread(engine.started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(impatient())
    assert engine.cancelled.wait(5)
    ctl.close()
    assert ctl.admission.ledger.reserved == 0


async def test_the_golden_run_labels_the_query_from_its_feedback_budget(tmp_path) -> None:
    """No reference answer: the candidates that agree with the golden answer (all do, the fake
    engine always says Denver) label the query with the cheapest; the label reaches best-fit's
    quality model and, through the profiler, its state on disk."""
    from ragctl.profiler.auto import AutoProfiler
    from ragctl.profiler.store import ProfilerState

    class Engine(FakeEngine):
        async def generate(self, requests):
            # Prompt size grows with the chunks, and time with the prompt (labels pick the
            # cheapest by solo delay), so cheaper configurations cost less.
            gens = await super().generate(requests)
            tokens = [self.tokenizer.count_chat(r.messages) for r in requests]
            await asyncio.sleep(2e-4 * sum(tokens))
            return [replace(g, prompt_tokens=t) for g, t in zip(gens, tokens, strict=True)]

    engine = Engine()
    budget = (Config("stuff", 3), Config("map_rerank", 1), Config("stuff", 1))
    gold = Config("stuff", 6)
    policy = AdaptivePolicy(golden_every=1, golden_config=gold, feedback_configs=budget)
    auto = AutoProfiler(FakeProfiler(), mode="llm", state_root=tmp_path, model="m", refit_every=1)
    ctl = controller(engine=engine, profiler=auto, policy=policy)
    await ctl.aask("Where was Super Bowl 50 played?")
    await asyncio.gather(*ctl._background)
    assert ctl.counters["feedback_labels"] == 1 and ctl.counters["feedback_errors"] == 0
    assert ctl.admission.ledger.reserved == 0
    [label] = list(ctl.quality.labels)
    assert label in (Config("stuff", 1), Config("map_rerank", 1))  # the cheapest prompts
    [record] = ProfilerState.at(tmp_path, "m", ctl.collection.name).records()
    assert record.label.config == label and record.label.source == "golden"
    assert record.question == "Where was Super Bowl 50 played?"
    assert record.features is None  # this retriever gives no query embedding
    # refit_every=1: the calibration was refitted and the state reloaded with the label.
    assert auto.load(ctl.collection.name).labels == (record.label,)
    # Every configuration tried is kept with whether it agreed: the quality model reads them.
    # (not the golden one: it agrees with itself by definition).
    assert {c for c, _ in record.label.outcomes} == set(budget)
    assert dict(record.label.outcomes)[label] and gold not in ctl.quality.measured()
    assert ctl.quality.measured()[label] == (1, 1)
