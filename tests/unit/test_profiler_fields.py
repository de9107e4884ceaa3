"""The field profiler (ragctl.profiler.fields) against a fake engine: its four one-token requests,
how it reads each field's distribution from top log-probs, its failure outcomes, and its
template file. With the real engine: tests/integration/test_profiler.py."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence

import pytest

from ragctl.engine.base import Engine
from ragctl.errors import EngineError, EngineTimeout
from ragctl.profiler import prompts as profiler_prompts
from ragctl.profiler.auto import AutoProfiler
from ragctl.profiler.beliefs import FIELD_VALUES, SUMMARY_BUCKETS, FieldBeliefs
from ragctl.profiler.calibration import decision_confidence
from ragctl.profiler.fields import DEFAULT_TOP_LOGPROBS, FieldProfiler, read_distribution
from ragctl.profiler.prompts import (
    FIELDS,
    TEMPLATE_VERSIONS,
    load_field_template,
    normalise_label,
    parse_field_template,
)
from ragctl.resources import data_folder
from ragctl.types import Generation, GenerationRequest, KVState, Profile

META = "Wikipedia paragraphs about films and people; one chunk = one paragraph (~100 tokens)."
QUESTION = "Who directed the film that won Best Picture in 1998?"
VALID_JSON = '{"complexity":"high","joint":"yes","pieces":3,"summary_min":60,"summary_max":120}'


def lp(p: float) -> float:
    return math.log(p)


# A hand-computed case (labels: joint false=yes true=no, complexity low=yes high=no, digits,
# summary short/average/long).
TOPS: dict[str, dict[str, float]] = {
    # yes: 0.5 + 0.1 (two spellings), no: 0.2 -> P(joint) = P(no) = 0.2 / 0.8 = 0.25
    "joint": {"Yes": lp(0.5), "No": lp(0.2), "The": lp(0.15), " yes": lp(0.1), "I": lp(0.05)},
    # no: 0.7 + 0.1 ("No", "no."), yes: 0.1 -> P(high) = P(no) = 0.8 / 0.9
    "complexity": {"No": lp(0.7), "Yes": lp(0.1), "no.": lp(0.1), "It": lp(0.05)},
    # 4..9 are missing: each gets the smallest top-k probability, 0.02; total 0.92
    "pieces": {"3": lp(0.4), "2": lp(0.3), "1": lp(0.1), "The": lp(0.05), "A": lp(0.02)},
    # "medium" is not a label (the label is "average"): it counts for nothing
    "summary": {"average": lp(0.35), "Short": lp(0.3), "medium": lp(0.2), "Long.": lp(0.1)},
}


class FieldEngine(Engine):
    """Answers each one-token call with its field's top log-probs (by the request's tag), a
    JSON-schema call with `VALID_JSON`; records every `generate` batch."""

    name = "fake"

    def __init__(
        self,
        tops: Mapping[str, Mapping[str, float] | None] = TOPS,
        *,
        tokenizer=None,
        delay: float = 0.0,
        error: BaseException | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 4096
        self.tops = tops
        self.delay = delay
        self.error = error
        self.batches: list[list[GenerationRequest]] = []

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.batches.append(list(requests))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [self._answer(r) for r in requests]

    def _answer(self, req: GenerationRequest) -> Generation:
        if req.json_schema is not None:
            return Generation(VALID_JSON, 200, 30, "stop", (-0.1,) * 30)
        top = self.tops[req.tag.removeprefix("profile-")]
        if top is None:  # an engine that returns no alternatives
            return Generation("x", 100, 1, "length")
        text = max(top, key=top.__getitem__)
        return Generation(text, 100 + len(req.tag), 1, "length", None, top_logprobs=(dict(top),))

    async def kv_state(self) -> KVState:
        return KVState(100, 100, 16)


def user_text(req: GenerationRequest) -> str:
    return req.messages[-1].content


# --- reading a distribution ---------------------------------------------------------------------


def test_read_distribution_sums_spellings_floors_missing_values_and_renormalises() -> None:
    top = {"Yes": lp(0.5), " yes": lp(0.1), "No": lp(0.2), "Maybe": lp(0.05)}
    assert read_distribution(top, ["yes", "no"]) == pytest.approx((0.75, 0.25))
    # "no" missing: it gets the least likely shown token's probability, 0.05
    only_yes = {"Yes": lp(0.5), "Maybe": lp(0.05)}
    assert read_distribution(only_yes, ["yes", "no"]) == pytest.approx((0.5 / 0.55, 0.05 / 0.55))
    assert read_distribution({"The": lp(0.9), "A": lp(0.1)}, ["yes", "no"]) is None
    assert read_distribution({}, ["yes", "no"]) is None


def test_labels_are_matched_after_stripping_space_and_punctuation_and_lowering() -> None:
    assert [normalise_label(t) for t in ("Yes", " yes", "YES.", "\nno", "'3'")] == [
        "yes",
        "yes",
        "yes",
        "no",
        "3",
    ]
    # ... but a longer word is another word
    assert read_distribution({"Not": lp(0.6), "No": lp(0.3)}, ["yes", "no"]) == pytest.approx(
        (0.5, 0.5)  # yes floored at the smallest shown probability, 0.3
    )


# --- the requests -------------------------------------------------------------------------------


def test_four_one_token_requests_share_everything_but_the_field_question() -> None:
    prof = FieldProfiler(FieldEngine())
    reqs = prof.requests(QUESTION, META, 120, collection="musique")
    template = load_field_template()
    assert [r.tag for r in reqs] == [f"profile-{f}" for f in FIELD_VALUES]
    for req in reqs:
        assert (req.max_tokens, req.temperature, req.top_logprobs) == (1, 0.0, 20)
        assert req.json_schema is None and req.choices is None
    # The system message is the same; the user message differs only in its last part.
    assert len({r.messages[0] for r in reqs}) == 1 and reqs[0].messages[0].role == "system"
    users = [user_text(r) for r in reqs]
    questions = [q.text for q in template.questions.values()]
    prefixes = {u.removesuffix(q) for u, q in zip(users, questions, strict=True)}
    assert len(prefixes) == 1
    [prefix] = prefixes
    assert all(u.endswith(q) and u != q for u, q in zip(users, questions, strict=True))
    assert META in prefix and "about 120 tokens" in prefix and f"Question: {QUESTION}" in prefix


def test_shared_prefix_is_a_token_prefix_in_the_embedded_tokenizer(tokenizer) -> None:
    """What makes the prefix cache work: the four prompts' token ids agree up to the field
    question, and differ only after it."""
    reqs = FieldProfiler(FieldEngine()).requests(QUESTION, META, 120)
    ids = [tokenizer.encode_request(r) for r in reqs]
    common = 0
    while all(len(x) > common for x in ids) and len({x[common] for x in ids}) == 1:
        common += 1
    shared_text = user_text(reqs[0]).removesuffix(load_field_template().questions["joint"].text)
    assert common >= tokenizer.count_chat((reqs[0].messages[0],)) + tokenizer.count(shared_text)
    # Only the field's question and the chat template's end of turn come after it.
    questions = load_field_template().questions.values()
    for x, q in zip(ids, questions, strict=True):
        assert len(x) - common <= tokenizer.count(q.text) + 8, q.field


def test_feedback_examples_join_the_shared_prefix(tokenizer) -> None:
    engine = FieldEngine(tokenizer=tokenizer)
    prof = FieldProfiler(engine)
    before = prof.requests(QUESTION, META, 120, collection="musique")
    got = asyncio.run(prof.feedback("Who founded X?", META, 120, "Y", ["X was founded by Y."],
                                    collection="musique"))  # fmt: skip
    assert got == Profile("high", True, 3, (60, 120), got.confidence)
    assert prof.last_feedback is not None and prof.last_feedback.ok
    after = prof.requests(QUESTION, META, 120, collection="musique")
    other = prof.requests(QUESTION, META, 120, collection="squad")
    for b, a, o in zip(before, after, other, strict=True):
        assert "Question: Who founded X?\nProfile: {" in user_text(a)
        assert user_text(b) == user_text(o)  # another collection's prompt is unchanged
    assert len({user_text(a).split("\n\n")[0] for a in after}) == 1


def test_templates_and_surface() -> None:
    prof = FieldProfiler(FieldEngine())
    assert TEMPLATE_VERSIONS[FIELDS] == "v1"
    assert prof.templates == {"fields": "v1", "feedback": "v1"}
    assert prof.top_logprobs == DEFAULT_TOP_LOGPROBS == 20
    assert prof.last_feedback is None and prof.examples.collections() == ()
    with pytest.raises(ValueError):
        prof.requests(QUESTION, META, 0)
    with pytest.raises(ValueError):
        FieldProfiler(FieldEngine(), timeout_s=0)
    with pytest.raises(ValueError):
        FieldProfiler(FieldEngine(), top_logprobs=0)


# --- profiling ----------------------------------------------------------------------------------


async def test_profile_reads_every_field_from_one_batch() -> None:
    engine = FieldEngine()
    out = await FieldProfiler(engine).profile(QUESTION, META, 120)
    assert out.ok and out.error is None and out.error_kind is None
    assert len(engine.batches) == 1 and len(engine.batches[0]) == 4  # one generate, 4 calls
    b = out.beliefs
    assert b.joint == pytest.approx(0.25)
    assert b.complexity_high == pytest.approx(0.8 / 0.9)
    expected_pieces = [0.1, 0.3, 0.4] + [0.02] * 6
    assert b.pieces == pytest.approx([p / 0.92 for p in expected_pieces])
    assert b.summary == pytest.approx((0.3 / 0.75, 0.35 / 0.75, 0.1 / 0.75))
    assert out.profile == Profile("high", False, 3, SUMMARY_BUCKETS[1], 0.75)
    assert out.profile.confidence == pytest.approx(decision_confidence(b)) == pytest.approx(0.75)
    assert out.profile == b.to_profile(decision_confidence(b))
    assert (out.profiler, out.template, out.examples) == ("llm", "v1", 0)
    # token counts summed over the four calls (the fake's prompt counts differ by tag length)
    assert out.output_tokens == 4
    assert out.prompt_tokens == sum(100 + len(f"profile-{f}") for f in FIELD_VALUES)
    raw = json.loads(out.raw)
    assert list(raw) == list(FIELD_VALUES)
    assert raw["joint"]["text"] == "Yes"
    assert list(raw["joint"]["top"]) == ["Yes", "No", "The", " yes", "I"]
    assert raw["pieces"]["top"]["3"] == round(lp(0.4), 3)
    assert out.seconds >= 0 and out.raw_beliefs is None


async def test_a_field_with_no_allowed_value_in_the_top_k_is_read_as_uniform() -> None:
    tops = {**TOPS, "pieces": {"The": lp(0.6), "Several": lp(0.3)}}
    out = await FieldProfiler(FieldEngine(tops)).profile(QUESTION, META, 120)
    assert out.ok and out.error is None and out.uniform_fields == ("pieces",)
    assert out.beliefs.pieces == pytest.approx([1 / 9] * 9)
    # the other fields are read as usual
    full = await FieldProfiler(FieldEngine()).profile(QUESTION, META, 120)
    assert out.beliefs.joint == full.beliefs.joint
    assert out.beliefs.summary == full.beliefs.summary
    assert out.to_dict()["uniform_fields"] == ["pieces"]
    assert json.loads(out.raw)["pieces"]["top"] == {"The": round(lp(0.6), 3),
                                                   "Several": round(lp(0.3), 3)}  # fmt: skip
    # a uniform decisive field caps the decision's confidence at 0.5: never trusted alone
    bare = {**TOPS, "joint": None, "summary": None}
    out = await FieldProfiler(FieldEngine(bare)).profile(QUESTION, META, 120)
    assert out.ok and out.uniform_fields == ("joint", "summary")
    assert out.beliefs.joint == 0.5 and out.profile.confidence <= 0.5


async def test_no_field_with_an_allowed_value_is_garbage() -> None:
    junk = {"The": lp(0.6), "Several": lp(0.3)}
    out = await FieldProfiler(FieldEngine(dict.fromkeys(TOPS, junk))).profile(QUESTION, META, 120)
    assert out.profile is None and out.beliefs is None and out.error_kind == "garbage"
    assert out.error == (
        "garbage: no allowed answer among the top 20 tokens for joint, complexity, pieces, summary"
    )
    assert out.output_tokens == 4 and out.prompt_tokens > 400


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (EngineTimeout("engine call timed out after 3s"), "timeout",
         "timeout: engine call timed out after 3s"),
        (EngineError("the engine died"), "engine", "engine error: the engine died"),
        (RuntimeError("boom"), "engine", "engine error: RuntimeError: boom"),
    ],
)  # fmt: skip
async def test_engine_failures_are_outcomes(error: Exception, kind: str, message: str) -> None:
    out = await FieldProfiler(FieldEngine(error=error)).profile(QUESTION, META, 120)
    assert (out.profile, out.error_kind, out.error) == (None, kind, message)
    assert (out.prompt_tokens, out.output_tokens, out.profiler) == (0, 0, "llm")


async def test_timeout_is_an_outcome() -> None:
    prof = FieldProfiler(FieldEngine(delay=1.0), timeout_s=0.05)
    out = await prof.profile(QUESTION, META, 120)
    assert (out.profile, out.error_kind) == (None, "timeout")
    assert out.error == "timeout: no profile within 0.05s" and out.seconds < 0.9


async def test_auto_profiler_wraps_it() -> None:
    auto = AutoProfiler(FieldProfiler(FieldEngine()), mode="llm")
    out = await auto.profile(QUESTION, META, 120, collection="musique")
    assert out.ok and out.profiler == "llm" and out.beliefs.joint == pytest.approx(0.25)
    assert auto.templates["fields"] == "v1" and auto.last_feedback is None


async def test_owned_engine_is_closed_once() -> None:
    closed: list[bool] = []

    class Closing(FieldEngine):
        async def aclose(self) -> None:
            closed.append(True)

    async with FieldProfiler(Closing()):
        pass
    assert closed == []
    prof = FieldProfiler(Closing(), owns_engine=True)
    async with prof:
        pass
    await prof.aclose()
    assert closed == [True]


# --- the template file --------------------------------------------------------------------------


def test_the_template_file_parses_and_covers_every_field_and_value() -> None:
    t = load_field_template()
    assert t.version == "v1" and list(t.questions) == list(FIELD_VALUES)
    assert t.template.user.rstrip().endswith("$field")
    # joint and complexity ask "is it simple?": "no" stands for joint / high
    assert t.questions["joint"].labels == {"false": "yes", "true": "no"}
    assert t.questions["complexity"].labels == {"low": "yes", "high": "no"}
    assert list(t.questions["pieces"].labels.values()) == [str(i) for i in range(1, 10)]
    # the summary question names the ranges of SUMMARY_BUCKETS
    summary = t.questions["summary"].text
    assert all(f"{lo} to {hi} tokens" in summary for lo, hi in SUMMARY_BUCKETS)
    readme = (data_folder("profiler_prompts") / "README.md").read_text()
    assert "fields.v1.txt" in readme


def test_labels_are_distinct_single_tokens_of_the_embedded_tokenizer(tokenizer) -> None:
    for q in load_field_template().questions.values():
        firsts = []
        for label in q.labels.values():
            for form in (label, label.capitalize()):
                ids = tokenizer.encode(form)
                assert len(ids) == 1, (q.field, form, ids)
            firsts.append(tokenizer.encode(label)[0])
        assert len(set(firsts)) == len(firsts), q.field


HEAD = "# fields v9: test\n[system]\nS\n[user]\nQ: $question\n$field\n"
BODIES = {
    "joint": "[field joint: true=no false=yes]\nJ?\n",
    "complexity": "[field complexity: high=no low=yes]\nC?\n",
    "pieces": "[field pieces: " + " ".join(f"{i}={i}" for i in range(1, 10)) + "]\nP?\n",
    "summary": "[field summary: short=a medium=b long=c]\nS?\n",
}


def test_parse_field_template() -> None:
    t = parse_field_template(HEAD + "".join(BODIES.values()))
    assert t.version == "v9" and t.questions["summary"].labels == {
        "short": "a", "medium": "b", "long": "c"
    }  # fmt: skip
    assert t.questions["joint"].text == "J?"
    msgs = t.template.render(question="q", field="J?")
    assert msgs[-1].content == "Q: q\nJ?"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (HEAD + BODIES["joint"], "no question for complexity, pieces, summary"),
        (HEAD + "".join(BODIES.values()) + "[field other: a=b]\nX\n", "unknown field"),
        (HEAD + "".join(BODIES.values()) + BODIES["joint"], "appears twice"),
        (HEAD + "".join(BODIES.values()).replace("false=yes", "false=No."), "distinct"),
        (HEAD + "".join(BODIES.values()).replace("high=no ", ""), "each of low, high"),
        (HEAD + "".join(BODIES.values()).replace("J?", ""), "has no question"),
        (HEAD.replace("$field\n", "") + "".join(BODIES.values()), r"must end with \$field"),
    ],
)
def test_parse_field_template_refuses_incomplete_files(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_field_template(text)


def test_beliefs_from_fields() -> None:
    b = FieldBeliefs.from_fields(
        {"joint": (0.3, 0.7), "complexity": (0.9, 0.1), "pieces": (1,) + (0,) * 8,
         "summary": (0.2, 0.2, 0.6)}
    )  # fmt: skip
    assert (b.joint, b.complexity_high, b.pieces[0], b.summary) == (0.7, 0.1, 1.0, (0.2, 0.2, 0.6))
    with pytest.raises(ValueError, match="summary"):
        FieldBeliefs.from_fields({"joint": (0.3, 0.7), "complexity": (0.9, 0.1),
                                  "pieces": (1,) + (0,) * 8})  # fmt: skip
    with pytest.raises(ValueError, match="pieces needs 9"):
        FieldBeliefs.from_fields({"joint": (0.3, 0.7), "complexity": (0.9, 0.1),
                                  "pieces": (1,), "summary": (1, 0, 0)})  # fmt: skip


def test_a_fields_file_whose_header_disagrees_with_its_name_is_refused(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "fields.v7.txt").write_text(HEAD.replace("v9", "v6") + "".join(BODIES.values()))
    monkeypatch.setattr(profiler_prompts, "data_folder", lambda name: tmp_path)
    load_field_template.cache_clear()
    try:
        with pytest.raises(ValueError, match="header says v6, the file name v7"):
            load_field_template("v7")
    finally:
        load_field_template.cache_clear()
