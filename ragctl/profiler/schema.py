"""The profiler's output format: the JSON schema the engine's structured output enforces, and the
parser that turns the model's text into a `Profile` (pure: no engine, no I/O).

The JSON the profiler LLM writes, e.g.
`{"complexity":"high","joint":"yes","pieces":3,"summary_min":60,"summary_max":120}`:

- keys are short (the output is paid for token by token, and each key is written once per query)
  but still words the model can read: `joint` is the profile's `joint_reasoning`;
- `joint` is the string `"yes"`/`"no"` (what the prompt asks and what a small model writes most
  readily); the parser also takes a JSON boolean, for endpoints that do not enforce the schema;
- the summary length range is two integers, not a nested array, so each bound is one plain
  integer field with its own 30-200 limits in the grammar.

A reversed range (`summary_min > summary_max`) is swapped, not rejected: the two numbers still
bound the range the model meant, and the grammar cannot prevent the order slip (JSON schema has
no cross-field constraint). Everything else that is not exactly the schema is a `ProfilerError`
with a one-line reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from ragctl.errors import ProfilerError
from ragctl.types import PIECES_RANGE, SUMMARY_RANGE, Profile

FIELDS = ("complexity", "joint", "pieces", "summary_min", "summary_max")
"""The keys of the profiler's JSON, in the order the schema (and the prompt) gives them."""

PROFILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "complexity": {"type": "string", "enum": ["high", "low"]},
        "joint": {"type": "string", "enum": ["yes", "no"]},
        "pieces": {"type": "integer", "minimum": PIECES_RANGE[0], "maximum": PIECES_RANGE[1]},
        "summary_min": {
            "type": "integer",
            "minimum": SUMMARY_RANGE[0],
            "maximum": SUMMARY_RANGE[1],
        },
        "summary_max": {
            "type": "integer",
            "minimum": SUMMARY_RANGE[0],
            "maximum": SUMMARY_RANGE[1],
        },
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def parse_profile(text: str, confidence: float | None = None) -> Profile:
    """The `Profile` in the profiler's JSON `text`, carrying `confidence`; `ProfilerError` with a
    one-line reason when the text is not exactly the schema's object (a Markdown code fence
    around it is tolerated, for endpoints that do not enforce the schema)."""
    body = text.strip()
    if m := _FENCE.match(body):
        body = m.group(1)
    if not body:
        raise ProfilerError("empty output")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise ProfilerError(f"not JSON ({e.msg} at char {e.pos}): {_clip(text)}") from None
    if not isinstance(data, dict):
        raise ProfilerError(f"not a JSON object but {type(data).__name__}: {_clip(text)}")
    missing = [k for k in FIELDS if k not in data]
    if missing:
        raise ProfilerError(f"missing field {', '.join(missing)}: {_clip(text)}")
    extra = sorted(set(data) - set(FIELDS))
    if extra:
        raise ProfilerError(f"unknown field {', '.join(extra)}: {_clip(text)}")

    complexity = data["complexity"]
    if complexity not in ("high", "low"):
        raise ProfilerError(f'complexity must be "high" or "low", got {complexity!r}')
    joint = data["joint"]
    if isinstance(joint, str) and joint in ("yes", "no"):
        joint = joint == "yes"
    elif not isinstance(joint, bool):
        raise ProfilerError(f'joint must be "yes" or "no", got {joint!r}')
    pieces = _integer(data, "pieces", PIECES_RANGE)
    lo = _integer(data, "summary_min", SUMMARY_RANGE)
    hi = _integer(data, "summary_max", SUMMARY_RANGE)
    if lo > hi:
        lo, hi = hi, lo  # a reversed range: see the module docstring
    if confidence is not None and not (0.0 <= confidence <= 1.0):
        raise ProfilerError(f"confidence must be in [0, 1], got {confidence!r}")
    return Profile(complexity, joint, pieces, (lo, hi), confidence)


def profile_to_json(profile: Profile) -> str:
    """The profile as the profiler LLM writes it (compact, schema keys, no confidence): the
    form of a few-shot example, and what `parse_profile` reads back."""
    data = {
        "complexity": profile.complexity,
        "joint": "yes" if profile.joint_reasoning else "no",
        "pieces": profile.pieces,
        "summary_min": profile.summary_length[0],
        "summary_max": profile.summary_length[1],
    }
    return json.dumps(data, separators=(",", ":"))


def profile_confidence(token_logprobs: Sequence[float] | None) -> float | None:
    """exp(mean log-prob) of the tokens the model chose, leaving out the tokens the JSON grammar
    forced; None when the engine returned no log-probs.

    vLLM applies the grammar's token mask to the logits before it computes log-probs, so a token
    the grammar forces (the only one allowed) has log-prob exactly 0.0: the `_` of
    `summary_min`, the zeros of `200` once `2` is written (nothing above 200 is allowed), the
    end-of-sequence token after `}`. They say nothing about the model's belief, yet averaged in
    they would pull the geometric mean up. (A free token the model was certain of to float32
    precision, probability above 1 - 6e-8, looks the same and is left out too.)

    Measured with the embedded SmolLM2-135M (profile v1, six questions of four collections):
    3-7 of 32-48 output tokens forced; exp(mean) over all tokens 0.83-0.89, over the chosen ones
    0.80-0.87. Tokens the grammar leaves free but that decide nothing do pull it down: `{`
    versus `{"` (log-prob about -0.6), the first line break (-0.6), `",` versus `","`; without
    the prompt's one-line format line the key spellings did too (`complexity` written as
    `c`,`omp`,`lex`,`ity`, -2 in all). Over the value tokens alone (found with the token ids,
    which `Generation` does not carry) it was 0.64-0.73. So the figure measures the whole
    answer's certainty, formatting included; thresholds are to be set on it as it is.
    """
    if not token_logprobs:
        return None
    finite = [lp for lp in token_logprobs if math.isfinite(lp)]
    if not finite:
        return 0.0  # as `Generation.confidence`: nothing but impossible tokens
    chosen = [lp for lp in finite if lp != 0.0]
    if not chosen:
        return 1.0  # the grammar forced every token
    return math.exp(sum(chosen) / len(chosen))


def _integer(data: dict[str, Any], key: str, bounds: tuple[int, int]) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfilerError(f"{key} must be an integer, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise ProfilerError(f"{key} must be in {bounds[0]}-{bounds[1]}, got {value}")
    return value


def _clip(text: str, limit: int = 80) -> str:
    """The offending output, on one line and short."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")
