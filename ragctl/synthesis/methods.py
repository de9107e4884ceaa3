"""The three synthesis methods as pure planners: each turns (config, question, chunks) into a
chain of `Step`s — the engine calls of one stage plus a `finish` function that turns their
generations into the next step or the final `SynthesisResult`. The controller runs the chain;
nothing here awaits or talks to an engine.

- map_rerank: one call per chunk; answers ranked by log-prob confidence, "unanswerable" last.
- stuff: all chunks in one prompt (the longest prefix that fits the context window).
- map_reduce: one mapper per chunk bounded to `intermediate_length` tokens, submitted together,
  then one reducer over the notes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from ragctl.engine.tokenizer import Tokenizer
from ragctl.errors import InvalidRequest, PromptTooLong
from ragctl.synthesis.prompts import format_notes, format_passage, load_template
from ragctl.types import (
    Chunk,
    Config,
    Generation,
    GenerationRequest,
    Message,
    SynthesisResult,
)

UNANSWERABLE = "unanswerable"
NOTHING_RELEVANT = "nothing relevant"
# Per-note framing in the reducer prompt ("[i] " and the blank line), in tokens, for estimates.
NOTE_OVERHEAD_TOKENS = 6


@dataclass(frozen=True)
class Step:
    """One stage of a method: calls to submit together, and what to do with their results."""

    name: str
    requests: tuple[GenerationRequest, ...]
    finish: Callable[[Sequence[Generation]], Step | SynthesisResult]


@dataclass(frozen=True)
class CallEstimate:
    """A call's size before it runs: exact prompt tokens where the prompt is known (mappers,
    map_rerank, stuff), an upper bound for the reducer (every note at its full budget)."""

    stage: str
    prompt_tokens: int
    max_tokens: int


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

    def _passage(self, i: int) -> int:
        return self.passages[i] + PASSAGE_SLACK_TOKENS

    @property
    def _budget(self) -> int:
        return self.max_model_len - self.answer_max_tokens

    def chunks_used(self, config: Config) -> int:
        n = min(config.num_chunks, len(self.passages))
        if n < 1:
            raise InvalidRequest("retrieval returned no chunks to answer from")
        return n

    def rerank_call(self, i: int) -> CallEstimate:
        """map_rerank's call over chunk `i`."""
        prompt = min(self.overhead["map_rerank"] + self._passage(i), self._budget)
        return CallEstimate("rerank", prompt, self.answer_max_tokens)

    def map_call(self, i: int, ilen: int) -> CallEstimate:
        """map_reduce's mapper over chunk `i`."""
        prompt = min(self.overhead["map"] + self._passage(i), self.max_model_len - ilen)
        return CallEstimate("map", prompt, ilen)

    def reduce_call(self, n: int, ilen: int) -> CallEstimate:
        """map_reduce's reducer over `n` notes, each at its full budget."""
        bound = self.overhead["reduce"] + n * (ilen + NOTE_OVERHEAD_TOKENS)
        return CallEstimate("reduce", min(bound, self._budget), self.answer_max_tokens)

    def stuff_calls(self) -> list[CallEstimate]:
        """stuff's one call for every chunk count 1..len(passages), in one pass (each keeps
        the longest prefix that fits the context window)."""
        out, total, full = [], self.overhead["stuff"], False
        for i in range(len(self.passages)):
            if not full and total + self._passage(i) <= self._budget:
                total += self._passage(i)
            else:
                full = True
            out.append(CallEstimate("answer", total, self.answer_max_tokens))
        return out

    def estimate(self, config: Config) -> list[CallEstimate]:
        n = self.chunks_used(config)
        if config.method == "map_rerank":
            return [self.rerank_call(i) for i in range(n)]
        if config.method == "stuff":
            return [self.stuff_calls()[n - 1]]
        ilen = config.intermediate_length
        assert ilen is not None  # Config guarantees it for map_reduce
        return [self.map_call(i, ilen) for i in range(n)] + [self.reduce_call(n, ilen)]


def _is_refusal(text: str, phrase: str) -> bool:
    t = text.strip().strip(".!\"'").lower()
    return not t or t.startswith(phrase)


class Synthesizer:
    """Plans and combines synthesis calls for one model (its tokenizer and context window)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int,
        answer_max_tokens: int,
        temperature: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.answer_max_tokens = answer_max_tokens
        self.temperature = temperature
        self.templates = {n: load_template(n) for n in ("map_rerank", "stuff", "map", "reduce")}
        # Chunk id -> tokens of its passage; chunks recur across queries, so sizing mostly hits.
        self._passage_tokens: dict[str, int] = {}
        self._title_tokens: dict[str, int] = {}

    @property
    def template_versions(self) -> dict[str, str]:
        return {n: t.version for n, t in self.templates.items()}

    # -- planning -----------------------------------------------------------------------------

    def plan(self, config: Config, question: str, chunks: Sequence[Chunk]) -> Step:
        """The first step of `config.method` over the first `config.num_chunks` chunks."""
        chunks = tuple(chunks[: config.num_chunks])
        if not chunks:
            raise InvalidRequest("retrieval returned no chunks to answer from")
        if config.method == "map_rerank":
            return self._map_rerank(question, chunks)
        if config.method == "stuff":
            return self._stuff(question, chunks)
        assert config.intermediate_length is not None  # Config guarantees it for map_reduce
        return self._map_reduce(question, chunks, config.intermediate_length)

    def _call(
        self, template: str, tag: str, max_tokens: int, logprobs: bool, **values: object
    ) -> GenerationRequest:
        return GenerationRequest(
            messages=self.templates[template].render(**values),
            max_tokens=max_tokens,
            temperature=self.temperature,
            logprobs=logprobs,
            tag=tag,
        )

    def _answer_call(self, template: str, **values: object) -> GenerationRequest:
        return self._call(template, "answer", self.answer_max_tokens, True, **values)

    def _map_rerank(self, question: str, chunks: tuple[Chunk, ...]) -> Step:
        calls = tuple(
            self._call(
                "map_rerank",
                "rerank",
                self.answer_max_tokens,
                True,
                chunk=format_passage(1, c),
                question=question,
            )
            for c in chunks
        )

        def finish(gens: Sequence[Generation]) -> SynthesisResult:
            # Real answers beat "unanswerable"; then higher confidence; then retrieval rank.
            best = max(
                range(len(gens)),
                key=lambda i: (
                    not _is_refusal(gens[i].text, UNANSWERABLE),
                    gens[i].confidence or 0.0,
                    -i,
                ),
            )
            return SynthesisResult(
                answer=gens[best].text.strip(),
                confidence=gens[best].confidence,
                source_chunk_id=chunks[best].id,
                used_chunk_ids=tuple(c.id for c in chunks),
            )

        return Step("rerank", calls, finish)

    def _stuff(self, question: str, chunks: tuple[Chunk, ...]) -> Step:
        def build(n: int) -> GenerationRequest:
            context = "\n\n".join(format_passage(i, c) for i, c in enumerate(chunks[:n], 1))
            return self._answer_call("stuff", context=context, question=question)

        n, call = self._longest_fitting(len(chunks), build)
        used = chunks[:n]

        def finish(gens: Sequence[Generation]) -> SynthesisResult:
            return SynthesisResult(
                answer=gens[0].text.strip(),
                confidence=gens[0].confidence,
                used_chunk_ids=tuple(c.id for c in used),
            )

        return Step("answer", (call,), finish)

    def _map_reduce(self, question: str, chunks: tuple[Chunk, ...], ilen: int) -> Step:
        mappers = tuple(self._mapper(question, c, ilen) for c in chunks)

        def after_map(gens: Sequence[Generation]) -> Step:
            notes = [g.text.strip() for g in gens]
            # Notes that found nothing only cost reducer tokens; keep them all if none found
            # anything, so the reducer can still say so.
            useful = [n for n in notes if not _is_refusal(n, NOTHING_RELEVANT)] or notes

            def build(k: int) -> GenerationRequest:
                notes_text = format_notes(useful[:k])
                return self._answer_call("reduce", notes=notes_text, question=question)

            _, reducer = self._longest_fitting(len(useful), build)

            def finish(final: Sequence[Generation]) -> SynthesisResult:
                return SynthesisResult(
                    answer=final[0].text.strip(),
                    confidence=final[0].confidence,
                    intermediate=tuple(notes),
                    used_chunk_ids=tuple(c.id for c in chunks),
                )

            return Step("reduce", (reducer,), finish)

        return Step("map", mappers, after_map)

    def _mapper(self, question: str, chunk: Chunk, ilen: int) -> GenerationRequest:
        # Words are ~0.75 tokens; the token budget is enforced by max_tokens regardless.
        words = max(5, int(ilen * 0.75))
        return self._call(
            "map",
            "map",
            ilen,
            False,
            chunk=format_passage(1, chunk),
            question=question,
            max_words=words,
        )

    def _longest_fitting(
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
        """Every call `config` will make, with its prompt and output budget in tokens."""
        step = self.plan(config, question, chunks)
        out = [
            CallEstimate(step.name, self.prompt_tokens(r.messages), r.max_tokens)
            for r in step.requests
        ]
        if config.method == "map_reduce":
            assert config.intermediate_length is not None
            n = min(config.num_chunks, len(chunks))
            empty = self._answer_call("reduce", notes="", question=question)
            bound = self.prompt_tokens(empty.messages) + n * (
                config.intermediate_length + NOTE_OVERHEAD_TOKENS
            )
            out.append(
                CallEstimate(
                    "reduce", min(bound, self.max_model_len - empty.max_tokens), empty.max_tokens
                )
            )
        return out

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
        )

    def _header_tokens(self, titles: Sequence[str]) -> dict[str, int]:
        new = sorted({t for t in titles if t not in self._title_tokens})
        header = [format_passage(1, Chunk("", "", "", title=t)) for t in new]
        self._title_tokens.update(zip(new, self.tokenizer.count_many(header), strict=True))
        return {t: self._title_tokens[t] for t in titles}

    @cached_property
    def _empty_prompt_tokens(self) -> dict[str, int]:
        """Each template's prompt tokens with its passage and question slots empty."""
        blank = {"question": "", "chunk": "", "context": "", "notes": ""}
        return {
            "map_rerank": self.prompt_tokens(self.templates["map_rerank"].render(**blank)),
            "stuff": self.prompt_tokens(self.templates["stuff"].render(**blank)),
            # The widest word budget (3 digits) bounds every real one.
            "map": self.prompt_tokens(self.templates["map"].render(**blank, max_words=999)),
            "reduce": self.prompt_tokens(self.templates["reduce"].render(**blank)),
        }

    def question_overhead(self, question: str) -> int:
        """Tokens of the smallest prompt this question can make (a stuff prompt with no
        passages) plus the answer budget: what must fit before any chunk does."""
        call = self._answer_call("stuff", context="", question=question)
        return self.prompt_tokens(call.messages) + call.max_tokens
