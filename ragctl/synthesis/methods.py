"""The machinery the synthesis methods share: `Synthesizer` plans a configuration's calls as a
chain of `Step`s (the engine calls of one stage plus a `finish` function that turns their
generations into the next step or the final `SynthesisResult`), and `CallSizer` sizes them; both
dispatch to the method's spec (`registry`; the methods themselves are `map_rerank`, `stuff` and
`map_reduce`). The controller runs the chain; nothing here awaits or talks to an engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from ragctl.errors import InvalidRequest, PromptTooLong
from ragctl.synthesis import registry
from ragctl.synthesis.prompts import format_passage, load_template
from ragctl.synthesis.registry import CallEstimate, StageSize, Step
from ragctl.types import AnswerOptions, Chunk, Config, GenerationRequest, Message

if TYPE_CHECKING:
    from ragctl.engine.tokenizer import Tokenizer

__all__ = ["CallEstimate", "CallSizer", "Step", "Synthesizer"]

# Upper bound on the tokens a passage gains in a real prompt over its standalone count: its
# `[i]` number, the joining blank line, and a merge at either edge.
PASSAGE_SLACK_TOKENS = 4
# The same for the question placed in a template (a merge at either edge).
QUESTION_SLACK_TOKENS = 2
PASSAGE_CACHE_SIZE = 200_000


@dataclass(frozen=True)
class CallSizer:
    """Call sizes for one query's retrieved chunks, by arithmetic over per-passage token
    counts: an upper bound on `Synthesizer.estimate_calls` within PASSAGE_SLACK_TOKENS per
    passage, cheap enough to size every configuration of a space."""

    passages: tuple[int, ...]
    overhead: Mapping[str, int]
    """Prompt tokens of each template with its passage slots empty."""
    answer_max_tokens: int
    max_model_len: int
    collection: str = ""
    """Whose query it sizes (`StageWork.collection`)."""

    def passage(self, i: int) -> int:
        return self.passages[i] + PASSAGE_SLACK_TOKENS

    @property
    def budget(self) -> int:
        """Prompt tokens an answer call may use."""
        return self.max_model_len - self.answer_max_tokens

    def chunks_used(self, config: Config) -> int:
        n = min(config.num_chunks, len(self.passages))
        if n < 1:
            raise InvalidRequest("retrieval returned no chunks to answer from")
        return n

    def stages(self, config: Config) -> tuple[StageSize, ...]:
        """How each stage's calls grow with the chunk count (what `NeedTable` sums)."""
        return registry.spec(config.method).size(self, config)

    def estimate(self, config: Config) -> list[CallEstimate]:
        n = self.chunks_used(config)
        return [call for stage in self.stages(config) for call in stage.calls(n)]


class Synthesizer:
    """Plans and combines synthesis calls for one model (its tokenizer and context window)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int,
        answer_max_tokens: int,
        temperature: float = 0.0,
        collection: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.answer_max_tokens = answer_max_tokens
        self.temperature = temperature
        self.collection = collection
        """Whose queries it answers: the work it sizes says so (`StageWork.collection`)."""
        self.options = AnswerOptions()
        """The request's answer options (`for_request`); the defaults here."""
        self.templates = {n: load_template(n) for m in registry.specs() for n in m.templates}
        # Chunk id -> tokens of its passage; chunks recur across queries, so sizing mostly hits.
        self._passage_tokens: dict[str, int] = {}
        self._title_tokens: dict[str, int] = {}

    def for_request(self, options: AnswerOptions | None) -> Synthesizer:
        """This synthesizer with one request's answer options: its max_tokens (at most this
        answer budget: the KV plan is sized from the budget) and sampling fields on the answer
        calls. Shares the token caches; `self` when there is nothing to change."""
        if options is None or options == self.options:
            return self
        view = copy.copy(self)  # shallow: the caches are shared dicts
        view.options = options
        if options.max_tokens is not None:
            view.answer_max_tokens = min(options.max_tokens, self.answer_max_tokens)
        return view

    @property
    def template_versions(self) -> dict[str, str]:
        return {n: t.version for n, t in self.templates.items()}

    # -- planning -----------------------------------------------------------------------------

    def plan(self, config: Config, question: str, chunks: Sequence[Chunk]) -> Step:
        """The first step of `config.method` over the first `config.num_chunks` chunks."""
        chunks = tuple(chunks[: config.num_chunks])
        if not chunks:
            raise InvalidRequest("retrieval returned no chunks to answer from")
        return registry.spec(config.method).plan(self, config, question, chunks)

    def call(
        self, template: str, tag: str, max_tokens: int, logprobs: bool, **values: object
    ) -> GenerationRequest:
        return GenerationRequest(
            messages=self.templates[template].render(**values),
            max_tokens=max_tokens,
            temperature=self.temperature,
            logprobs=logprobs,
            tag=tag,
        )

    def answer_call(
        self, template: str, tag: str = "answer", **values: object
    ) -> GenerationRequest:
        """A call whose output is (a candidate for) the answer: the answer budget, log-probs,
        and the request's sampling options (the other calls keep the server's)."""
        o = self.options
        call = self.call(template, tag, self.answer_max_tokens, True, **values)
        return replace(
            call,
            temperature=self.temperature if o.temperature is None else o.temperature,
            top_p=1.0 if o.top_p is None else o.top_p,
            stop=o.stop,
            seed=o.seed,
            ignore_eos=o.ignore_eos,
        )

    def longest_fitting(
        self, n: int, build: Callable[[int], GenerationRequest]
    ) -> tuple[int, GenerationRequest]:
        """The largest k in 1..n whose call fits the context window (binary search: prompt
        length grows with k)."""

        def fits(call: GenerationRequest) -> bool:
            return self.prompt_tokens(call.messages) + call.max_tokens <= self.max_model_len

        full = build(n)
        if fits(full):
            return n, full
        lo, hi, best = 1, n - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            call = build(mid)
            if fits(call):
                lo, best = mid + 1, (mid, call)
            else:
                hi = mid - 1
        if best is None:
            raise PromptTooLong(
                f"not even one passage fits the model's context of {self.max_model_len} tokens "
                f"with {full.max_tokens} output tokens"
            )
        return best

    # -- accounting ---------------------------------------------------------------------------

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return self.tokenizer.count_chat(messages)

    def estimate_calls(
        self, config: Config, question: str, chunks: Sequence[Chunk]
    ) -> list[CallEstimate]:
        """Every call `config` will make, with its prompt and output budget in tokens: exact for
        the first stage, whose prompts are known; later stages' prompts hold earlier outputs,
        so they are the sizer's bounds."""
        step = self.plan(config, question, chunks)
        first = [
            CallEstimate(step.name, self.prompt_tokens(r.messages), r.max_tokens)
            for r in step.requests
        ]
        later = self.sizer(question, chunks).estimate(config)
        return first + [c for c in later if c.stage != step.name]

    def sizer(self, question: str, chunks: Sequence[Chunk]) -> CallSizer:
        """A per-query table that sizes any configuration's calls in microseconds (the
        best-fit scheduler sizes every configuration of a space; `estimate_calls` renders and
        tokenises whole prompts, milliseconds each)."""
        chunks = tuple(chunks)
        missing = [c for c in chunks if c.id not in self._passage_tokens]
        if len(self._passage_tokens) + len(missing) > PASSAGE_CACHE_SIZE:
            self._passage_tokens.clear()
        # Retrieved chunks know their text's tokens: only their (short, recurring) title
        # headers need counting. `[i]` numbering differs by a digit or two per passage, and
        # the joins may merge differently: PASSAGE_SLACK_TOKENS covers both.
        known = [c for c in missing if c.n_tokens > 0]
        headers = self._header_tokens([c.title for c in known])
        self._passage_tokens.update((c.id, headers[c.title] + c.n_tokens) for c in known)
        unknown = [c for c in missing if c.n_tokens <= 0]
        counts = self.tokenizer.count_many([format_passage(1, c) for c in unknown])
        self._passage_tokens.update(zip((c.id for c in unknown), counts, strict=True))
        q = self.tokenizer.count(question) + QUESTION_SLACK_TOKENS
        return CallSizer(
            passages=tuple(self._passage_tokens[c.id] for c in chunks),
            overhead={name: n + q for name, n in self._empty_prompt_tokens.items()},
            answer_max_tokens=self.answer_max_tokens,
            max_model_len=self.max_model_len,
            collection=self.collection,
        )

    def _header_tokens(self, titles: Sequence[str]) -> dict[str, int]:
        new = sorted({t for t in titles if t not in self._title_tokens})
        header = [format_passage(1, Chunk("", "", "", title=t)) for t in new]
        self._title_tokens.update(zip(new, self.tokenizer.count_many(header), strict=True))
        return {t: self._title_tokens[t] for t in titles}

    @cached_property
    def _empty_prompt_tokens(self) -> dict[str, int]:
        """Each template's prompt tokens with its passage and question slots empty."""
        # The widest word budget (3 digits) bounds every real one.
        blank = {"question": "", "chunk": "", "context": "", "notes": "", "max_words": 999}
        return {n: self.prompt_tokens(t.render(**blank)) for n, t in self.templates.items()}

    def question_overhead(self, question: str) -> int:
        """Tokens of the smallest prompt this question can make (a stuff prompt with no
        passages) plus the answer budget: what must fit before any chunk does."""
        call = self.answer_call("stuff", context="", question=question)
        return self.prompt_tokens(call.messages) + call.max_tokens
