"""The profiler's schema, parser, prompts and failure policy (pure: a fake engine returns canned
generations; the real tokenizer counts tokens). With the real engine:
tests/integration/test_profiler.py."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import replace

import pytest

from ragctl.engine.base import Engine
from ragctl.errors import EngineError, EngineTimeout, ProfilerError, PromptTooLong
from ragctl.profiler import (
    PROFILE_SCHEMA,
    FeedbackExample,
    FeedbackExamples,
    Profiler,
    load_profiler_template,
    parse_profile,
    profile_confidence,
    profile_to_json,
)
from ragctl.profiler import prompts as profiler_prompts
from ragctl.service import open_profiler
from ragctl.settings import Settings
from ragctl.types import (
    PIECES_RANGE,
    SUMMARY_RANGE,
    Generation,
    GenerationRequest,
    KVState,
    Profile,
)

META = "Wikipedia paragraphs about films and people; one chunk = one paragraph (~100 tokens)."
VALID = '{"complexity":"high","joint":"yes","pieces":3,"summary_min":60,"summary_max":120}'


class FakeEngine(Engine):
    """Answers every call with `reply` (after `delay` seconds), or raises `error`."""

    name = "fake"

    def __init__(
        self,
        tokenizer,
        reply: str | Generation = VALID,
        *,
        delay: float = 0.0,
        error: BaseException | None = None,
        max_model_len: int = 4096,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.reply = reply
        self.delay = delay
        self.error = error
        self.requests: list[GenerationRequest] = []
        self.closed = False

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.requests.extend(requests)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        if isinstance(self.reply, Generation):
            return [self.reply for _ in requests]
        return [Generation(self.reply, 300, 30, "stop", (-0.1,) * 30) for _ in requests]

    async def kv_state(self) -> KVState:
        return KVState(100, 100, 16)

    async def aclose(self) -> None:
        self.closed = True


def prompt_text(req: GenerationRequest) -> str:
    return "\n".join(m.content for m in req.messages)


def as_json(**changes: object) -> str:
    data = json.loads(VALID)
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...})


# --- schema and parser ---------------------------------------------------------------------------


def test_schema_requires_every_field_and_bounds_the_numbers() -> None:
    props = PROFILE_SCHEMA["properties"]
    assert PROFILE_SCHEMA["additionalProperties"] is False
    assert sorted(PROFILE_SCHEMA["required"]) == sorted(props)
    assert props["complexity"]["enum"] == ["high", "low"]
    assert props["joint"]["enum"] == ["yes", "no"]
    assert (props["pieces"]["minimum"], props["pieces"]["maximum"]) == PIECES_RANGE
    for key in ("summary_min", "summary_max"):
        assert (props[key]["minimum"], props[key]["maximum"]) == SUMMARY_RANGE


def test_engine_schema_is_the_plain_json_schema_vllm_was_sent_before() -> None:
    bounded = {"type": "integer", "minimum": 30, "maximum": 200}
    assert PROFILE_SCHEMA == {
        "type": "object",
        "properties": {
            "complexity": {"type": "string", "enum": ["high", "low"]},
            "joint": {"type": "string", "enum": ["yes", "no"]},
            "pieces": {"type": "integer", "minimum": 1, "maximum": 10},
            "summary_min": bounded,
            "summary_max": bounded,
        },
        "required": ["complexity", "joint", "pieces", "summary_min", "summary_max"],
        "additionalProperties": False,
    }
    assert list(PROFILE_SCHEMA["properties"]) == PROFILE_SCHEMA["required"]  # the prompt's order


@pytest.mark.parametrize("key", ["pieces", "summary_min", "summary_max"])
def test_schema_bounds_and_validation_agree(key: str) -> None:
    prop = PROFILE_SCHEMA["properties"][key]
    lo, hi = prop["minimum"], prop["maximum"]
    for ok in (lo, hi):
        both = {"summary_min": ok, "summary_max": ok} if key.startswith("summary") else {key: ok}
        profile = parse_profile(as_json(**both))
        assert ok == (profile.pieces if key == "pieces" else profile.summary_length[0])
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ProfilerError, match=f"{key} must be in {lo}-{hi}, got {bad}$"):
            parse_profile(as_json(**{key: bad}))
    # Profile itself takes the same bounds (no stricter, no looser).
    field = "pieces" if key == "pieces" else "summary_length"
    base = Profile("low", False, 1, (30, 30))
    for ok in (lo, hi):
        replace(base, **{field: ok if field == "pieces" else (ok, ok)})
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError):
            replace(base, **{field: bad if field == "pieces" else (bad, bad)})


def test_schema_enums_and_validation_agree() -> None:
    for key in ("complexity", "joint"):
        for value in PROFILE_SCHEMA["properties"][key]["enum"]:
            parse_profile(as_json(**{key: value}))
        with pytest.raises(ProfilerError, match=f"^{key} must be "):
            parse_profile(as_json(**{key: "other"}))


def test_parse_valid_profile_compact_and_pretty() -> None:
    expected = Profile("high", True, 3, (60, 120), 0.9)
    assert parse_profile(VALID, 0.9) == expected
    pretty = json.dumps(json.loads(VALID), indent=2)
    assert parse_profile(pretty, 0.9) == expected
    assert parse_profile(f"```json\n{VALID}\n```", 0.9) == expected
    low = parse_profile(as_json(complexity="low", joint="no", pieces=1), None)
    assert low == Profile("low", False, 1, (60, 120), None)
    # A JSON boolean is read too (endpoints that do not enforce the schema).
    assert parse_profile(as_json(joint=False), None).joint_reasoning is False


def test_parse_swaps_a_reversed_summary_range() -> None:
    assert parse_profile(as_json(summary_min=150, summary_max=40)).summary_length == (40, 150)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty output"),
        ("   \n", "empty output"),
        ("The question is complex.", "not JSON"),
        ('{"complexity":"high","joint":"yes","pieces":3,"summ', "not JSON"),
        ("[1, 2]", "not a JSON object but list"),
        ('"high"', "not a JSON object but str"),
        (as_json(pieces=...), "missing field pieces"),
        (as_json(summary_min=..., summary_max=...), "missing field summary_min, summary_max"),
        (as_json(reason="x"), "unknown field reason"),
        (as_json(complexity="medium"), 'complexity must be "high" or "low"'),
        (as_json(complexity=1), 'complexity must be "high" or "low"'),
        (as_json(joint="maybe"), 'joint must be "yes" or "no"'),
        (as_json(joint=1), 'joint must be "yes" or "no"'),
        (as_json(pieces="3"), "pieces must be an integer, got '3'"),
        (as_json(pieces=3.0), "pieces must be an integer, got 3.0"),
        (as_json(pieces=True), "pieces must be an integer, got True"),
        (as_json(pieces=0), "pieces must be in 1-10, got 0"),
        (as_json(pieces=11), "pieces must be in 1-10, got 11"),
        (as_json(summary_min=20), "summary_min must be in 30-200, got 20"),
        (as_json(summary_max=500), "summary_max must be in 30-200, got 500"),
        (as_json(summary_max=None), "summary_max must be an integer, got None"),
    ],
)
def test_parse_garbage_names_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ProfilerError) as err:
        parse_profile(text, 0.5)
    assert reason in str(err.value)
    assert "\n" not in str(err.value)


def test_parse_rejects_a_confidence_outside_0_1() -> None:
    with pytest.raises(ProfilerError, match=r"confidence must be in \[0, 1\]"):
        parse_profile(VALID, 1.5)


@pytest.mark.parametrize(
    "profile",
    [
        Profile("high", True, 3, (60, 120)),
        Profile("low", False, 1, (30, 30)),
        Profile("high", False, 10, (30, 200)),
    ],
)
def test_profile_to_json_is_what_the_model_writes_and_reads_back(profile: Profile) -> None:
    text = profile_to_json(profile)
    assert " " not in text and "confidence" not in text
    assert sorted(json.loads(text)) == sorted(PROFILE_SCHEMA["properties"])
    assert parse_profile(text, 0.7) == Profile(
        profile.complexity, profile.joint_reasoning, profile.pieces, profile.summary_length, 0.7
    )


def test_confidence_leaves_out_grammar_forced_tokens() -> None:
    lps = (0.0, -0.5, 0.0, -0.5, 0.0)
    assert profile_confidence(lps) == pytest.approx(math.exp(-0.5))
    # Counting the forced tokens would inflate it.
    assert Generation("x", 1, 5, token_logprobs=lps).confidence > profile_confidence(lps)
    assert profile_confidence((0.0, 0.0)) == 1.0
    assert profile_confidence((float("-inf"),)) == 0.0
    assert profile_confidence((float("-inf"), -1.0)) == pytest.approx(math.exp(-1.0))
    assert profile_confidence(None) is None
    assert profile_confidence(()) is None


# --- templates -----------------------------------------------------------------------------------


def test_templates_carry_their_version_and_placeholders() -> None:
    profile = load_profiler_template("profile")
    feedback = load_profiler_template("feedback", "v1")
    assert (profile.version, feedback.version) == ("v1", "v1")
    for name in ("$metadata", "$chunk_tokens", "$examples", "$question"):
        assert name in profile.user
    for name in ("$metadata", "$chunk_tokens", "$question", "$notes", "$answer"):
        assert name in feedback.user
    for t in (profile, feedback):
        for key in PROFILE_SCHEMA["properties"]:
            assert f'"{key}"' in t.system  # every field is explained


def test_a_template_whose_header_disagrees_with_its_file_name_is_refused(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "profile.v7.txt").write_text("# profile v6: copied\n[user]\n$question\n")
    monkeypatch.setattr(profiler_prompts, "data_folder", lambda name: tmp_path)
    profiler_prompts.load_profiler_template.cache_clear()
    try:
        with pytest.raises(ValueError, match="header says v6"):
            load_profiler_template("profile", "v7")
    finally:
        profiler_prompts.load_profiler_template.cache_clear()


# --- requests ------------------------------------------------------------------------------------


def test_profile_request_carries_metadata_chunk_size_and_structured_output(tokenizer) -> None:
    prof = Profiler(FakeEngine(tokenizer), max_tokens=77)
    req = prof.profile_request("Who directed Jaws?", META, 512)
    text = prompt_text(req)
    assert META in text and "about 512 tokens" in text and "Question: Who directed Jaws?" in text
    assert "$" not in text  # every placeholder filled
    assert "earlier questions" not in text  # no examples yet
    assert req.json_schema == PROFILE_SCHEMA
    assert (req.temperature, req.logprobs, req.max_tokens) == (0.0, True, 77)
    assert prof.templates == {"profile": "v1", "feedback": "v1"}


def test_chunk_tokens_must_be_positive(tokenizer) -> None:
    prof = Profiler(FakeEngine(tokenizer))
    with pytest.raises(ValueError, match="chunk_tokens"):
        prof.profile_request("q?", META, 0)


def test_feedback_request_drops_empty_notes_and_keeps_what_fits(tokenizer) -> None:
    notes = ["nothing relevant", "Jaws was directed by Steven Spielberg.", "Nothing relevant."]
    notes += [f"Note {i}: " + "word " * 200 for i in range(40)]
    engine = FakeEngine(tokenizer, max_model_len=2048)
    prof = Profiler(engine)
    req = prof.feedback_request("Where was the director of Jaws born?", META, 100, "Ohio", notes)
    text = prompt_text(req)
    assert "[1] Jaws was directed by Steven Spielberg." in text
    assert "nothing relevant" not in text.lower()
    assert "Answer it found: Ohio" in text and "about 100 tokens" in text
    assert "[2] Note 0:" in text and "Note 39:" not in text  # kept in order, the tail dropped
    assert tokenizer.count_chat(req.messages) + req.max_tokens <= engine.max_model_len
    assert tokenizer.count_chat(req.messages) + req.max_tokens > engine.max_model_len - 300
    empty = prompt_text(prof.feedback_request("q?", META, 100, "", ["nothing relevant"]))
    assert "(no chunk held anything relevant)" in empty and "(no answer)" in empty


# --- calls and failures --------------------------------------------------------------------------


async def test_profile_returns_the_profile_with_confidence_and_accounting(tokenizer) -> None:
    lps = (0.0, -0.2, -0.2, 0.0)
    reply = Generation(VALID, 321, 4, "stop", lps, seconds=0.1)
    out = await Profiler(FakeEngine(tokenizer, reply)).profile("q?", META, 128)
    assert out.ok and out.error is None and out.error_kind is None
    assert replace(out.profile, confidence=None) == Profile("high", True, 3, (60, 120))
    assert out.profile.confidence == pytest.approx(math.exp(-0.2))
    assert (out.prompt_tokens, out.output_tokens, out.raw, out.template) == (321, 4, VALID, "v1")
    assert out.seconds > 0 and out.to_dict()["profile"]["pieces"] == 3


async def test_no_logprobs_gives_a_profile_without_confidence(tokenizer) -> None:
    reply = Generation(VALID, 10, 30, "stop", None)
    out = await Profiler(FakeEngine(tokenizer, reply)).profile("q?", META, 128)
    assert out.ok and out.profile.confidence is None


async def test_timeout_is_an_outcome_not_an_exception(tokenizer) -> None:
    prof = Profiler(FakeEngine(tokenizer, delay=30), timeout_s=0.05)
    out = await prof.profile("q?", META, 128)
    assert out.profile is None and out.error_kind == "timeout"
    assert out.error == "timeout: no profile within 0.05s"
    assert out.seconds < 5


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (EngineError("connection refused"), "engine", "engine error: connection refused"),
        (PromptTooLong("prompt of 5000 tokens"), "engine", "engine error: prompt of 5000 tokens"),
        (EngineTimeout("timed out after 3s"), "timeout", "timeout: timed out after 3s"),
        (RuntimeError("bug"), "engine", "engine error: RuntimeError: bug"),
    ],
)
async def test_engine_errors_are_outcomes(tokenizer, error, kind, message) -> None:
    out = await Profiler(FakeEngine(tokenizer, error=error)).profile("q?", META, 128)
    assert (out.profile, out.error_kind, out.error) == (None, kind, message)


async def test_garbage_is_an_outcome_with_the_raw_text(tokenizer) -> None:
    out = await Profiler(FakeEngine(tokenizer, "I think it is hard.")).profile("q?", META, 128)
    assert out.error_kind == "garbage" and out.error.startswith("garbage: not JSON")
    assert out.raw == "I think it is hard." and out.output_tokens == 30
    cut = Generation('{"complexity":"high","jo', 300, 8, "length", (-0.1,) * 8)
    out = await Profiler(FakeEngine(tokenizer, cut), max_tokens=8).profile("q?", META, 128)
    assert out.error.startswith("garbage: output cut off at max_tokens=8; not JSON")
    out = await Profiler(FakeEngine(tokenizer, as_json(pieces=42))).profile("q?", META, 128)
    assert out.error == "garbage: pieces must be in 1-10, got 42"


async def test_feedback_adds_an_example_that_the_next_prompt_shows(tokenizer) -> None:
    corrected = as_json(complexity="low", joint="no", pieces=1, summary_min=30, summary_max=40)
    engine = FakeEngine(tokenizer, corrected)
    prof = Profiler(engine)
    fb = await prof.feedback("Who  directed\nJaws?", META, 128, "Spielberg", ["Jaws: Spielberg."])
    assert replace(fb, confidence=None) == Profile("low", False, 1, (30, 40))
    assert fb.confidence == pytest.approx(math.exp(-0.1))
    assert "Jaws: Spielberg." in prompt_text(engine.requests[-1])
    assert engine.requests[-1].json_schema == PROFILE_SCHEMA
    req = prof.profile_request("Who wrote Jaws?", META, 128)
    text = prompt_text(req)
    assert "earlier questions of this collection" in text
    assert f"Question: Who directed Jaws?\nProfile: {profile_to_json(fb)}" in text
    assert text.rindex("Question: Who wrote Jaws?") > text.index("Profile: ")
    out = await prof.profile("Who wrote Jaws?", META, 128)
    assert out.examples == 1


async def test_examples_stay_with_their_collection(tokenizer) -> None:
    prof = Profiler(FakeEngine(tokenizer))
    await prof.feedback("A question about films?", META, 128, "x", ["n"], collection="films")
    other = prompt_text(prof.profile_request("q?", "Other metadata.", 128, collection="finance"))
    same = prompt_text(prof.profile_request("q?", "Other metadata.", 128, collection="films"))
    assert "A question about films?" not in other
    assert "A question about films?" in same
    # Without a collection name the metadata line is the key.
    await prof.feedback("Keyed by metadata?", META, 128, "x", ["n"])
    assert "Keyed by metadata?" in prompt_text(prof.profile_request("q?", META, 128))
    assert "Keyed by metadata?" not in prompt_text(prof.profile_request("q?", "Else.", 128))


async def test_feedback_keeps_the_last_k_examples(tokenizer) -> None:
    prof = Profiler(FakeEngine(tokenizer), max_examples=2)
    for i in range(3):
        assert await prof.feedback(f"Question {i}?", META, 128, "a", ["n"], collection="c")
    assert [e.question for e in prof.examples.get("c")] == ["Question 1?", "Question 2?"]
    text = prompt_text(prof.profile_request("q?", META, 128, collection="c"))
    assert "Question 0?" not in text
    assert text.index("Question 1?") < text.index("Question 2?")
    none_kept = Profiler(FakeEngine(tokenizer), max_examples=0)
    await none_kept.feedback("Question?", META, 128, "a", ["n"], collection="c")
    assert none_kept.examples.get("c") == ()


def test_feedback_store_refuses_a_negative_size() -> None:
    store = FeedbackExamples(1)
    store.add("c", FeedbackExample("q", Profile("low", False, 1, (30, 40))))
    assert store.collections() == ("c",) and store.get("other") == ()
    with pytest.raises(ValueError):
        FeedbackExamples(-1)


@pytest.mark.parametrize(
    "engine_kw",
    [{"reply": "not a profile"}, {"error": EngineError("down")}, {"delay": 30}],
)
async def test_failed_feedback_keeps_nothing(tokenizer, engine_kw) -> None:
    prof = Profiler(FakeEngine(tokenizer, **engine_kw), timeout_s=0.05)
    assert await prof.feedback("q?", META, 128, "a", ["n"], collection="c") is None
    assert prof.examples.get("c") == ()
    assert prof.last_feedback is not None and prof.last_feedback.error


async def test_aclose_closes_only_an_engine_it_owns(tokenizer) -> None:
    shared, own = FakeEngine(tokenizer), FakeEngine(tokenizer)
    await Profiler(shared).aclose()
    async with Profiler(own, owns_engine=True):
        pass
    assert (shared.closed, own.closed) == (False, True)


async def test_open_profiler_without_a_url_uses_the_serving_engine(tokenizer) -> None:
    serving = FakeEngine(tokenizer)
    settings = Settings(profiler_timeout_s=7.5, golden_examples=2, profiler="json")
    prof = await open_profiler(settings, serving)
    assert isinstance(prof, Profiler)
    assert prof.engine is serving
    assert (prof.timeout_s, prof.examples.max_examples) == (7.5, 2)
    await prof.aclose()
    assert not serving.closed


@pytest.mark.parametrize("mode", ["llm", "learned", "auto"])
async def test_open_profiler_wraps_the_field_profiler(tokenizer, tmp_path, mode) -> None:
    from ragctl.profiler.auto import AutoProfiler
    from ragctl.profiler.fields import FieldProfiler

    serving = FakeEngine(tokenizer)
    settings = Settings(profiler_timeout_s=7.5, golden_examples=2, profiler=mode,
                        cache_dir=tmp_path, learned_min_confidence=0.7)  # fmt: skip
    prof = await open_profiler(settings, serving)
    assert isinstance(prof, AutoProfiler) and isinstance(prof.llm, FieldProfiler)
    assert (prof.mode, prof.state_root, prof.learned_min_confidence) == (mode, tmp_path, 0.7)
    assert prof.model == "SmolLM2-135M-Instruct"  # where `ragctl profiler train` files it
    assert prof.engine is serving and prof.llm.timeout_s == 7.5
    assert prof.examples.max_examples == 2
    await prof.aclose()
    assert not serving.closed
