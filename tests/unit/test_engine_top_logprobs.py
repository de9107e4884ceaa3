"""Top log-probs in the engine layer without an engine: merging alternatives by text, and the
in-process engine's SamplingParams value and reading of vLLM's per-position Logprob dicts (the
real engine: tests/integration/test_profiler.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from ragctl.engine.base import merge_by_text
from ragctl.engine.local import LocalEngine, _logprobs_param
from ragctl.types import GenerationRequest, Message

Q = (Message("user", "q"),)


def test_merge_by_text_adds_probabilities_of_one_text_and_sorts() -> None:
    merged = merge_by_text(
        [("No", math.log(0.1)), ("Yes", math.log(0.4)), ("No", math.log(0.2)), ("x", -math.inf)]
    )
    assert list(merged) == ["Yes", "No", "x"]
    assert merged["No"] == pytest.approx(math.log(0.3))
    assert merged["Yes"] == pytest.approx(math.log(0.4))
    assert merged["x"] == -math.inf
    assert merge_by_text([("a", -math.inf), ("a", -math.inf)]) == {"a": -math.inf}


@pytest.mark.parametrize(
    ("logprobs", "top", "expected"),
    [(False, 0, None), (True, 0, 0), (False, 20, 20), (True, 5, 5)],
)
def test_sampling_params_logprobs(logprobs: bool, top: int, expected: int | None) -> None:
    req = GenerationRequest(Q, logprobs=logprobs, top_logprobs=top)
    assert _logprobs_param(req) == expected


@dataclass
class Logprob:  # vllm.logprobs.Logprob's shape
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class Decoder:
    def decode(self, ids: list[int]) -> str:
        return {7: "seven"}[ids[0]]


def test_local_engine_reads_a_position_by_decoded_text() -> None:
    fake = SimpleNamespace(tokenizer=SimpleNamespace(hf=Decoder()))
    position = {
        1: Logprob(math.log(0.4), 1, "Yes"),
        2: Logprob(math.log(0.1), 3, " yes"),
        3: Logprob(math.log(0.2), 2, "Yes"),  # another id with the same text
        7: Logprob(math.log(0.05), 4, None),  # no decoded text: the tokenizer decodes it
    }
    alts = LocalEngine._alternatives(fake, position)  # type: ignore[arg-type]
    assert list(alts) == ["Yes", " yes", "seven"]
    assert alts["Yes"] == pytest.approx(math.log(0.6))
    assert alts[" yes"] == pytest.approx(math.log(0.1))
    assert alts["seven"] == pytest.approx(math.log(0.05))
