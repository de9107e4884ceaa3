"""The profiler the controller calls (`--profiler llm|learned|auto`): per collection, the learned
profiler when it is as good as the LLM on the outcome labels and sure of this query, else the LLM
field profiler, its probabilities calibrated against the same labels.

What it reads per (model, collection) is the `ProfilerState` folder `ragctl profiler train`
writes: `calibration.json` (the LLM's per-field calibration) and `learned.json` (the learned
profiler). Without them the documented conservative default applies: the LLM's raw probabilities,
the controller's trust threshold unchanged, no learned profiler. A corrupt file is a
`CalibrationError` when the collection is first loaded (`load`, which the service calls at
start-up for its collections), never a failed request.

The learned profiler needs what retrieval computes anyway (the query embedding, the retrieval
scores): the controller passes them as `RetrievalSignals` where `needs_retrieval(collection)`
says so (a learned profiler is trained there), and then retrieves before it profiles.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.profiler.calibration import FIELDS as FIELDS_ORDER
from ragctl.profiler.calibration import (
    Calibration,
    decision_confidence,
    field_probs,
    with_fields,
)
from ragctl.profiler.labels import OutcomeLabel
from ragctl.profiler.learned import FEATURES_VERSION, LearnedProfiler, query_features
from ragctl.profiler.profiler import ProfileOutcome
from ragctl.profiler.prompts import FIELDS
from ragctl.profiler.store import LabelRecord, ProfilerState, llm_fields

log = logging.getLogger(__name__)

Mode = Literal["llm", "learned", "auto"]

DEFAULT_LEARNED_MIN_CONFIDENCE = 0.8
"""`auto` asks the LLM when the learned profiler's confidence (its probability that the less
certain of the two binary decisions is right) is below this."""


DEFAULT_TRUST_THRESHOLD = 0.9
"""The confidence at which the controller trusts a profile (`RAGCTL_CONFIDENCE_THRESHOLD`):
`auto` does not ask the LLM for an answer that could not reach it."""

DECISIVE_FIELDS = ("joint", "complexity")
"""The fields the rules branch on, and a profile's confidence is read from."""

DEFAULT_REFIT_EVERY = 10
"""New online labels of a collection between two refits."""


@dataclass(frozen=True)
class RetrievalSignals:
    """What retrieval already computed for the query: the learned profiler's input."""

    embedding: np.ndarray | None
    scores: tuple[float, ...]


@dataclass
class CollectionProfilers:
    """One collection's calibrations and learned profiler, and which profiler `auto` uses."""

    calibration: Calibration
    """The LLM profiler's (identity: none fitted yet)."""
    learned: LearnedProfiler | None = None
    learned_calibration: Calibration | None = None
    use: str = "llm"
    """`llm` or `learned`: `choose_profiler` on the labels' held-out accuracies."""
    llm_fields: tuple[str, ...] = FIELDS_ORDER
    """The fields `auto` asks the LLM for beside a learned profiler (`store.llm_fields`)."""
    labels: tuple[OutcomeLabel, ...] = ()
    """The labelled queries' outcomes (best-fit's quality model reads them)."""


class AutoProfiler:
    """Wraps an LLM profiler (`FieldProfiler`, or the JSON `Profiler`) with per-collection
    calibration and a learned profiler. Same surface as the profiler it wraps."""


    def __init__(
        self,
        llm: Any,
        *,
        mode: Mode = "auto",
        state_root: Path | None = None,
        model: str = "",
        learned_min_confidence: float = DEFAULT_LEARNED_MIN_CONFIDENCE,
        refit_every: int = DEFAULT_REFIT_EVERY,
        trust_threshold: float = DEFAULT_TRUST_THRESHOLD,
    ) -> None:
        if not 0.0 <= learned_min_confidence <= 1.0:
            raise ValueError(
                f"learned_min_confidence must be in [0, 1], got {learned_min_confidence}"
            )
        self.llm = llm
        self.mode = mode
        self.state_root = state_root
        self.model = model
        self.learned_min_confidence = learned_min_confidence
        self.trust_threshold = trust_threshold
        # Read once: whether the wrapped profiler takes `fields` (not per query, on the hot path).
        self._asks_fields = _asks_fields(llm)
        if refit_every < 1:
            raise ValueError(f"refit_every must be >= 1, got {refit_every}")
        self.refit_every = refit_every
        self._collections: dict[str, CollectionProfilers] = {}
        self._new_labels: dict[str, int] = {}

    # The wrapped profiler's surface, for the controller and the service.
    @property
    def engine(self) -> Any:
        return self.llm.engine

    @property
    def templates(self) -> dict[str, str]:
        return {**self.llm.templates, "learned": f"v{FEATURES_VERSION}"}

    @property
    def examples(self) -> Any:
        return self.llm.examples

    @property
    def last_feedback(self) -> Any:
        return self.llm.last_feedback

    async def feedback(self, *args: Any, **kwargs: Any) -> Any:
        return await self.llm.feedback(*args, **kwargs)

    async def aclose(self) -> None:
        await self.llm.aclose()

    async def __aenter__(self) -> AutoProfiler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def needs_retrieval(self, collection: str) -> bool:
        """Whether `profile` would read retrieval signals for `collection` (a learned profiler
        is trained there and may be used): the controller then retrieves before it profiles;
        otherwise the two run side by side."""
        return self.mode != "llm" and self.load(collection).learned is not None

    # -- state ------------------------------------------------------------------------------------

    def _state(self, root: str | Path, collection: str) -> ProfilerState:
        return ProfilerState.at(root, self.model, collection, self.llm.templates.get(FIELDS))

    def load(self, collection: str) -> CollectionProfilers:
        """The collection's state (read once; `ProfilerStateError` on a corrupt file)."""
        if collection in self._collections:
            return self._collections[collection]
        loaded = CollectionProfilers(Calibration.identity("llm", self.model, collection))
        if self.state_root is not None:
            state = self._state(self.state_root, collection)
            status = state.status(setting=self.mode)
            learned = state.load_learned()
            loaded = CollectionProfilers(
                calibration=state.load_calibration("llm"),
                learned=learned,
                learned_calibration=(
                    state.load_calibration("learned") if learned is not None else None
                ),
                use=status.in_use,
                llm_fields=llm_fields(status.fields, learned_samples=status.learned_samples),
                labels=tuple(r.label for r in state.records()),
            )
        self._collections[collection] = loaded
        return loaded

    async def add_label(self, collection: str, record: LabelRecord) -> None:
        """Keep one online label (the golden run's): appended to the collection's state on disk,
        and every `refit_every` new labels the calibration and learned profiler are refitted
        from all of them and reloaded. File work runs in a thread, off the event loop."""
        if self.state_root is None:
            return
        state = self._state(self.state_root, collection)
        await asyncio.to_thread(state.append, [record])
        self._new_labels[collection] = self._new_labels.get(collection, 0) + 1
        if self._new_labels[collection] < self.refit_every:
            return
        self._new_labels[collection] = 0
        await asyncio.to_thread(state.refit)
        self._collections.pop(collection, None)
        self.load(collection)

    def fingerprint(self, collection: str) -> str:
        """What this profiler's outcomes for `collection` depend on beyond the prompt: its mode
        and the collection's fitted state (`ProfilerState.fingerprint`)."""
        if self.state_root is None:
            return self.mode
        return f"{self.mode}:{self._state(self.state_root, collection).fingerprint()}"

    def set_state(self, collection: str, state: CollectionProfilers) -> None:
        """Replace a collection's state (after training, without a restart)."""
        self._collections[collection] = state

    # -- the call ---------------------------------------------------------------------------------

    async def profile(
        self,
        question: str,
        metadata: str,
        chunk_tokens: int,
        *,
        collection: str | None = None,
        retrieval: RetrievalSignals | None = None,
    ) -> ProfileOutcome:
        """The learned profile when `mode` and the state allow and it is sure; else the LLM's,
        calibrated. Never raises for a failing learned profiler: it falls back to the LLM and
        says why in the outcome's `learned_error`."""
        state = self.load(collection or metadata)
        learned_note = ""
        if self.mode != "llm" and state.learned is not None and retrieval is not None:
            start = time.perf_counter()
            try:
                outcome = self.learned_outcome(state, question, retrieval, start)
            except Exception as e:  # noqa: BLE001 - a profiler must never fail the request
                log.warning("learned profiler failed; asking the LLM", exc_info=True)
                learned_note = f"learned error: {type(e).__name__}: {e}"
            else:
                conf = outcome.profile.confidence if outcome.profile else None
                sure = conf is not None and conf >= self.learned_min_confidence
                if self.mode == "learned":
                    return outcome
                # Ask the LLM only for the fields it answers better, and for each decisive
                # field the learned profiler is unsure of.
                ask = set(state.llm_fields) | unsure_fields(
                    outcome.beliefs, self.learned_min_confidence
                )
                if state.use == "learned" and sure and not ask:
                    return outcome
                if state.use == "learned" and not sure:
                    learned_note = f"learned unsure {conf:.2f}"
                reach = reachable_confidence(state.calibration, outcome.beliefs, ask)
                if ask and reach < self.trust_threshold:
                    # No LLM answer could make this profile trusted: the decision would be the
                    # fallback's either way, so the call would buy nothing.
                    return replace(
                        outcome,
                        llm_note=f"llm not asked: at most {reach:.2f} confidence reachable "
                        f"(< {self.trust_threshold:g})",
                    )
                if ask and ask != set(FIELDS_ORDER) and self._asks_fields:
                    return await self._mixed(
                        state, outcome, question, metadata, chunk_tokens, collection, ask,
                        learned_note,
                    )  # fmt: skip
        elif self.mode == "learned":
            learned_note = "learned: no trained model" if state.learned is None else (
                "learned: no retrieval signals"
            )
        llm = await self.llm.profile(question, metadata, chunk_tokens, collection=collection)
        return replace(_calibrated(llm, state.calibration), learned_note=learned_note)

    async def _mixed(
        self,
        state: CollectionProfilers,
        learned: ProfileOutcome,
        question: str,
        metadata: str,
        chunk_tokens: int,
        collection: str | None,
        ask: set[str],
        learned_note: str,
    ) -> ProfileOutcome:
        """The LLM asked for the `ask` fields only (one engine sequence each), each calibrated;
        every other field from the learned profile; the confidence that of the merged beliefs."""
        fields = [f for f in FIELDS_ORDER if f in ask]
        llm = await self.llm.profile(
            question, metadata, chunk_tokens, collection=collection, fields=fields
        )
        llm = replace(_calibrated(llm, state.calibration), learned_note=learned_note)
        if llm.beliefs is None or learned.beliefs is None:
            return llm  # the LLM call failed: its error, as for a whole LLM profile
        from_learned = tuple(f for f in FIELDS_ORDER if f in llm.uniform_fields)
        merged = with_fields(
            llm.beliefs, {f: field_probs(learned.beliefs, f) for f in from_learned}
        )
        return replace(
            llm,
            profile=merged.to_profile(decision_confidence(merged)),
            beliefs=merged,
            uniform_fields=(),
            learned_fields=from_learned,
            seconds=learned.seconds + llm.seconds,
        )

    def learned_outcome(
        self,
        state: CollectionProfilers,
        question: str,
        retrieval: RetrievalSignals,
        start: float | None = None,
    ) -> ProfileOutcome:
        """The learned profile; its confidence is calibrated on the learned profiler's held-out
        predictions when that calibration exists."""
        start = time.perf_counter() if start is None else start
        model = state.learned
        if model is None:
            raise ValueError("no learned profiler is trained for this collection")
        if retrieval.embedding is None:
            raise ValueError("retrieval gave no query embedding")
        raw = model.predict(query_features(retrieval.embedding, retrieval.scores, question))
        cal = state.learned_calibration
        beliefs = cal.apply(raw) if cal is not None else raw
        confidence = cal.confidence(raw) if cal is not None else model.confidence(raw)
        return ProfileOutcome(
            profile=beliefs.to_profile(confidence),
            error=None,
            error_kind=None,
            seconds=time.perf_counter() - start,
            template=f"learned-v{FEATURES_VERSION}",
            beliefs=beliefs,
            raw_beliefs=raw,
            profiler="learned",
        )


def unsure_fields(beliefs: FieldBeliefs | None, min_confidence: float) -> set[str]:
    """The decisive fields whose belief, max(p, 1 - p), is below `min_confidence` (both when
    there are no beliefs): the ones worth another opinion."""
    if beliefs is None:
        return set(DECISIVE_FIELDS)
    probs = {"joint": beliefs.joint, "complexity": beliefs.complexity_high}
    return {f for f in DECISIVE_FIELDS if max(probs[f], 1.0 - probs[f]) < min_confidence}


def reachable_confidence(
    calibration: Calibration, learned: FieldBeliefs | None, ask: set[str]
) -> float:
    """The highest decision confidence (`decision_confidence`) a profile could have if the LLM
    answered the `ask` fields and the learned profile the rest: per decisive field, the most
    confident value the LLM's calibration can output when it is asked, the learned belief's
    confidence when it is not."""
    reach = 1.0
    for name in DECISIVE_FIELDS:
        if name in ask:
            fc = calibration.fields.get(name)
            best = fc.max_confidence() if fc is not None else 1.0
        elif learned is None:
            best = 1.0
        else:
            p = learned.joint if name == "joint" else learned.complexity_high
            best = max(p, 1.0 - p)
        reach = min(reach, best)
    return reach


def _asks_fields(profiler: Any) -> bool:
    """Whether the wrapped LLM profiler can be asked for some fields only (the field
    profiler can; the JSON profiler answers all at once)."""
    return "fields" in inspect.signature(profiler.profile).parameters


def _calibrated(outcome: ProfileOutcome, calibration: Calibration) -> ProfileOutcome:
    """The LLM outcome with calibrated beliefs, its profile's confidence the calibrated
    probability that the decisive fields are right (unchanged without beliefs or calibration:
    the raw probabilities, under the controller's threshold)."""
    if outcome.beliefs is None or outcome.profile is None or not calibration.calibrated_fields:
        return outcome
    raw = outcome.beliefs
    # A field read as uniform carries no reading to calibrate: it stays uniform.
    skip = outcome.uniform_fields
    beliefs = calibration.apply(raw, skip=skip)
    profile = beliefs.to_profile(calibration.confidence(raw, skip=skip))
    return replace(outcome, profile=profile, beliefs=beliefs, raw_beliefs=raw)
