"""The rules-file schema: strict pydantic models plus the checks that span several fields.

Every model forbids unknown keys and coerces nothing (a quoted `"3"` is not a number), so a typo
in a rules file is an error rather than a silently ignored line.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from ragctl.errors import RulesError
from ragctl.synthesis import registry
from ragctl.synthesis.registry import MAX_CHUNKS
from ragctl.types import PIECES_RANGE, SUMMARY_RANGE, TAKES_INTERMEDIATE, Profile

PROFILE_FIELDS = ("complexity", "joint_reasoning", "pieces", "summary_length")
"""The Profile fields a rule may read, in Profile order (fields_read reports in this order)."""

FROM_SUMMARY = "from_summary_length"

# Union tags pydantic puts into an error's `loc`; they name no key of the YAML file.
UNION_TAGS = frozenset({"per-piece", "range", "from-summary"})


class RuleProblem(RulesError):
    """A check across fields failed; `loc` is the path of the offending field, like pydantic's.
    Not a ValueError on purpose: pydantic lets it through instead of re-rooting its loc."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(f"{format_loc(loc)}: {msg}")
        self.loc = loc
        self.msg = msg


def format_loc(loc: tuple[str | int, ...]) -> str:
    """`('rules', 1, 'then', 'methods')` -> `rules[1].then.methods` (union tags dropped)."""
    out = ""
    for part in loc:
        if part in UNION_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _ordered(value: list[int]) -> list[int]:
    lo, hi = value
    if lo > hi:
        raise ValueError(f"range [{lo}, {hi}] is reversed: write [low, high]")
    return value


PositiveInt = Annotated[int, Field(ge=1)]
Range = Annotated[list[PositiveInt], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
"""`[low, high]`, inclusive, both >= 1."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PiecesBound(_Strict):
    """`pieces: {min: 3, max: 10}`: the profile's pieces within these bounds (inclusive)."""

    min: int | None = Field(None, ge=PIECES_RANGE[0], le=PIECES_RANGE[1])
    max: int | None = Field(None, ge=PIECES_RANGE[0], le=PIECES_RANGE[1])

    @model_validator(mode="after")
    def _order(self) -> PiecesBound:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def contains(self, n: int) -> bool:
        return (self.min is None or n >= self.min) and (self.max is None or n <= self.max)


class When(_Strict):
    """A rule's condition; every key given must hold. Empty or absent: matches every profile."""

    complexity: Literal["high", "low"] | None = None
    joint_reasoning: bool | None = None
    pieces: PiecesBound | None = None

    def matches(self, profile: Profile) -> bool:
        return (
            (self.complexity is None or profile.complexity == self.complexity)
            and (self.joint_reasoning is None or profile.joint_reasoning == self.joint_reasoning)
            and (self.pieces is None or self.pieces.contains(profile.pieces))
        )

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(
            k for k in ("complexity", "joint_reasoning", "pieces") if getattr(self, k) is not None
        )

    def describe(self) -> str:
        parts = []
        if self.complexity is not None:
            parts.append(f"complexity={self.complexity}")
        if self.joint_reasoning is not None:
            parts.append(f"joint_reasoning={str(self.joint_reasoning).lower()}")
        if self.pieces is not None:
            lo = self.pieces.min if self.pieces.min is not None else PIECES_RANGE[0]
            hi = self.pieces.max if self.pieces.max is not None else PIECES_RANGE[1]
            parts.append(f"pieces in {lo}-{hi}")
        return ", ".join(parts) or "(always)"


class PerPiece(_Strict):
    """`num_chunks: {per_piece: [a, b]}`: the range [a*n, b*n] for a profile with n pieces."""

    per_piece: Range


def _num_chunks_form(value: Any) -> str | None:
    if isinstance(value, dict | PerPiece):
        return "per-piece"
    if isinstance(value, list):
        return "range"
    return None


def _intermediate_form(value: Any) -> str | None:
    if isinstance(value, str):
        return "from-summary"
    if isinstance(value, list):
        return "range"
    return None


NumChunks = Annotated[
    Annotated[PerPiece, Tag("per-piece")] | Annotated[Range, Tag("range")],
    Discriminator(
        _num_chunks_form,
        custom_error_type="num_chunks_form",
        custom_error_message="expected a range [low, high] or {per_piece: [a, b]}",
    ),
]
IntermediateLength = Annotated[
    Annotated[Literal["from_summary_length"], Tag("from-summary")] | Annotated[Range, Tag("range")],
    Discriminator(
        _intermediate_form,
        custom_error_type="intermediate_length_form",
        custom_error_message=f"expected a range [low, high] or {FROM_SUMMARY}",
    ),
]
Methods = Annotated[list[Annotated[str, AfterValidator(registry.known)]], Field(min_length=1)]


class Then(_Strict):
    """The pruned space a rule yields."""

    methods: Methods
    num_chunks: NumChunks
    intermediate_length: IntermediateLength | None = None
    """map_reduce's summary budget; required when a method takes one, refused otherwise."""

    @property
    def per_piece(self) -> bool:
        return isinstance(self.num_chunks, PerPiece)

    @property
    def from_summary(self) -> bool:
        return self.intermediate_length == FROM_SUMMARY


class FixedSpace(_Strict):
    """A space that reads no profile: `default_space`, used with no trusted profile and no
    history, and when no rule matches."""

    methods: Methods
    num_chunks: Range
    intermediate_length: Range | None = None


class Rule(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    when: When = Field(default_factory=When)
    then: Then

    @field_validator("when", mode="before")
    @classmethod
    def _empty_when(cls, value: Any) -> Any:
        return {} if value is None else value  # `when:` with nothing after it: always

    @property
    def fields_read(self) -> tuple[str, ...]:
        """The Profile fields this rule reads, in Profile order."""
        read = set(self.when.keys)
        if self.then.per_piece:
            read.add("pieces")
        if self.then.from_summary:
            read.add("summary_length")
        return tuple(f for f in PROFILE_FIELDS if f in read)


class Limits(_Strict):
    max_chunks: int = Field(MAX_CHUNKS, ge=1)
    """No space asks for more chunks than this (ranges are clipped to [1, max_chunks])."""
    intermediate_values: int = Field(3, ge=1)
    """How many evenly spaced intermediate_length values a range yields (ends included;
    1 gives the midpoint)."""


class RuleSet(_Strict):
    version: Literal[1]
    name: str = ""
    description: str = ""
    limits: Limits = Field(default_factory=Limits)
    rules: list[Rule] = Field(default_factory=list)
    """First match wins, in order."""
    default_space: FixedSpace

    @property
    def fields_read(self) -> tuple[str, ...]:
        """The Profile fields any rule reads, in Profile order."""
        read = {f for rule in self.rules for f in rule.fields_read}
        return tuple(f for f in PROFILE_FIELDS if f in read)

    @property
    def max_num_chunks(self) -> int:
        """The most chunks any evaluation can ask for: retrieve this many once, take prefixes."""
        highs = [self.default_space.num_chunks[1]]
        for rule in self.rules:
            nc = rule.then.num_chunks
            if isinstance(nc, PerPiece):
                bound = rule.when.pieces
                n = bound.max if bound is not None and bound.max is not None else PIECES_RANGE[1]
                highs.append(nc.per_piece[1] * n)
            else:
                highs.append(nc[1])
        return min(max(highs), self.limits.max_chunks)

    @model_validator(mode="after")
    def _cross_checks(self) -> RuleSet:
        for loc, msg in _problems(self):
            raise RuleProblem(loc, msg)
        return self


def _space_problems(
    loc: tuple[str | int, ...], methods: list[str], num_chunks: Any, ilen: Any, limits: Limits
) -> list[tuple[tuple[str | int, ...], str]]:
    out: list[tuple[tuple[str | int, ...], str]] = []
    dup = next((m for i, m in enumerate(methods) if m in methods[:i]), None)
    if dup is not None:
        out.append(((*loc, "methods"), f"{dup} is listed twice"))
    takes = [m for m in methods if m in TAKES_INTERMEDIATE]
    if takes and ilen is None:
        out.append(((*loc, "intermediate_length"), f"{takes[0]} needs an intermediate_length"))
    if not takes and ilen is not None:
        only = " or ".join(sorted(TAKES_INTERMEDIATE))
        out.append(((*loc, "intermediate_length"), f"applies to {only} only, which methods lacks"))
    low = num_chunks.per_piece[0] if isinstance(num_chunks, PerPiece) else num_chunks[0]
    if low > limits.max_chunks:
        what = "per_piece" if isinstance(num_chunks, PerPiece) else "num_chunks"
        out.append(
            (
                (*loc, "num_chunks"),
                f"{what} low {low} is above limits.max_chunks {limits.max_chunks}",
            )
        )
    return out


def _problems(rs: RuleSet) -> list[tuple[tuple[str | int, ...], str]]:
    """Checks that span fields, in file order (the loader reports the first)."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    seen: dict[str, int] = {}
    # Every profile the rules can tell apart: summary_length is never tested by a condition.
    probes = [
        Profile(c, j, n, SUMMARY_RANGE)
        for c, j, n in itertools.product(
            ("high", "low"), (True, False), range(PIECES_RANGE[0], PIECES_RANGE[1] + 1)
        )
    ]
    taken: set[int] = set()
    for i, rule in enumerate(rs.rules):
        if rule.name in seen:
            out.append((("rules", i, "name"), f"{rule.name!r} is also rules[{seen[rule.name]}]"))
        seen.setdefault(rule.name, i)
        t = rule.then
        out += _space_problems(
            ("rules", i, "then"), t.methods, t.num_chunks, t.intermediate_length, rs.limits
        )
        # A rule every one of whose profiles an earlier rule already takes can never fire:
        # almost always a mistake in the order.
        mine = {k for k, p in enumerate(probes) if rule.when.matches(p)}
        if mine <= taken:
            out.append(
                (
                    ("rules", i, "when"),
                    "never matches: earlier rules take every profile it matches (first match wins)",
                )
            )
        taken |= mine
    d = rs.default_space
    out += _space_problems(
        ("default_space",), d.methods, d.num_chunks, d.intermediate_length, rs.limits
    )
    return out


__all__ = [
    "FROM_SUMMARY",
    "PROFILE_FIELDS",
    "FixedSpace",
    "Limits",
    "PerPiece",
    "PiecesBound",
    "Rule",
    "RuleProblem",
    "RuleSet",
    "Then",
    "When",
]
