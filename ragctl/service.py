"""Opening ragctl from settings: one engine, one profiler, one admission queue, one SLO tracker
and one rule set, shared by a controller per collection (the server's shape), or a single
controller that owns its engine (the CLI's shape, and the Python API's: `ragctl.open` for
blocking code, `ragctl.aopen` for async code).

Order matters for error messages: the dataset and rules are checked before the engine starts
(cheap, clear errors), and the index is opened last."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ragctl.bridge import Bridge
from ragctl.controller import Controller, LedgerFactory, admission_for
from ragctl.engine import Engine, open_engine
from ragctl.errors import InvalidSetting
from ragctl.policy import AdaptivePolicy
from ragctl.profiler import Profiler
from ragctl.retrieval.collection import check_dataset, dataset_names
from ragctl.rules import RuleSet, load_rules
from ragctl.scheduler import AdmissionQueue, SLOTracker
from ragctl.scheduler.cost import QualityModel
from ragctl.settings import Settings, model_key
from ragctl.types import CollectionInfo

Progress = Callable[[str, int, int], None]


def controller_for(
    settings: Settings,
    collection: str,
    engine: Engine,
    *,
    rules: RuleSet,
    profiler: Profiler,
    admission: AdmissionQueue | None = None,
    slo: SLOTracker | None = None,
    owns_engine: bool,
    progress: Progress | None = None,
    bridge: Bridge | None = None,
) -> Controller:
    """A controller of `collection` on `engine` (opens or builds its index: blocking work).
    Its retriever batches query embedding and search across concurrent requests as `settings`
    say (batch 1 / wait 0: each request alone)."""
    from ragctl.retrieval.batching import BatchingRetriever, apply_retrieval_threads
    from ragctl.retrieval.index import open_retriever

    card = check_dataset(settings.data_dir, collection)
    profiler_state = load_profiler_state(profiler, card.name)
    # Once per collection opened: setting the same value again changes nothing.
    apply_retrieval_threads(settings.retrieval_threads)
    retriever = BatchingRetriever.from_settings(
        open_retriever(settings, collection, engine.tokenizer, progress=progress), settings
    )
    controller = Controller(
        engine,
        retriever,
        answer_max_tokens=settings.answer_max_tokens or card.answer_max_tokens,
        temperature=settings.temperature,
        collection=CollectionInfo.of(retriever),
        rules=rules,
        profiler=profiler,
        policy=AdaptivePolicy.from_settings(settings),
        admission=admission,
        slo=slo,
        owns_engine=owns_engine,
        bridge=bridge,
    )
    # Best-fit's quality model starts from the labels the profiler's state holds.
    controller.quality = quality_model(profiler_state)
    return controller


def open(collection: str, settings: Settings | None = None, **overrides: Any) -> Controller:
    """A controller of `collection` for blocking use, on the settings' defaults (plus
    `overrides`, e.g. `model=...`, `engine_url=...`). Its engine runs on a private event
    loop thread; `ask`, `batch`, `aask` and `abatch` all work. Close it with `close()` or
    a `with` block."""
    settings = (settings or Settings()).with_overrides(**overrides)
    bridge = Bridge.private()
    try:
        return bridge.run(open_controller(settings, collection, bridge=bridge))
    except BaseException:
        bridge.close()
        raise


async def aopen(collection: str, settings: Settings | None = None, **overrides: Any) -> Controller:
    """`open` for async code: the engine runs on the calling event loop."""
    settings = (settings or Settings()).with_overrides(**overrides)
    return await open_controller(settings, collection)


async def open_controller(
    settings: Settings,
    collection: str,
    *,
    progress: Progress | None = None,
    bridge: Bridge | None = None,
) -> Controller:
    """A controller of `collection` that owns its engine and profiler (closed by `aclose`);
    `bridge`: the event loop it runs on, when it is a private one."""
    check_dataset(settings.data_dir, collection)
    rules = load_rules(settings.rules_file)
    engine = await open_engine(settings)
    profiler = None
    try:
        profiler = await open_profiler(settings, engine)
        return controller_for(
            settings, collection, engine, rules=rules, profiler=profiler,
            owns_engine=True, progress=progress, bridge=bridge,
        )  # fmt: skip
    except BaseException:
        if profiler is not None:
            await profiler.aclose()
        await engine.aclose()
        raise


class Service:
    """Controllers of several collections on one engine. A collection's index is opened on
    first use (built if missing, which can take minutes), in a worker thread, once."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        profiler: Profiler,
        rules: RuleSet,
        *,
        ledger_for: LedgerFactory | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.profiler = profiler
        self.rules = rules
        self.policy = AdaptivePolicy.from_settings(settings)
        # One ledger per engine of the pool (one slot per member), shared by all collections:
        # local, or shared with other replicas (`ledger_for(engine key)`, ragctl.distributed).
        self.admission: AdmissionQueue = admission_for(
            engine, self.policy.queue_size, self.policy.placement, self.policy.synthesis_engines,
            ledger_for=ledger_for,
        )  # fmt: skip
        # One per engine: its flags, pauses, load meter and delay model span collections.
        self.slo = self.policy.tracker()
        self.controllers: dict[str, Controller] = {}
        self._opening: dict[str, asyncio.Task[Controller]] = {}

    @classmethod
    async def open(
        cls,
        settings: Settings,
        collections: tuple[str, ...] = (),
        *,
        ledger_for: LedgerFactory | None = None,
    ) -> Service:
        """Check `collections` and the rules, start the engine and profiler, then open the
        named collections' indexes (others open on first request). `ledger_for`: the KV
        ledger of an engine, by its key (default: a local `KVLedger`)."""
        for name in collections:
            check_dataset(settings.data_dir, name)
        rules = load_rules(settings.rules_file)
        engine = await open_engine(settings)
        try:
            profiler = await open_profiler(settings, engine)
        except BaseException:
            await engine.aclose()
            raise
        try:
            service = cls(settings, engine, profiler, rules, ledger_for=ledger_for)
        except BaseException:
            await profiler.aclose()
            await engine.aclose()
            raise
        try:
            for name in collections:
                await service.controller(name)
        except BaseException:
            await service.aclose()
            raise
        return service

    @staticmethod
    def collection_names() -> list[str]:
        """Every collection with a dataset card (whether its data is present is checked when
        it is opened)."""
        return dataset_names()

    async def controller(self, collection: str) -> Controller:
        """The controller of `collection`: `UnknownDataset` (404) for a name without a card,
        `DataNotFound` when its data is missing."""
        if collection in self.controllers:
            return self.controllers[collection]
        check_dataset(self.settings.data_dir, collection)
        task = self._opening.get(collection)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._build, collection))
            self._opening[collection] = task
        try:
            # Shielded: one impatient request must not cancel the build others wait for.
            controller = await asyncio.shield(task)
        finally:
            if task.done():
                self._opening.pop(collection, None)
        self.controllers[collection] = controller
        return controller

    def _build(self, collection: str) -> Controller:
        return controller_for(
            self.settings, collection, self.engine, rules=self.rules, profiler=self.profiler,
            admission=self.admission, slo=self.slo, owns_engine=False,
        )  # fmt: skip

    def engines(self) -> list[tuple[str, bool, int]]:
        """Each engine of the pool: its name (URL, or `in-process`), whether it is healthy and
        the KV blocks admitted plans reserve on it."""
        from ragctl.engine.pool import label_of

        slots = self.admission.slots
        if len(slots) == 1:
            return [(label_of(self.engine), slots[0].healthy(), slots[0].ledger.reserved)]
        return [(s.name, s.healthy(), s.ledger.reserved) for s in slots]

    def counters(self) -> dict[str, int]:
        """The controllers' running totals, summed."""
        total: dict[str, int] = {}
        for c in self.controllers.values():
            for k, v in c.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    async def aclose(self) -> None:
        for task in self._opening.values():
            task.cancel()
        for c in self.controllers.values():
            await c.aclose()
        await self.profiler.aclose()
        await self.engine.aclose()
        for slot in self.admission.slots:
            close_ledger = getattr(slot.ledger, "aclose", None)  # a shared ledger's lease
            if close_ledger is not None:
                await close_ledger()

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def open_profiler(settings: Settings, serving_engine: Engine) -> Any:
    """The query profiler `settings.profiler` names, on `settings.profiler_url` (an
    OpenAI-compatible endpoint, opened here and closed by the profiler's `aclose`) when set,
    else on the serving engine (left open). `json`: the structured-output `Profiler` alone;
    `llm`, `learned`, `auto`: the per-field `FieldProfiler` inside an `AutoProfiler`, which
    adds each collection's calibration and learned profiler from `<cache_dir>/profiler/`."""
    from ragctl.profiler.auto import AutoProfiler
    from ragctl.profiler.fields import FieldProfiler

    common = {"timeout_s": settings.profiler_timeout_s, "max_examples": settings.golden_examples}
    engine, owns = serving_engine, False
    if settings.profiler_engine is not None:
        from ragctl.engine.pool import members_of

        members = members_of(serving_engine)
        if settings.profiler_engine >= len(members):
            raise InvalidSetting(
                f"profiler_engine is {settings.profiler_engine}; the pool has {len(members)} "
                "engines (0-based)"
            )
        engine = members[settings.profiler_engine]
    if settings.profiler_url:
        from ragctl.engine.remote import RemoteEngine

        engine = await RemoteEngine.connect(
            settings.profiler_url,
            model=settings.profiler_model,
            api_key=settings.profiler_api_key,
            timeout_s=settings.profiler_timeout_s,
            cache_dir=settings.cache_dir,
        )
        owns = True
    if settings.profiler == "json":
        return Profiler(engine, owns_engine=owns, **common)
    return AutoProfiler(
        FieldProfiler(engine, owns_engine=owns, **common),
        mode=settings.profiler,
        state_root=settings.cache_dir,
        model=settings.profiler_model_key() or model_key(engine.name),
        learned_min_confidence=settings.learned_min_confidence,
        refit_every=settings.feedback_refit_every,
        trust_threshold=settings.confidence_threshold,
    )


def quality_model(profiler_state: Any) -> QualityModel:
    """Best-fit's quality model of a collection, from the outcome labels its profiler state
    holds (none: the prior alone)."""
    model = QualityModel()
    for label in getattr(profiler_state, "labels", ()):
        model.add_label(label.config, dict(label.outcomes))
    return model


def load_profiler_state(profiler: Any, collection: str) -> Any:
    """Read `collection`'s profiler state now (a corrupt calibration or learned-profiler file
    is a `ProfilerStateError` here, at start-up, never a failed request); None for a profiler
    that keeps none."""
    load = getattr(profiler, "load", None)
    return load(collection) if callable(load) else None
