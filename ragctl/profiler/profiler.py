"""The LLM query profiler (RAGServe/METIS section 4.1): one structured-output call per query that
reads the question, the collection's one-line metadata and the chunk size, and returns a
`Profile` with the confidence of the tokens the model chose.

A profiler never fails a request: engine errors, timeouts and output that is not a valid profile
come back as a `ProfileOutcome` with `error` set, for the controller to fall back on and count.

Feedback (the paper's golden runs): `feedback()` shows the profiler LLM what the expensive golden
configuration found for a question and asks what profile would have been right; the answer is
kept as a few-shot example for later prompts. Examples are kept per collection in one
`FeedbackExamples` store (the last K of each), so one Profiler serves every collection without
examples of one leaking into the prompts of another: pass `collection=` to `profile()` and
`feedback()` (without it the metadata line is the key, which is one per collection as well).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ragctl.engine.base import Engine
from ragctl.errors import EngineTimeout, ProfilerError, RagctlError
from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.profiler.prompts import (
    FEEDBACK,
    PROFILE,
    FeedbackExample,
    format_examples,
    format_golden_notes,
    load_profiler_template,
    useful_notes,
)
from ragctl.profiler.schema import PROFILE_SCHEMA, parse_profile, profile_confidence
from ragctl.synthesis.prompts import Template
from ragctl.types import Generation, GenerationRequest, Profile

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 96
"""Output budget of a profiler call. The embedded SmolLM2-135M writes the profile in 32-34
tokens on one line and in 45-48 pretty-printed (`{\n  "complexity": "low",\n ...}`, its own
choice: vLLM's JSON grammar allows whitespace between tokens, but the model did not pad with it);
twice that leaves room for wider indentation and cuts a model that keeps emitting whitespace
short (a `garbage` outcome) instead of letting it run on."""
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_EXAMPLES = 4
NOTES_MARGIN_TOKENS = 8
"""Slack left in the context window when the golden notes are fitted into a feedback prompt."""

ErrorKind = Literal["timeout", "engine", "garbage"]


@dataclass(frozen=True)
class ProfileOutcome:
    """What one profiler call gave: a profile, or why there is none."""

    profile: Profile | None
    error: str | None
    """None on success; else `timeout: ...`, `engine error: ...` or `garbage: ...`."""
    error_kind: ErrorKind | None
    """The kind of failure, for counting: `timeout`, `engine` or `garbage`."""
    seconds: float
    """Wall time of the call, queueing in the engine included."""
    template: str
    """Version of the prompt template used (e.g. `v1`)."""
    raw: str = ""
    """The model's output text, as it came."""
    prompt_tokens: int = 0
    output_tokens: int = 0
    examples: int = 0
    """Few-shot feedback examples the prompt carried."""
    finish_reason: str | None = None
    beliefs: FieldBeliefs | None = None
    """Per-field probabilities (a per-field profiler; calibrated when a calibration applied)."""
    raw_beliefs: FieldBeliefs | None = None
    """The beliefs before calibration (None when none applied)."""
    profiler: str = "json"
    """Which profiler made it: `json` (this module), `llm` (per-field) or `learned`."""
    learned_note: str = ""
    """Why the learned profiler's answer was not used, when one was asked first."""
    uniform_fields: tuple[str, ...] = ()
    """Fields the model gave no allowed answer for (or was not asked), read as uniform."""
    learned_fields: tuple[str, ...] = ()
    """Fields of an LLM profile that the learned profiler answered instead (`auto` asks the
    LLM only for the fields it answers better)."""
    llm_note: str = ""
    """Why `auto` did not ask the LLM though the learned profiler was unsure (no LLM answer
    could have made the profile trusted)."""

    @property
    def ok(self) -> bool:
        return self.profile is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": None if self.profile is None else self.profile.to_dict(),
            "error": self.error,
            "error_kind": self.error_kind,
            "seconds": self.seconds,
            "template": self.template,
            "raw": self.raw,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "examples": self.examples,
            "finish_reason": self.finish_reason,
            "beliefs": None if self.beliefs is None else self.beliefs.to_dict(),
            "raw_beliefs": None if self.raw_beliefs is None else self.raw_beliefs.to_dict(),
            "uniform_fields": list(self.uniform_fields),
            "learned_fields": list(self.learned_fields),
            "llm_note": self.llm_note,
            "profiler": self.profiler,
            "learned_note": self.learned_note,
        }


class FeedbackExamples:
    """The last `max_examples` feedback examples of each collection, oldest first."""

    def __init__(self, max_examples: int = DEFAULT_MAX_EXAMPLES) -> None:
        if max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {max_examples}")
        self.max_examples = max_examples
        self._by_collection: dict[str, deque[FeedbackExample]] = {}

    def add(self, collection: str, example: FeedbackExample) -> None:
        kept = self._by_collection.setdefault(collection, deque(maxlen=self.max_examples))
        kept.append(example)

    def get(self, collection: str) -> tuple[FeedbackExample, ...]:
        return tuple(self._by_collection.get(collection, ()))

    def collections(self) -> tuple[str, ...]:
        return tuple(k for k, v in self._by_collection.items() if v)


class Profiler:
    """Profiles queries with an LLM behind any `Engine`: the shared serving engine, or a
    `RemoteEngine` to a separate OpenAI-compatible endpoint (see `ragctl.service.open_profiler`)."""

    def __init__(
        self,
        engine: Engine,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        priority: int = 0,
        profile_template: Template | None = None,
        feedback_template: Template | None = None,
        owns_engine: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.engine = engine
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.priority = priority
        """Engine priority of the profiler's calls (lower runs first; non-zero needs a server
        with priority scheduling)."""
        self.examples = FeedbackExamples(max_examples)
        self.last_feedback: ProfileOutcome | None = None
        """How the latest `feedback()` call went (its error, when it returned None)."""
        self._profile = profile_template or load_profiler_template(PROFILE)
        self._feedback = feedback_template or load_profiler_template(FEEDBACK)
        self._owns_engine = owns_engine

    @property
    def templates(self) -> dict[str, str]:
        """Versions of the prompt templates in use: {"profile": "v1", "feedback": "v1"}."""
        return {PROFILE: self._profile.version, FEEDBACK: self._feedback.version}

    # --- requests (pure) ------------------------------------------------------------------------

    def profile_request(
        self, question: str, metadata: str, chunk_tokens: int, *, collection: str | None = None
    ) -> GenerationRequest:
        """The structured-output call that profiles `question`, with the collection's feedback
        examples in the prompt."""
        examples = self.examples.get(_key(collection, metadata))
        messages = self._profile.render(
            metadata=metadata.strip(),
            chunk_tokens=_positive(chunk_tokens),
            examples=format_examples(examples),
            question=question.strip(),
        )
        return self._request(messages, tag="profile")

    def feedback_request(
        self,
        question: str,
        metadata: str,
        chunk_tokens: int,
        golden_answer: str,
        golden_notes: Sequence[str],
    ) -> GenerationRequest:
        """The call that asks for the right profile given the golden run's answer and notes.
        Notes that found nothing are left out; the rest are kept in order while they fit the
        engine's context window (the golden run's notes can outgrow it)."""
        notes = useful_notes(golden_notes)
        tok = self.engine.tokenizer
        budget = self.engine.max_model_len - self.max_tokens - NOTES_MARGIN_TOKENS

        def render(kept: Sequence[str]) -> GenerationRequest:
            msgs = self._feedback.render(
                metadata=metadata.strip(),
                chunk_tokens=_positive(chunk_tokens),
                question=question.strip(),
                notes=format_golden_notes(kept),
                answer=golden_answer.strip() or "(no answer)",
            )
            return self._request(msgs, tag="profile-feedback")

        # Estimate note by note, then drop from the end until the exact count fits.
        used = tok.count_chat(render([]).messages)
        kept: list[str] = []
        for note in notes:
            cost = tok.count(note) + 4  # the "[i] " prefix and the blank line
            if used + cost > budget:
                break
            kept.append(note)
            used += cost
        req = render(kept)
        while kept and tok.count_chat(req.messages) > budget:
            kept.pop()
            req = render(kept)
        return req

    def _request(self, messages: Any, *, tag: str) -> GenerationRequest:
        return GenerationRequest(
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=0.0,
            logprobs=True,
            json_schema=PROFILE_SCHEMA,
            priority=self.priority,
            tag=tag,
        )

    # --- calls ----------------------------------------------------------------------------------

    async def profile(
        self, question: str, metadata: str, chunk_tokens: int, *, collection: str | None = None
    ) -> ProfileOutcome:
        """Profile one query. Never raises for engine errors, timeouts or unusable output: the
        outcome's `error` says what went wrong."""
        req = self.profile_request(question, metadata, chunk_tokens, collection=collection)
        n_examples = len(self.examples.get(_key(collection, metadata)))
        outcome = await self._run(req, self._profile.version, n_examples)
        if outcome.ok:
            log.debug("profile in %.2fs: %s", outcome.seconds, outcome.profile)
        else:
            log.info("no profile (%s) for %r", outcome.error, question[:80])
        return outcome

    async def feedback(
        self,
        question: str,
        metadata: str,
        chunk_tokens: int,
        golden_answer: str,
        golden_notes: Sequence[str],
        *,
        collection: str | None = None,
    ) -> Profile | None:
        """Ask the profiler LLM what profile the golden run shows `question` should have had;
        keep it as a few-shot example of the collection (the last K kept). None, and nothing
        kept, when the call fails or its output is no profile (`last_feedback` says why)."""
        req = self.feedback_request(question, metadata, chunk_tokens, golden_answer, golden_notes)
        outcome = await self._run(req, self._feedback.version, 0)
        self.last_feedback = outcome
        if outcome.profile is None:
            log.warning("profiler feedback failed (%s) for %r", outcome.error, question[:80])
            return None
        key = _key(collection, metadata)
        self.examples.add(key, FeedbackExample(" ".join(question.split()), outcome.profile))
        return outcome.profile

    async def _run(self, req: GenerationRequest, version: str, n_examples: int) -> ProfileOutcome:
        start = time.perf_counter()

        def failed(kind: ErrorKind, error: str, gen: Generation | None = None) -> ProfileOutcome:
            return ProfileOutcome(
                profile=None,
                error=error,
                error_kind=kind,
                seconds=time.perf_counter() - start,
                template=version,
                raw=gen.text if gen else "",
                prompt_tokens=gen.prompt_tokens if gen else 0,
                output_tokens=gen.output_tokens if gen else 0,
                examples=n_examples,
                finish_reason=gen.finish_reason if gen else None,
            )

        gens, kind, error = await guarded_generate(self.engine, [req], self.timeout_s)
        if gens is None:
            return failed(kind, error)  # type: ignore[arg-type]
        [gen] = gens
        try:
            profile = parse_profile(gen.text, profile_confidence(gen.token_logprobs))
        except ProfilerError as e:
            reason = str(e)
            if gen.finish_reason == "length":
                reason = f"output cut off at max_tokens={req.max_tokens}; {reason}"
            return failed("garbage", f"garbage: {reason}", gen)
        return ProfileOutcome(
            profile=profile,
            error=None,
            error_kind=None,
            seconds=time.perf_counter() - start,
            template=version,
            raw=gen.text,
            prompt_tokens=gen.prompt_tokens,
            output_tokens=gen.output_tokens,
            examples=n_examples,
            finish_reason=gen.finish_reason,
        )

    async def aclose(self) -> None:
        """Close the engine if this profiler opened it (never the shared serving engine)."""
        if self._owns_engine:
            self._owns_engine = False
            await self.engine.aclose()

    async def __aenter__(self) -> Profiler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def guarded_generate(
    engine: Engine, requests: Sequence[GenerationRequest], timeout_s: float
) -> tuple[list[Generation] | None, ErrorKind | None, str]:
    """A profiler's engine call that never raises: (generations, None, "") or (None, kind,
    error) for a timeout (the whole call, queueing included, past `timeout_s`) or an engine
    error of any kind."""
    try:
        async with asyncio.timeout(timeout_s):
            return await engine.generate(requests), None, ""
    except TimeoutError:
        return None, "timeout", f"timeout: no profile within {timeout_s:g}s"
    except EngineTimeout as e:
        return None, "timeout", f"timeout: {e}"
    except RagctlError as e:
        return None, "engine", f"engine error: {e}"
    except Exception as e:  # noqa: BLE001 - a profiler must never fail the request
        log.warning("profiler engine call raised", exc_info=True)
        return None, "engine", f"engine error: {type(e).__name__}: {e}"


def _key(collection: str | None, metadata: str) -> str:
    return collection if collection is not None else " ".join(metadata.split())


def _positive(chunk_tokens: int) -> int:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    return chunk_tokens
