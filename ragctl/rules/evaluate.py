"""Pure evaluation: a RuleSet and a Profile in, a pruned ConfigSpace out (RAGServe/METIS
Algorithm 1), plus the merged space of recent confident queries for low-confidence profiles."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ragctl.rules.schema import FixedSpace, Limits, PerPiece, Rule, RuleSet, Then
from ragctl.types import (
    METHODS,
    PIECES_RANGE,
    SUMMARY_RANGE,
    TAKES_INTERMEDIATE,
    Config,
    ConfigSpace,
    Profile,
)


def evaluate(rules: RuleSet, profile: Profile) -> ConfigSpace:
    """The space of the first rule whose condition holds (source: its name); `default_space`
    (source `default`) when none does."""
    for rule in rules.rules:
        if rule.when.matches(profile):
            return _rule_space(rule.then, profile, rules.limits, rule.name)
    return default_space(rules)


def default_space(rules: RuleSet) -> ConfigSpace:
    """The conservative space for a query with no trusted profile and no history."""
    d: FixedSpace = rules.default_space
    return _space(d.methods, tuple(d.num_chunks), d.intermediate_length, rules.limits, "default")


def merge_spaces(spaces: Sequence[ConfigSpace]) -> ConfigSpace:
    """One space standing for several (the last confident queries of a collection): the union
    of methods, the median low and median high of num_chunks, the union of summary budgets."""
    if not spaces:
        raise ValueError("merge_spaces needs at least one space")
    present = {m for s in spaces for m in s.methods}
    methods = tuple(m for m in METHODS if m in present)
    lo = _round(statistics.median(s.num_chunks[0] for s in spaces))
    hi = _round(statistics.median(s.num_chunks[1] for s in spaces))
    # Each lo_i <= hi_i makes median(lo) <= median(hi); max() only guards the rounding.
    hi = max(lo, hi)
    ilens: tuple[int, ...] = ()
    if TAKES_INTERMEDIATE.intersection(methods):
        ilens = tuple(sorted({n for s in spaces for n in s.intermediate_lengths}))
    return ConfigSpace(methods, (lo, hi), ilens, source="history")


def span_spaces(spaces: Sequence[ConfigSpace], source: str) -> ConfigSpace:
    """The smallest space holding every one of `spaces`: the union of methods and summary
    budgets, the lowest low and the highest high of num_chunks."""
    if not spaces:
        raise ValueError("span_spaces needs at least one space")
    present = {m for s in spaces for m in s.methods}
    methods = tuple(m for m in METHODS if m in present)
    lo = min(s.num_chunks[0] for s in spaces)
    hi = max(s.num_chunks[1] for s in spaces)
    ilens: tuple[int, ...] = ()
    if TAKES_INTERMEDIATE.intersection(methods):
        ilens = tuple(sorted({n for s in spaces for n in s.intermediate_lengths}))
    return ConfigSpace(methods, (lo, hi), ilens, source=source)


def fast_corner(rules: RuleSet) -> tuple[Config, ...]:
    """Per method any rule (or the default space) can give, its least work: the fewest chunks
    and the smallest summary budget any profile can reach for it. Every configuration of every
    space `evaluate` can return has at least the prompt and the output budget of its method's
    corner configuration."""
    least: dict[str, tuple[int, int | None]] = {}  # method: (chunks, summary budget)
    thens: list[tuple[Sequence[str], int, tuple[int, int] | None]] = []
    for rule in rules.rules:
        then = rule.then
        if isinstance(then.num_chunks, PerPiece):
            lo = then.num_chunks.per_piece[0] * PIECES_RANGE[0]
        else:
            lo = then.num_chunks[0]
        if then.from_summary:
            ilen: tuple[int, int] | None = (SUMMARY_RANGE[0], SUMMARY_RANGE[0])
        else:
            ilen = None if then.intermediate_length is None else tuple(then.intermediate_length)
        thens.append((then.methods, lo, ilen))
    d = rules.default_space
    thens.append((d.methods, d.num_chunks[0], None if d.intermediate_length is None
                  else tuple(d.intermediate_length)))  # fmt: skip
    for methods, lo, ilen in thens:
        space = _space(methods, (lo, lo), ilen, rules.limits, "corner")
        for m in space.methods:
            k = space.num_chunks[0]
            il = min(space.intermediate_lengths, default=None) if m in TAKES_INTERMEDIATE else None
            k0, il0 = least.get(m, (k, il))
            least[m] = (min(k0, k), min((x for x in (il0, il) if x is not None), default=None))
    return tuple(Config(m, *least[m]) for m in METHODS if m in least)


def fields_read(rule: Rule | RuleSet) -> tuple[str, ...]:
    """The Profile fields a rule (or any rule of a set) reads, in Profile order: its condition's
    keys, `pieces` for a per-piece num_chunks, `summary_length` for from_summary_length."""
    return rule.fields_read


def intermediate_values(lo: int, hi: int, count: int) -> tuple[int, ...]:
    """`count` evenly spaced integers over [lo, hi], ends included, deduplicated (1: midpoint)."""
    if count == 1:
        return (_round((lo + hi) / 2),)
    step = (hi - lo) / (count - 1)
    return tuple(sorted({_round(lo + i * step) for i in range(count)}))


def _rule_space(then: Then, profile: Profile, limits: Limits, source: str) -> ConfigSpace:
    if isinstance(then.num_chunks, PerPiece):
        a, b = then.num_chunks.per_piece
        chunks = (a * profile.pieces, b * profile.pieces)
    else:
        chunks = (then.num_chunks[0], then.num_chunks[1])
    ilen = then.intermediate_length
    ilen_range = list(profile.summary_length) if then.from_summary else ilen
    return _space(then.methods, chunks, ilen_range, limits, source)  # type: ignore[arg-type]


def _space(
    methods: Sequence[str],
    chunks: tuple[int, int],
    ilen: Sequence[int] | None,
    limits: Limits,
    source: str,
) -> ConfigSpace:
    lo, hi = (min(max(n, 1), limits.max_chunks) for n in chunks)
    ilens: tuple[int, ...] = ()
    if TAKES_INTERMEDIATE.intersection(methods) and ilen is not None:
        ilens = intermediate_values(ilen[0], ilen[1], limits.intermediate_values)
    return ConfigSpace(tuple(methods), (lo, hi), ilens, source)  # type: ignore[arg-type]


def _round(x: float) -> int:
    """Half up, not Python's half-to-even: a median of 4.5 chunks is 5, like 5.5 is 6."""
    return math.floor(x + 0.5)
