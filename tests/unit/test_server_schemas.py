"""The server's pure parts: model names to configurations, request validation, the answer
options clients send, error bodies and stream error events. (The server itself, over HTTP with
real clients: tests/integration/test_server.py.)"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ragctl.errors import (
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    TooManyRequests,
)
from ragctl.server.app import error_type, outcome_of, stream_error
from ragctl.server.schemas import ChatCompletionRequest, CompletionRequest, served_models
from ragctl.types import AnswerOptions, Config, Message


def chat(**kw) -> ChatCompletionRequest:
    body = {"model": "ragctl/auto", "messages": [{"role": "user", "content": "q?"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def test_model_names_select_adaptive_or_fixed() -> None:
    assert chat().config("ragctl/auto") is None
    assert chat().config("ragctl/stuff") == Config("stuff", 5)
    assert chat().config("ragctl/map_reduce") == Config("map_reduce", 5, 100)
    assert chat(num_chunks=3).config("ragctl/map_rerank") == Config("map_rerank", 3)
    assert chat(method="map_reduce", intermediate_length=40).config("ragctl/auto") == Config(
        "map_reduce", 5, 40
    )
    # The method field overrides the model's method.
    assert chat(method="stuff").config("ragctl/map_reduce") == Config("stuff", 5)
    assert served_models()[0] == "ragctl/auto"


def test_bad_model_and_option_combinations() -> None:
    with pytest.raises(ModelNotFound, match="ragctl/auto"):
        chat().config("gpt-4o")
    with pytest.raises(InvalidRequest, match="name the method"):
        chat(num_chunks=3).config("ragctl/auto")
    with pytest.raises(InvalidRequest, match="map_reduce only"):
        chat(intermediate_length=30).config("ragctl/stuff")


def test_unknown_fields_are_accepted_and_shape_changing_ones_refused() -> None:
    assert chat(logit_bias={"1": 2}, seed=3, user="u").question() == "q?"
    for bad in (
        {"n": 2},
        {"messages": []},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"num_chunks": 0},
        {"max_chunks": 31},
        {"slo_ms": -1},
        {"slo_ms": float("inf")},  # JSON's 1e999: no response could echo it back
        {"deadline_ms": float("inf")},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    ):
        with pytest.raises(ValidationError):
            chat(**bad)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "ragctl/auto", "prompt": "x", "echo": True})


def test_history_and_content_parts() -> None:
    req = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "first"}]},
            {"role": "assistant", "content": "answer"},
            {"role": "tool", "content": "tool output"},
            {"role": "assistant", "content": None},
            {"role": "user", "content": [{"type": "text", "text": t} for t in ("a", "b")]},
        ]
    )
    assert req.question() == "a\nb"
    assert req.history() == (
        Message("system", "Be brief."),
        Message("user", "first"),
        Message("assistant", "answer"),
    )
    assert CompletionRequest.model_validate(
        {"model": "ragctl/auto", "prompt": ["x", "y"]}
    ).prompts() == ["x", "y"]


def test_sampling_fields_become_the_answer_options() -> None:
    assert chat().options() == AnswerOptions()
    opts = chat(max_tokens=9, temperature=0.7, top_p=0.9, stop="\n", seed=4).options()
    assert opts == AnswerOptions(9, 0.7, 0.9, ("\n",), 4)
    # OpenAI's newer name wins over max_tokens.
    assert chat(max_tokens=9, max_completion_tokens=5).options().max_tokens == 5
    assert chat(stop=["a", "b"], ignore_eos=True).options() == AnswerOptions(
        stop=("a", "b"), ignore_eos=True
    )
    comp = CompletionRequest.model_validate(
        {"model": "ragctl/auto", "prompt": "x", "max_tokens": 3, "seed": 1}
    )
    assert comp.options() == AnswerOptions(max_tokens=3, seed=1)
    assert chat(objective="latency").options() == AnswerOptions(objective="latency")
    for bad in ({"max_tokens": 0}, {"top_p": 0}, {"temperature": 3}, {"stop": ["a"] * 5},
                {"stop": [""]}, {"n": 3}, {"objective": "fastest"}):  # fmt: skip
        with pytest.raises(ValidationError):
            chat(**bad)


def test_stream_error_event_is_openai_shaped() -> None:
    e = stream_error(EngineUnavailable("the engine went away"))
    assert e == {"error": {"message": "the engine went away", "type": "server_error",
                           "param": None, "code": EngineUnavailable.code}}  # fmt: skip
    crash = stream_error(RuntimeError("boom"))["error"]
    assert crash["code"] == "internal_error" and "boom" in crash["message"]


def test_error_types_and_outcomes() -> None:
    assert error_type(401) == "authentication_error"
    assert error_type(429) == "rate_limit_error"
    assert error_type(404) == "invalid_request_error"
    assert error_type(502) == "server_error"
    assert outcome_of(TooManyRequests("x")) == outcome_of(QueueFull("x")) == "rejected"
    assert outcome_of(InvalidRequest("x")) == "invalid"
