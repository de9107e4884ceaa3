"""A profiler's per-field probabilities (`FieldBeliefs`): what the LLM field profiler
(`ragctl.profiler.fields`) reads from the top log-probs of its one-token answers, and what the
learned profiler predicts. `FIELD_VALUES` names each field's values, in the order of its
probabilities (the order `calibration.field_probs` uses)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ragctl.types import Profile

SUMMARY_BUCKETS = ((30, 60), (60, 120), (120, 200))
"""The summary_length ranges a profiler chooses among: short, medium, long."""
PIECES_VALUES = tuple(range(1, 10))
"""The pieces values a profiler chooses among; 9 means nine or more."""
SUMMARY_NAMES = ("short", "medium", "long")
"""Names of the SUMMARY_BUCKETS, in order."""
FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "joint": ("false", "true"),
    "complexity": ("low", "high"),
    "pieces": tuple(str(v) for v in PIECES_VALUES),
    "summary": SUMMARY_NAMES,
}
"""Each field's values by name, in the order of its probabilities: binary fields [false, true]
(complexity [low, high]), pieces 1..9, summary short/medium/long."""


@dataclass(frozen=True)
class FieldBeliefs:
    """Per-field probabilities of one query's profile."""

    joint: float
    """P(joint_reasoning)."""
    complexity_high: float
    """P(complexity == "high")."""
    pieces: tuple[float, ...]
    """P(pieces = 1..9), sums to 1."""
    summary: tuple[float, float, float]
    """P(short, medium, long), the ranges of SUMMARY_BUCKETS."""

    def __post_init__(self) -> None:
        for name in ("joint", "complexity_high"):
            p = getattr(self, name)
            if not (isinstance(p, int | float) and 0.0 <= p <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        for name, size in (("pieces", len(PIECES_VALUES)), ("summary", len(SUMMARY_BUCKETS))):
            values = getattr(self, name)
            if len(values) != size or any(not 0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"{name} must be {size} probabilities in [0, 1], got {values!r}")
            if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
                raise ValueError(f"{name} must sum to 1, got {sum(values)}")

    def expected_pieces(self) -> float:
        return float(sum(v * p for v, p in zip(PIECES_VALUES, self.pieces, strict=True)))

    def to_profile(self, confidence: float | None) -> Profile:
        """The most probable value of every field, as a `Profile`."""
        pieces = PIECES_VALUES[_argmax(self.pieces)]
        return Profile(
            complexity="high" if self.complexity_high >= 0.5 else "low",
            joint_reasoning=self.joint >= 0.5,
            pieces=pieces,
            summary_length=SUMMARY_BUCKETS[_argmax(self.summary)],
            confidence=confidence,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "joint": self.joint,
            "complexity_high": self.complexity_high,
            "pieces": list(self.pieces),
            "summary": list(self.summary),
        }

    @classmethod
    def from_fields(cls, dists: Mapping[str, Sequence[float]]) -> FieldBeliefs:
        """From one distribution per field of FIELD_VALUES, in its order of values."""
        missing = sorted(set(FIELD_VALUES) - set(dists))
        if missing:
            raise ValueError(f"no distribution for field(s) {', '.join(missing)}")
        for name, values in FIELD_VALUES.items():
            if len(dists[name]) != len(values):
                raise ValueError(
                    f"{name} needs {len(values)} probabilities, got {len(dists[name])}"
                )
        return cls(
            joint=float(dists["joint"][1]),
            complexity_high=float(dists["complexity"][1]),
            pieces=tuple(float(p) for p in dists["pieces"]),
            summary=tuple(float(p) for p in dists["summary"]),  # type: ignore[arg-type]
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FieldBeliefs:
        return cls(
            joint=float(d["joint"]),
            complexity_high=float(d["complexity_high"]),
            pieces=tuple(float(v) for v in d["pieces"]),
            summary=tuple(float(v) for v in d["summary"]),  # type: ignore[arg-type]
        )


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
