"""The records that travel along the data path, as frozen dataclasses.

Policy code (synthesis planning, later rules and the scheduler) takes and returns only these;
engines, retrieval and the controller produce and consume them at the edges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

Method = str
"""A synthesis method's name, one of METHODS."""
METHODS: list[Method] = []
"""The synthesis methods, cheapest first: filled by `ragctl.synthesis.registry.register`, which
owns everything else about them (types must not import synthesis)."""
TAKES_INTERMEDIATE: set[Method] = set()
"""The methods that take an intermediate_length (map_reduce's summary budget)."""


@dataclass(frozen=True)
class Query:
    """A question, with its references when it comes from an evaluation set."""

    id: str
    question: str
    answers: tuple[str, ...] = ()
    gold_doc_ids: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Dataset-specific fields (hops, query_type, question_type, ...)."""


@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a document."""

    id: str
    doc_id: str
    text: str
    title: str = ""
    n_tokens: int = 0
    """Length of `text` in tokens of the serving model's tokenizer."""
    score: float | None = None
    """Retrieval similarity (inner product of normalised embeddings), when retrieved."""


@dataclass(frozen=True)
class Config:
    """One RAG configuration: how many chunks, and how to combine them."""

    method: Method
    num_chunks: int
    intermediate_length: int | None = None
    """Mapper output budget in tokens; only for the methods in TAKES_INTERMEDIATE (map_reduce)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"unknown synthesis method {self.method!r}; choose one of {tuple(METHODS)}"
            )
        if self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {self.num_chunks}")
        if self.method in TAKES_INTERMEDIATE:
            if self.intermediate_length is None or self.intermediate_length < 1:
                raise ValueError(f"{self.method} needs intermediate_length >= 1")
        elif self.intermediate_length is not None:
            only = " and ".join(sorted(TAKES_INTERMEDIATE))
            raise ValueError(f"intermediate_length applies to {only} only, not {self.method}")

    @property
    def label(self) -> str:
        """`method:chunks[:ilen]`, the spelling `parse` reads back."""
        base = f"{self.method}:{self.num_chunks}"
        return f"{base}:{self.intermediate_length}" if self.intermediate_length else base

    @classmethod
    def parse(cls, text: str) -> Config:
        """Read `method:chunks[:ilen]`, e.g. `stuff:5` or `map_reduce:6:100`."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
            raise ValueError(f"config {text!r} is not method:chunks[:intermediate_length]")
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(
                f"config {text!r}: chunks and intermediate_length are integers"
            ) from None
        return cls(parts[0], nums[0], nums[1] if len(nums) == 2 else None)  # type: ignore[arg-type]


Complexity = Literal["high", "low"]
PIECES_RANGE = (1, 10)
SUMMARY_RANGE = (30, 200)
Pieces = Annotated[int, Field(ge=PIECES_RANGE[0], le=PIECES_RANGE[1])]
SummaryTokens = Annotated[int, Field(ge=SUMMARY_RANGE[0], le=SUMMARY_RANGE[1])]
"""The profile's bounded integers, shared with the profiler's wire format (`profiler.schema`)."""


@pydantic_dataclass(frozen=True, config=ConfigDict(strict=True))
class Profile:
    """What the LLM profiler says about a query (RAGServe/METIS section 4.1); pydantic validates
    the fields strictly (no coercion: `pieces=True` or `joint_reasoning="yes"` is a ValueError)."""

    complexity: Complexity
    joint_reasoning: bool
    """Whether the answer needs several pieces of information read together."""
    pieces: Pieces
    summary_length: tuple[SummaryTokens, SummaryTokens]
    """Range of tokens a per-chunk summary needs (map_reduce's intermediate_length), lo <= hi."""
    confidence: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """exp(mean log-prob) of the profiler's answer tokens, in [0, 1]; None when not measured."""

    def __post_init__(self) -> None:
        if self.summary_length[0] > self.summary_length[1]:
            raise ValueError(f"summary_length must be a range lo <= hi, got {self.summary_length}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "complexity": self.complexity,
            "joint_reasoning": self.joint_reasoning,
            "pieces": self.pieces,
            "summary_length": list(self.summary_length),
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class ConfigSpace:
    """A pruned configuration space: what the rules allow for one query."""

    methods: tuple[Method, ...]
    num_chunks: tuple[int, int]
    """Inclusive range."""
    intermediate_lengths: tuple[int, ...] = ()
    """The summary budgets map_reduce may use (empty when no method taking one is allowed)."""
    source: str = ""
    """Where the space came from: the rule's name, `history`, or `default`."""

    def __post_init__(self) -> None:
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(
                f"methods must be a non-empty subset of {tuple(METHODS)}: {self.methods!r}"
            )
        lo, hi = self.num_chunks
        if not 1 <= lo <= hi:
            raise ValueError(f"num_chunks must be a range 1 <= lo <= hi, got {self.num_chunks!r}")
        needs = next((m for m in self.methods if m in TAKES_INTERMEDIATE), None)
        if needs is not None and not self.intermediate_lengths:
            raise ValueError(f"a space with {needs} needs intermediate_lengths")
        if any(n < 1 for n in self.intermediate_lengths):
            raise ValueError(f"intermediate_lengths must be >= 1: {self.intermediate_lengths!r}")

    def configs(self) -> tuple[Config, ...]:
        """Every configuration in the space, in a stable order."""
        out: list[Config] = []
        for method in self.methods:
            for n in range(self.num_chunks[0], self.num_chunks[1] + 1):
                if method in TAKES_INTERMEDIATE:
                    out.extend(Config(method, n, il) for il in self.intermediate_lengths)
                else:
                    out.append(Config(method, n))
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "num_chunks": list(self.num_chunks),
            "intermediate_lengths": list(self.intermediate_lengths),
            "source": self.source,
        }


PlanReason = Literal["fit", "fallback", "wait"]
Objective = Literal["quality", "balanced", "latency"]
OBJECTIVES: tuple[Objective, ...] = ("quality", "balanced", "latency")


@dataclass(frozen=True)
class Candidate:
    """One configuration best-fit considered: its KV need, predicted delay and quality, and
    its score under the objective (larger wins; see `scheduler.objective`)."""

    config: Config
    need_blocks: int
    delay_s: float | None = None
    quality: float | None = None
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {
            "config": self.config.label,
            "need_blocks": self.need_blocks,
            "delay_s": r(self.delay_s),
            "quality": r(self.quality),
            "score": r(self.score),
        }


@dataclass(frozen=True)
class Choice:
    """How the objective chose among the fitting candidates (on a Plan and its Decision)."""

    objective: Objective
    why: str
    """Why the chosen candidate won, in words."""
    fitting: int
    """Candidates that fitted (the recorded ones are the top by score)."""
    candidates: tuple[Candidate, ...] = ()
    """The fitting candidates with the best scores, best first (the chosen one always)."""
    delay_source: str = ""
    """Where the delays come from: `fitted`, `measured` or `prior` (see `DelayModel.source`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "why": self.why,
            "fitting": self.fitting,
            "recorded": f"top {len(self.candidates)} of {self.fitting} fitting, by score",
            "delay_source": self.delay_source,
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass(frozen=True)
class Plan:
    """The best-fit scheduler's decision for one query, as data."""

    config: Config | None
    """None when `reason` is `wait`: not even the smallest configuration fits now."""
    reason: PlanReason
    """`fit`: the largest configuration of the space that fits; `fallback`: none of the space
    fits, a cheaper one outside it does; `wait`: queue until KV blocks free up."""
    need_blocks: int
    """KV blocks the chosen configuration needs (the smallest one's when waiting)."""
    free_blocks: int
    """Free blocks the engine showed."""
    reserved_blocks: int
    """Blocks in-flight plans have reserved that the engine does not show yet."""
    slo_action: str = ""
    """Set when the SLO loop changed the choice (see `scheduler.slo.choose_within_slo`)."""
    choice: Choice | None = None
    """The candidates and the objective's reasoning (None: plain best-fit, no cost model)."""

    @property
    def available_blocks(self) -> int:
        return self.free_blocks - self.reserved_blocks


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One LLM call, engine-neutral: chat `messages` (the model's chat template applies) or a
    raw `prompt` (sent as is)."""

    messages: tuple[Message, ...] = ()
    max_tokens: int = 256
    temperature: float = 0.0
    logprobs: bool = False
    """Return the log-prob of every generated token."""
    top_logprobs: int = 0
    """Also return the `top_logprobs` most likely alternatives at every generated position
    (0: none; vLLM serves at most 20 unless started with a larger `max_logprobs`)."""
    json_schema: Mapping[str, Any] | None = None
    """Constrain the output to JSON matching this schema (structured output)."""
    choices: tuple[str, ...] | None = None
    """Constrain the output to exactly one of these strings."""
    priority: int = 0
    """Engine priority; lower runs first (vLLM priority scheduling)."""
    tag: str = ""
    """Free text carried into logs and request ids (e.g. the stage name)."""
    prompt: str | None = None
    """A raw completion prompt, instead of `messages`."""
    ignore_eos: bool = False
    """Generate exactly `max_tokens` (benchmarks and load profiles that need fixed lengths)."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Stop sequences (not part of the output)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (not self.messages):
            raise ValueError("a generation request needs either messages or a prompt, not both")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass(frozen=True)
class AnswerOptions:
    """What a client asks of the answer (OpenAI's sampling fields), applied to the final
    stage's calls only (stuff's answer, map_reduce's reducer, map_rerank's per-chunk answers);
    None: the collection's default. `max_tokens` above the collection's answer budget is
    clamped to it, because the KV plan is sized from the budget (`Synthesizer.for_request`)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    """vLLM's extension: generate exactly max_tokens (benchmarks of streaming and TTFT)."""
    objective: Objective | None = None
    """Best-fit's objective for this request (adaptive path only); None: the policy's."""
    ask_profiler: bool = False
    """Ask the profiler even where the adaptive path would leave it unasked (`ragctl profiler
    bench`, which measures it); such a profile does not count in the objective's trust record."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError("stop takes at most 4 non-empty strings")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")


@dataclass(frozen=True)
class Generation:
    """What the engine returned for one GenerationRequest."""

    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None = None
    token_logprobs: tuple[float, ...] | None = None
    seconds: float = 0.0
    top_logprobs: tuple[Mapping[str, float], ...] | None = None
    """Per generated position, when the request asked for `top_logprobs`: decoded token text
    -> log-prob of at least the top-k alternatives (tokens that decode to the same text merged:
    their probabilities added)."""

    @property
    def confidence(self) -> float | None:
        """Geometric-mean token probability of the output: exp(mean log-prob), in [0, 1]."""
        if not self.token_logprobs:
            return None
        finite = [lp for lp in self.token_logprobs if math.isfinite(lp)]
        if not finite:
            return 0.0
        return math.exp(sum(finite) / len(finite))


@dataclass(frozen=True)
class KVState:
    """The engine's KV cache, in blocks of `block_size` tokens."""

    total_blocks: int
    """Blocks usable by requests (vLLM keeps one null block aside)."""
    free_blocks: int
    block_size: int
    source: str = ""
    """Where the figure came from: `engine-step` (in-process, exact as of the last engine step)
    or `metrics` (remote /metrics gauge, may lag by a stats interval)."""

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    @property
    def usage(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0


@dataclass(frozen=True)
class StageRecord:
    """One synthesis stage as it ran: its calls, tokens and wall time."""

    name: str
    calls: int
    prompt_tokens: int
    output_tokens: int
    seconds: float


@dataclass(frozen=True)
class SynthesisResult:
    """What a synthesis method concluded from its generations."""

    answer: str
    confidence: float | None = None
    """map_rerank: the winning answer's confidence; otherwise the answer call's, if asked."""
    source_chunk_id: str | None = None
    """map_rerank: the chunk whose answer won."""
    intermediate: tuple[str, ...] = ()
    """map_reduce: the mapper notes, in chunk order."""
    used_chunk_ids: tuple[str, ...] = ()
    """The chunks that reached the engine (stuff keeps the longest prefix that fits the
    context window)."""


@dataclass(frozen=True)
class SLORecord:
    """What the SLO loop did for one request (on its Decision)."""

    slo_ms: float
    mitigation: str
    predicted_ms: float | None = None
    """Synthesis time predicted at planning time for the chosen configuration."""
    plan_action: str = "none"
    """At planning: none, cheaper-config, below-profile (under the profile's minimum: nothing in
    the pruned space was predicted to meet the SLO), unmeetable (the fastest that fitted) or shed
    (refused: `SLOUnmeetable`)."""
    flagged: bool = False
    """Predicted to miss while in flight."""
    boosted_calls: int = 0
    """Engine calls sent with a better priority because the request was flagged."""
    demoted_calls: int = 0
    """Engine calls sent with a worse priority because the request was hopeless (triage)."""
    paused_ms: float = 0.0
    """Time this request waited at the admission gate for flagged requests."""
    held_ms: float = 0.0
    """Time this request was held, planned, before its first engine call, so that its prefill
    would not push a request in flight past its deadline (SLO mitigation `hold`)."""
    projected_ms: float | None = None
    """Synthesis time predicted when its synthesis started (under the load then), before the
    prefills started beside it: what holding projected it from."""
    stalls_ms: float = 0.0
    """Prefill time of the stages other requests started beside it (by the engine's step
    costs where it reports them, else by the delay model)."""
    hold_own_ms: float | None = None
    """Its own synthesis time as holding last read it, when it released the request (None:
    not held): what to hold against the synthesis time it took."""
    delay_ms: float | None = None
    met: bool | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """Why this answer was produced the way it was."""

    config: Config
    reason: str
    """`fixed`: the caller chose the configuration; `fit`: the largest configuration of the
    pruned space that fitted the free KV cache; `fallback`: none of the space fitted, a cheaper
    configuration did."""
    kv: KVState | None = None
    """The engine's KV state when the configuration was chosen."""
    templates: Mapping[str, str] = field(default_factory=dict)
    """Prompt template versions used (name -> version), so results can be traced to wording."""
    profile: Profile | None = None
    """The profiler's answer (None: fixed configuration, or the profiler failed)."""
    profile_used: bool = False
    """Whether the pruned space came from this query's profile."""
    profile_note: str = ""
    """Why the profile was not used: `low-confidence 0.62 < 0.90`, `profiler error: timeout`."""
    space: ConfigSpace | None = None
    """The pruned space the scheduler chose from; its `source` says which rule, `history` or
    `default` produced it."""
    need_blocks: int | None = None
    """KV blocks the chosen configuration was estimated to need."""
    reserved_blocks: int | None = None
    """Blocks in-flight plans had reserved that the engine did not show yet."""
    queued: bool = False
    """Whether the request waited in the admission queue for KV memory."""
    slo: SLORecord | None = None
    """What the SLO loop did (None: the request had no SLO)."""
    profiler: str = ""
    """Which profiler gave the profile: `json`, `llm` or `learned` (empty: none ran)."""
    beliefs: Mapping[str, Any] | None = None
    """The profiler's per-field distributions (`FieldBeliefs.to_dict()`), calibrated when a
    calibration applied; None for the JSON profiler or a fixed configuration."""
    profiler_note: str = ""
    """Why the learned profiler did not answer when it was asked first (`learned unsure 0.62`,
    `learned error: ...`, `learned: no trained model`); empty when it answered or was not
    asked."""
    choice: Choice | None = None
    """Best-fit's objective, the candidates it considered (blocks, predicted delay and
    quality) and why the chosen one won; None for a fixed configuration."""
    engine: str = ""
    """The engine of the pool the plan ran on: its URL, or `in-process`."""

    @property
    def flags(self) -> tuple[str, ...]:
        """Short tags for what shaped the decision: low-confidence, profiler-error, queued."""
        out = []
        if self.profile_note.startswith("low-confidence"):
            out.append("low-confidence")
        elif self.profile_note:
            out.append("profiler-error")
        if self.queued:
            out.append("queued")
        if self.slo is not None:
            if self.slo.plan_action != "none":
                out.append(f"slo-{self.slo.plan_action}")
            if self.slo.flagged:
                out.append("slo-flagged")
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        kv = self.kv
        return {
            "method": self.config.method,
            "num_chunks": self.config.num_chunks,
            "intermediate_length": self.config.intermediate_length,
            "reason": self.reason,
            "flags": list(self.flags),
            "profile": None if self.profile is None else self.profile.to_dict(),
            "profile_used": self.profile_used,
            "profile_note": self.profile_note,
            "profiler": self.profiler,
            "profiler_note": self.profiler_note,
            "beliefs": None if self.beliefs is None else dict(self.beliefs),
            "space": None if self.space is None else self.space.to_dict(),
            "kv": None
            if kv is None
            else {
                "total_blocks": kv.total_blocks,
                "free_blocks": kv.free_blocks,
                "block_size": kv.block_size,
                "source": kv.source,
            },
            "need_blocks": self.need_blocks,
            "reserved_blocks": self.reserved_blocks,
            "queued": self.queued,
            "slo": None if self.slo is None else self.slo.to_dict(),
            "choice": None if self.choice is None else self.choice.to_dict(),
            "engine": self.engine,
            "templates": dict(self.templates),
        }


@dataclass(frozen=True)
class Answer:
    """An answer with everything needed to account for it."""

    question: str
    text: str
    decision: Decision
    chunks: tuple[Chunk, ...]
    stages: tuple[StageRecord, ...]
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per stage of the data path: retrieve, synthesis (and its stages), total, and
    `ttft`: arrival to the first answer token (map_rerank: to the chosen answer)."""
    synthesis: SynthesisResult | None = None
    finish_reason: str = "stop"
    """The final call's: `stop`, or `length` when the answer budget (max_tokens) cut it."""
    max_tokens: int | None = None
    """The answer budget it ran with (the request's max_tokens, at most the collection's)."""

    @property
    def chunk_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.chunks)

    @property
    def tokens(self) -> dict[str, int]:
        return {
            "calls": sum(s.calls for s in self.stages),
            "prompt": sum(s.prompt_tokens for s in self.stages),
            "output": sum(s.output_tokens for s in self.stages),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the CLI's --json and, later, the server's `ragctl` field)."""
        d = self.decision
        return {
            "question": self.question,
            "answer": self.text,
            "config": d.config.label,
            "decision": d.to_dict(),
            "chunk_ids": list(self.chunk_ids),
            "doc_ids": list(dict.fromkeys(c.doc_id for c in self.chunks)),
            "tokens": self.tokens,
            "stages": [vars(s) for s in self.stages],
            "timings": dict(self.timings),
            "confidence": self.synthesis.confidence if self.synthesis else None,
            "source_chunk_id": self.synthesis.source_chunk_id if self.synthesis else None,
            "finish_reason": self.finish_reason,
            "max_tokens": self.max_tokens,
        }


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
        """From a `retrieval.index.Retriever` (its dataset card); a generic description for a
        retriever without one."""
        card = getattr(retriever, "card", None)
        if card is None:
            return cls("default", "a document collection", 256)
        return cls(card.name, card.metadata, card.chunking.size)
