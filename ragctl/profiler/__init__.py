"""The LLM query profiler: prompt templates (`prompts`), the output schema and its parser
(`schema`, pure), and the `Profiler` that calls an engine (`profiler`)."""

from __future__ import annotations

from ragctl.profiler.profiler import (
    FeedbackExamples,
    ProfileOutcome,
    Profiler,
)
from ragctl.profiler.prompts import TEMPLATE_VERSIONS, FeedbackExample, load_profiler_template
from ragctl.profiler.schema import (
    PROFILE_SCHEMA,
    parse_profile,
    profile_confidence,
    profile_to_json,
)

__all__ = [
    "PROFILE_SCHEMA",
    "TEMPLATE_VERSIONS",
    "FeedbackExample",
    "FeedbackExamples",
    "ProfileOutcome",
    "Profiler",
    "load_profiler_template",
    "parse_profile",
    "profile_confidence",
    "profile_to_json",
]
