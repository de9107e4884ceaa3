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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ragctl.errors import ProfilerError
from ragctl.types import Complexity, Pieces, Profile, SummaryTokens


class ProfileJSON(BaseModel):
    """The profiler's JSON, field for field in the order the prompt gives them: the one
    definition of both the engine's schema (`PROFILE_SCHEMA`) and `parse_profile`'s checks."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    complexity: Complexity
    joint: Literal["yes", "no"]
    pieces: Pieces
    summary_min: SummaryTokens
    summary_max: SummaryTokens

    @field_validator("joint", mode="before")
    @classmethod
    def _joint_bool(cls, value: Any) -> Any:
        """A JSON boolean is read too (endpoints that do not enforce the schema)."""
        return ("yes" if value else "no") if isinstance(value, bool) else value


def _engine_schema() -> dict[str, Any]:
    """`ProfileJSON`'s JSON schema without pydantic's `title`s, in the shape vLLM's structured
    output takes: per-field type/enum/minimum/maximum, all required, nothing else allowed."""
    schema = ProfileJSON.model_json_schema()
    props = {
        k: {key: v for key, v in p.items() if key != "title"}
        for k, p in schema["properties"].items()
    }
    return {
        "type": "object",
        "properties": props,
        "required": schema["required"],
        "additionalProperties": schema["additionalProperties"],
    }


PROFILE_SCHEMA: dict[str, Any] = _engine_schema()
FIELDS = tuple(PROFILE_SCHEMA["properties"])
"""The keys of the profiler's JSON, in the order the schema (and the prompt) gives them."""

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
    try:
        wire = ProfileJSON.model_validate(data)
    except ValidationError as e:
        raise ProfilerError(_reason(e, text)) from None
    if confidence is not None and not (0.0 <= confidence <= 1.0):
        raise ProfilerError(f"confidence must be in [0, 1], got {confidence!r}")
    lo, hi = sorted((wire.summary_min, wire.summary_max))  # a reversed range: module docstring
    return Profile(wire.complexity, wire.joint == "yes", wire.pieces, (lo, hi), confidence)


def _reason(error: ValidationError, text: str) -> str:
    """pydantic's errors as one line: the missing keys, else the unknown ones, else what is wrong
    with the first bad value (the bounds and choices read from the schema)."""
    errors = error.errors()
    for kind, label in (("missing", "missing"), ("extra_forbidden", "unknown")):
        if keys := [str(e["loc"][0]) for e in errors if e["type"] == kind]:
            return f"{label} field {', '.join(sorted(keys, key=_order))}: {_clip(text)}"
    first = errors[0]
    key, value = str(first["loc"][0]), first["input"]
    prop = PROFILE_SCHEMA["properties"][key]
    if "enum" in prop:
        return f"{key} must be {' or '.join(json.dumps(v) for v in prop['enum'])}, got {value!r}"
    if first["type"] == "int_type":
        return f"{key} must be an integer, got {value!r}"
    return f"{key} must be in {prop['minimum']}-{prop['maximum']}, got {value!r}"


def _order(key: str) -> tuple[int, str]:
    """Schema keys in schema order, unknown ones after them in alphabetical order."""
    return (FIELDS.index(key), "") if key in FIELDS else (len(FIELDS), key)


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


def _clip(text: str, limit: int = 80) -> str:
    """The offending output, on one line and short."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")
