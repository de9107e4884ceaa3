"""The profiler against the real engine: the in-process vLLM with the embedded SmolLM2-135M, and a
separate vLLM OpenAI-compatible server as the profiler endpoint. The 135M model proves the
mechanics (structured output that always parses, confidence from real log-probs, feedback in the
prompt, failures as outcomes), not the quality of its profiles: no test asserts profile values."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
import yaml

from ragctl.engine.base import Engine
from ragctl.engine.remote import RemoteEngine
from ragctl.profiler import Profiler, profile_confidence
from ragctl.profiler.beliefs import FIELD_VALUES
from ragctl.profiler.calibration import decision_confidence
from ragctl.profiler.fields import DEFAULT_TOP_LOGPROBS, FieldProfiler
from ragctl.profiler.prompts import load_field_template
from ragctl.resources import data_folder
from ragctl.service import open_profiler
from ragctl.settings import Settings
from ragctl.types import Generation, GenerationRequest, KVState

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def card(name: str) -> tuple[str, int]:
    """A dataset card's metadata line and chunk size in tokens."""
    data = yaml.safe_load((data_folder("datasets") / f"{name}.yaml").read_text())
    return " ".join(data["metadata"].split()), int(data["chunking"]["max_tokens"])


QUESTIONS = [
    ("squad", "In what country is Normandy located?"),  # one fact
    ("squad", "When did Beyonce start becoming popular?"),
    ("musique", "Who is the spouse of the Green performer?"),  # multi-hop
    ("musique", "What is the capital of the country where the director of Jaws was born?"),
    ("musique", "Compare the careers of the two founders of the band and explain why it split."),
]


class UnusedEngine(Engine):
    """A serving engine the profiler must not touch (it has its own endpoint)."""

    name = "unused"
    max_model_len = 4096

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        raise AssertionError("the serving engine was used for profiling")

    async def kv_state(self) -> KVState:
        raise AssertionError("the serving engine was used for profiling")

    async def aclose(self) -> None:
        raise AssertionError("the profiler closed the serving engine")


async def test_real_questions_give_valid_profiles(local_engine) -> None:
    prof = Profiler(local_engine)
    outcomes = await asyncio.gather(
        *(prof.profile(q, *card(ds), collection=ds) for ds, q in QUESTIONS)
    )
    for (ds, q), out in zip(QUESTIONS, outcomes, strict=True):
        assert out.error is None, (q, out.error, out.raw)
        p = out.profile
        assert p.complexity in ("high", "low") and isinstance(p.joint_reasoning, bool)
        assert 1 <= p.pieces <= 10 and 30 <= p.summary_length[0] <= p.summary_length[1] <= 200
        assert p.confidence is not None and 0.0 < p.confidence <= 1.0
        assert json.loads(out.raw)  # the raw output is the JSON the profile came from
        assert out.finish_reason == "stop" and 0 < out.output_tokens < prof.max_tokens
        req = prof.profile_request(q, *card(ds), collection=ds)
        assert out.prompt_tokens == local_engine.tokenizer.count_chat(req.messages)
        assert out.template == "v1" and out.examples == 0 and out.seconds > 0


async def test_grammar_forced_tokens_have_logprob_zero_and_are_left_out(local_engine) -> None:
    """What `profile_confidence` relies on: vLLM masks the logits with the JSON grammar before it
    computes log-probs, so forced tokens (the end-of-sequence after `}`, ...) come back as 0.0."""
    prof = Profiler(local_engine)
    [gen] = await local_engine.generate([prof.profile_request(QUESTIONS[2][1], *card("musique"))])
    lps = gen.token_logprobs
    assert lps is not None and len(lps) == gen.output_tokens
    assert lps[-1] == 0.0  # the end of sequence, the only token the grammar allows after `}`
    assert any(lp < 0.0 for lp in lps)
    # Counting the forced tokens would only raise the figure.
    assert profile_confidence(lps) < gen.confidence


async def test_feedback_becomes_an_example_in_the_next_prompt(local_engine) -> None:
    metadata, chunk_tokens = card("musique")
    prof = Profiler(local_engine)
    question = "What is the capital of the country where the director of Jaws was born?"
    before = await prof.profile("Who founded the label of Thriller?", metadata, chunk_tokens)
    corrected = await prof.feedback(
        question,
        metadata,
        chunk_tokens,
        golden_answer="Washington, D.C.",
        golden_notes=[
            "Jaws (1975) was directed by Steven Spielberg.",
            "nothing relevant",
            "Steven Spielberg was born in Cincinnati, Ohio, in the United States.",
            "The capital of the United States is Washington, D.C.",
        ],
    )
    assert corrected is not None, prof.last_feedback
    assert prof.last_feedback.error is None and prof.last_feedback.template == "v1"
    [example] = prof.examples.get(metadata)
    assert example.question == question and example.profile == corrected
    text = "\n".join(m.content for m in prof.profile_request("Q?", metadata, 512).messages)
    assert f"Question: {question}\nProfile: {{" in text
    after = await prof.profile("Who founded the label of Thriller?", metadata, chunk_tokens)
    assert after.ok and after.examples == 1
    assert after.prompt_tokens > before.prompt_tokens + 20
    # Another collection's prompt does not carry it.
    other = await prof.profile("Who founded the label of Thriller?", *card("squad"))
    assert other.examples == 0


async def test_too_small_max_tokens_is_an_outcome(local_engine) -> None:
    out = await Profiler(local_engine, max_tokens=5).profile(QUESTIONS[0][1], *card("squad"))
    assert out.profile is None and out.error_kind == "garbage"
    assert out.error.startswith("garbage: output cut off at max_tokens=5; not JSON")
    assert out.output_tokens == 5 and out.finish_reason == "length" and out.raw


async def test_timeout_is_an_outcome_and_the_engine_carries_on(local_engine) -> None:
    out = await Profiler(local_engine, timeout_s=0.01).profile(QUESTIONS[0][1], *card("squad"))
    assert (out.profile, out.error_kind) == (None, "timeout")
    assert out.error == "timeout: no profile within 0.01s" and out.seconds < 5
    again = await Profiler(local_engine).profile(QUESTIONS[0][1], *card("squad"))
    assert again.ok, again.error


async def test_open_profiler_on_a_separate_endpoint(vllm_server) -> None:
    settings = Settings(
        profiler_url=vllm_server.url, profiler_model=vllm_server.model, profiler_timeout_s=120
    )
    serving = UnusedEngine()
    for mode in ("json", "auto"):
        prof = await open_profiler(settings.with_overrides(profiler=mode), serving)
        try:
            assert isinstance(prof.engine, RemoteEngine) and prof.engine.name == vllm_server.model
            assert getattr(prof, "llm", prof).timeout_s == 120
            if mode == "auto":  # filed under the profiler's model, not the serving one's
                assert prof.model == vllm_server.model
            for ds, q in QUESTIONS[:3]:
                out = await prof.profile(q, *card(ds))
                assert out.error is None, (q, out.error, out.raw)
                assert out.profile.confidence is not None and 0.0 < out.profile.confidence <= 1.0
                assert json.loads(out.raw) and out.prompt_tokens > 100
                assert out.profiler == ("json" if mode == "json" else "llm")
        finally:
            await prof.aclose()
        assert prof.engine._client.is_closed  # opened by open_profiler, so closed by it


class Recording(Engine):
    """The real engine, with every `generate` batch and its generations recorded."""

    def __init__(self, engine: Engine) -> None:
        self.inner = engine
        self.name, self.tokenizer = engine.name, engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.batches: list[tuple[list[GenerationRequest], list[Generation]]] = []

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        gens = await self.inner.generate(requests)
        self.batches.append((list(requests), gens))
        return gens

    async def kv_state(self) -> KVState:
        return await self.inner.kv_state()


async def test_field_profiler_reads_distributions_from_one_token_answers(local_engine) -> None:
    """Four one-token calls per question in one batch, top-20 log-probs read into proper
    distributions; the four prompts share their token prefix up to the field's question."""
    engine = Recording(local_engine)
    prof = FieldProfiler(engine)
    tok = local_engine.tokenizer
    for ds, q in (QUESTIONS[0], QUESTIONS[2], QUESTIONS[3]):
        out = await prof.profile(q, *card(ds), collection=ds)
        assert out.error is None, (q, out.error, out.raw)
        reqs, gens = engine.batches[-1]
        assert len(reqs) == 4 and [g.output_tokens for g in gens] == [1, 1, 1, 1]
        for req, gen in zip(reqs, gens, strict=True):
            assert gen.top_logprobs is not None and len(gen.top_logprobs) == 1
            # the top 20 plus the sampled token, fewer where two tokens decode to one text
            assert 2 <= len(gen.top_logprobs[0]) <= DEFAULT_TOP_LOGPROBS + 1
            assert gen.prompt_tokens == len(tok.encode_request(req))
        ids = [tok.encode_request(r) for r in reqs]
        common = 0
        while len({x[common] for x in ids}) == 1:
            common += 1
        assert common > 100  # the instructions, the collection, the question
        for x, req, field in zip(ids, reqs, FIELD_VALUES, strict=True):
            assert req.tag == f"profile-{field}"
            # after the shared prefix: the field's question and the chat's end of turn
            asked = load_field_template().questions[field].text
            assert len(x) - common <= tok.count(asked) + 8, (field, len(x), common)
        b = out.beliefs
        for dist in (b.pieces, b.summary):
            assert sum(dist) == pytest.approx(1.0) and all(0.0 < p < 1.0 for p in dist)
        assert 0.0 < b.joint < 1.0 and 0.0 < b.complexity_high < 1.0
        assert out.profile.confidence == pytest.approx(decision_confidence(b))
        assert out.profile == b.to_profile(out.profile.confidence)
        assert out.prompt_tokens == sum(g.prompt_tokens for g in gens) and out.output_tokens == 4
        assert out.profiler == "llm" and out.template == "v1" and json.loads(out.raw)
        print(f"\n{q[:50]!r}: {out.seconds:.2f}s, {out.prompt_tokens} prompt tokens "
              f"(shared {common}), beliefs {b.to_dict()}")  # fmt: skip
