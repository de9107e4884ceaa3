"""The LLM field profiler: one question per profile field (joint reasoning, complexity, pieces,
summary length), each answered by ONE generated token, and each field's distribution read from
the top log-probs of that token: real per-field probabilities (`FieldBeliefs`) instead of the
JSON profiler's mean log-prob of a string.

The four prompts share everything but their last part, the field's question
(`profiler_prompts/fields.v1.txt`), and go to the engine as one batch, so the engine decodes
four tokens together and its prefix cache serves the shared prompt. The distribution of a field:
the probability of every top-k token whose text, normalised (`prompts.normalise_label`), is one
of the field's answer labels, summed per label; a label missing from the top-k gets the smallest
top-k probability (an upper bound of its own), then all are renormalised. A field with none of
its labels in the top-k is unusable output (`garbage`).

Like `Profiler`, it never fails a request: timeouts, engine errors and garbage come back as a
`ProfileOutcome` with `error` set. Feedback (golden runs) goes to an inner JSON `Profiler` on the
same engine, whose examples store this profiler shares: a collection's examples join the shared
prompt (they change rarely, so it stays cacheable).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ragctl.engine.base import Engine
from ragctl.profiler.beliefs import FIELD_VALUES, FieldBeliefs
from ragctl.profiler.calibration import decision_confidence
from ragctl.profiler.profiler import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_TIMEOUT_S,
    ErrorKind,
    FeedbackExamples,
    ProfileOutcome,
    Profiler,
    _key,
    _positive,
    guarded_generate,
)
from ragctl.profiler.prompts import (
    FEEDBACK,
    FIELDS,
    FieldQuestion,
    FieldTemplate,
    format_examples,
    load_field_template,
    normalise_label,
)
from ragctl.types import Generation, GenerationRequest, Profile

log = logging.getLogger(__name__)

DEFAULT_TOP_LOGPROBS = 20
"""Alternatives read per field: vLLM's default `max_logprobs` (a server allows more only when
started with a larger `--max-logprobs`)."""
RAW_TOP = 5
"""Top tokens per field kept in the outcome's `raw`."""


def uniform(n: int) -> tuple[float, ...]:
    """n equal probabilities: a field read as "no information"."""
    return tuple([1.0 / n] * n)


def read_distribution(top: Mapping[str, float], labels: Sequence[str]) -> tuple[float, ...] | None:
    """A field's distribution over `labels` from one position's top log-probs (text ->
    log-prob); None when no label is among them."""
    keys = [normalise_label(label) for label in labels]
    mass = [0.0] * len(keys)
    found = [False] * len(keys)
    for text, logprob in top.items():
        key = normalise_label(text)
        for i, k in enumerate(keys):
            if key == k:
                mass[i] += math.exp(logprob)
                found[i] = True
    if not any(found):
        return None
    # A label outside the top-k is at most as likely as the least likely token shown.
    floor = math.exp(min(top.values()))
    mass = [m if f else floor for m, f in zip(mass, found, strict=True)]
    total = sum(mass)
    if not total > 0.0:  # only -inf log-probs: nothing to normalise
        return None
    return tuple(m / total for m in mass)


class FieldProfiler:
    """Profiles queries with four one-token questions behind any `Engine`; same surface as
    `Profiler` (so `AutoProfiler` and the controller take either)."""

    def __init__(
        self,
        engine: Engine,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        top_logprobs: int = DEFAULT_TOP_LOGPROBS,
        priority: int = 0,
        template: FieldTemplate | None = None,
        feedback_profiler: Profiler | None = None,
        owns_engine: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        self.engine = engine
        self.timeout_s = timeout_s
        self.top_logprobs = top_logprobs
        self.priority = priority
        self._template = template or load_field_template()
        self._json = feedback_profiler or Profiler(
            engine, timeout_s=timeout_s, max_examples=max_examples, priority=priority
        )
        self.examples: FeedbackExamples = self._json.examples
        """Shared with the inner JSON profiler that runs `feedback()`."""
        self._owns_engine = owns_engine

    @property
    def templates(self) -> dict[str, str]:
        """Versions of the prompt templates in use: {"fields": "v1", "feedback": "v1"}."""
        return {FIELDS: self._template.version, FEEDBACK: self._json.templates[FEEDBACK]}

    @property
    def last_feedback(self) -> ProfileOutcome | None:
        """How the latest `feedback()` call went."""
        return self._json.last_feedback

    # --- requests (pure) ------------------------------------------------------------------------

    def requests(
        self,
        question: str,
        metadata: str,
        chunk_tokens: int,
        *,
        collection: str | None = None,
        fields: Sequence[str] | None = None,
    ) -> list[GenerationRequest]:
        """The one-token calls of `fields` (all four when None), in `FIELD_VALUES` order;
        identical up to the field's question, which ends each prompt."""
        examples = self.examples.get(_key(collection, metadata))
        shared = {
            "metadata": metadata.strip(),
            "chunk_tokens": _positive(chunk_tokens),
            "examples": format_examples(examples),
            "question": question.strip(),
        }
        return [
            GenerationRequest(
                messages=self._template.template.render(**shared, field=q.text),
                max_tokens=1,
                temperature=0.0,
                top_logprobs=self.top_logprobs,
                priority=self.priority,
                tag=f"profile-{name}",
            )
            for name, q in self._questions(fields)
        ]

    def _questions(self, fields: Sequence[str] | None) -> list[tuple[str, FieldQuestion]]:
        if fields is not None and (unknown := set(fields) - set(FIELD_VALUES)):
            raise ValueError(f"unknown profile field(s): {', '.join(sorted(unknown))}")
        items = self._template.questions.items()
        return [(n, q) for n, q in items if fields is None or n in fields]

    # --- calls ----------------------------------------------------------------------------------

    async def profile(
        self,
        question: str,
        metadata: str,
        chunk_tokens: int,
        *,
        collection: str | None = None,
        fields: Sequence[str] | None = None,
    ) -> ProfileOutcome:
        """Profile one query: every field, or only `fields` (one call each; the others come
        back uniform and listed in `uniform_fields`, for a caller that has them elsewhere).
        Never raises for engine errors, timeouts or unusable output: the outcome's `error`
        says what went wrong."""
        reqs = self.requests(question, metadata, chunk_tokens, collection=collection, fields=fields)
        n_examples = len(self.examples.get(_key(collection, metadata)))
        version = self._template.version
        start = time.perf_counter()

        def outcome(
            gens: Sequence[Generation] = (),
            raw: str = "",
            *,
            failure: tuple[ErrorKind, str] | None = None,
            beliefs: FieldBeliefs | None = None,
        ) -> ProfileOutcome:
            profile = None
            if beliefs is not None:
                profile = beliefs.to_profile(decision_confidence(beliefs))
            return ProfileOutcome(
                profile=profile,
                error=failure[1] if failure else None,
                error_kind=failure[0] if failure else None,
                seconds=time.perf_counter() - start,
                template=version,
                raw=raw,
                prompt_tokens=sum(g.prompt_tokens for g in gens),
                output_tokens=sum(g.output_tokens for g in gens),
                examples=n_examples,
                finish_reason=gens[0].finish_reason if gens and beliefs else None,
                beliefs=beliefs,
                profiler="llm",
            )

        called, kind, error = await guarded_generate(self.engine, reqs, self.timeout_s)
        if called is None:
            return outcome(failure=(kind, error))  # type: ignore[arg-type]
        gens = called

        questions = [q for _, q in self._questions(fields)]
        raw = _raw(questions, gens)
        dists: dict[str, tuple[float, ...]] = {}
        unusable: list[str] = []
        for q, gen in zip(questions, gens, strict=True):
            dist = None
            if gen.top_logprobs:
                dist = read_distribution(gen.top_logprobs[0], list(q.labels.values()))
            if dist is None:
                unusable.append(q.field)
            else:
                dists[q.field] = dist
        if len(unusable) == len(questions):
            failure = (
                "garbage",
                f"garbage: no allowed answer among the top {self.top_logprobs} tokens for "
                + ", ".join(unusable),
            )
            done = outcome(gens, raw, failure=failure)  # type: ignore[arg-type]
            log.info("no profile (%s) for %r", done.error, question[:80])
            return done
        # A field the model gave no allowed answer for says nothing: uniform, the others kept.
        # Uniform joint/complexity put the decision's confidence at 0.5 or less, so such a
        # profile is never trusted on its own.
        missing = [name for name in FIELD_VALUES if name not in dists]
        for name in missing:
            dists[name] = uniform(len(FIELD_VALUES[name]))
        done = replace(
            outcome(gens, raw, beliefs=FieldBeliefs.from_fields(dists)),
            uniform_fields=tuple(missing),
        )
        log.debug("field profile in %.2fs: %s", done.seconds, done.profile)
        return done

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
        """`Profiler.feedback` on the inner JSON profiler: the example it keeps joins this
        profiler's prompts for the collection."""
        return await self._json.feedback(
            question, metadata, chunk_tokens, golden_answer, golden_notes, collection=collection
        )

    async def aclose(self) -> None:
        """Close the engine if this profiler opened it (never the shared serving engine)."""
        if self._owns_engine:
            self._owns_engine = False
            await self.engine.aclose()

    async def __aenter__(self) -> FieldProfiler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _raw(questions: Sequence[FieldQuestion], gens: Sequence[Generation]) -> str:
    """Per field: the generated text and its `RAW_TOP` most likely alternatives, as compact
    JSON (log-probs to 3 decimals)."""
    out: dict[str, Any] = {}
    for q, gen in zip(questions, gens, strict=True):
        top = gen.top_logprobs[0] if gen.top_logprobs else {}
        best = sorted(top.items(), key=lambda kv: -kv[1])[:RAW_TOP]
        out[q.field] = {"text": gen.text, "top": {t: round(lp, 3) for t, lp in best}}
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))
