"""The synthesis methods, one `MethodSpec` each: the one place that knows their names, stages,
planning, sizing, fallback role and defaults. Each method is a module (`map_rerank`, `stuff`,
`map_reduce`) defining its planner, sizer and `SPEC`, registered cheapest first (best-fit's
tie-break order) by `_register_builtins`; `register`/`unregister` add and remove one at run time.

Dependencies: `ragctl.types` must not import synthesis, yet `Config` validates method names, so
types keeps only the names (`METHODS`, in rank order) and which take an intermediate_length
(`TAKES_INTERMEDIATE`); `register` fills both, and `import ragctl` imports this module first.
The memory model (`scheduler.memory.NeedTable`) imports nothing from synthesis: `CallSizer.stages`
hands it each stage's call sizes (`StageSize`) and it only does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ragctl import types
from ragctl.types import Chunk, Config, Generation, GenerationRequest, SynthesisResult

if TYPE_CHECKING:
    from ragctl.synthesis.methods import CallSizer, Synthesizer

MAX_CHUNKS = 30
"""The most chunks any configuration uses (the paper's largest setting; the rules' default
limit and the server's bound)."""


@dataclass(frozen=True)
class Step:
    """One stage of a method: calls to submit together, and what to do with their results."""

    name: str
    requests: tuple[GenerationRequest, ...]
    finish: Callable[[Sequence[Generation]], Step | SynthesisResult]
    streams: bool = False
    """Its one call's text is the answer (stuff's answer, map_reduce's reducer): the controller
    streams it to the client token by token. Other final steps (map_rerank's selection) give
    the answer in one piece when they finish."""

    def __post_init__(self) -> None:
        if self.streams and len(self.requests) != 1:
            raise ValueError(f"a streaming step makes exactly one call, {self.name} makes more")


@dataclass(frozen=True)
class CallEstimate:
    """A call's size before it runs: exact prompt tokens where the prompt is known (a method's
    first stage), an upper bound for later stages (map_reduce's reducer: every note at its full
    budget)."""

    stage: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class StageSize:
    """How one stage's calls grow with the chunk count n: a `per_chunk` stage makes `call(i)`
    for every chunk i < n, submitted together; any other makes one call, `call(n)`, over the
    first n chunks. `call` gives (prompt tokens, max tokens)."""

    name: str
    call: Callable[[int], tuple[int, int]]
    per_chunk: bool = False

    def calls(self, n: int) -> list[CallEstimate]:
        return [
            CallEstimate(self.name, *self.call(i)) for i in (range(n) if self.per_chunk else [n])
        ]


Planner = Callable[["Synthesizer", Config, str, tuple[Chunk, ...]], Step]
"""(synthesizer, config, question, chunks: the first num_chunks, at least one) -> first Step."""
Sizer = Callable[["CallSizer", Config], tuple[StageSize, ...]]
"""(per-query sizer, config) -> the sizes of each stage's calls, in stage order."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stages: tuple[str, ...]
    """Stage names in order: the `Step.name`s its plan yields, the SLO loop's stages."""
    templates: tuple[str, ...]
    """Prompt templates it renders (`templates/<name>.txt`)."""
    plan: Planner
    size: Sizer
    fallback: Literal["", "independent", "joint"] = ""
    """Its role when nothing in a space fits (`bestfit.fallback_configs`): `independent` answers
    from each chunk on its own (without joint reasoning), `joint` reads the chunks together."""
    default_chunks: int = 5
    intermediate_length: int | None = None
    """Its default intermediate_length; None: it takes none."""
    components: tuple[str, ...] = ()
    """The allocation component of each stage (`ragctl allocate`); default: the stage name."""

    @property
    def stage_components(self) -> tuple[str, ...]:
        return self.components or self.stages

    @property
    def takes_intermediate(self) -> bool:
        return self.intermediate_length is not None

    def fixed_config(self, num_chunks: int | None = None, ilen: int | None = None) -> Config:
        """What a fixed request for this method runs: its defaults where unset."""
        if self.takes_intermediate:
            ilen = ilen or self.intermediate_length
        return Config(self.name, num_chunks or self.default_chunks, ilen)


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    """Add a method after the registered ones (it ranks above them in best-fit's tie-break)."""
    if spec.name in _SPECS:
        raise ValueError(f"synthesis method {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    types.METHODS.append(spec.name)
    if spec.takes_intermediate:
        types.TAKES_INTERMEDIATE.add(spec.name)


def unregister(name: str) -> None:
    del _SPECS[name]
    types.METHODS.remove(name)
    types.TAKES_INTERMEDIATE.discard(name)


def spec(name: str) -> MethodSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown synthesis method {name!r}; choose one of {tuple(_SPECS)}")
    return _SPECS[name]


def specs() -> tuple[MethodSpec, ...]:
    """Every registered method, cheapest first."""
    return tuple(_SPECS.values())


def known(name: str) -> str:
    """`name`, when a method is registered under it (a validator for method fields)."""
    return spec(name).name


def stage_components() -> dict[str, str]:
    """Synthesis stage name (`StageRecord.name`) -> allocation component."""
    return {st: c for s in specs() for st, c in zip(s.stages, s.stage_components, strict=True)}


def _register_builtins() -> None:
    from ragctl.synthesis import map_reduce, map_rerank, stuff

    for s in (map_rerank.SPEC, stuff.SPEC, map_reduce.SPEC):
        register(s)


_register_builtins()

GOLDEN_CONFIG = Config("map_reduce", MAX_CHUNKS, 300)
"""The most expensive configuration: what a query "should" have looked like (paper section 4.1)."""
