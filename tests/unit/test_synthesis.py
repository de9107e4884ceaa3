"""Synthesis planning and combining (pure: real tokenizer, generations made up per case)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ragctl.errors import InvalidRequest, PromptTooLong
from ragctl.synthesis.methods import Step, Synthesizer
from ragctl.synthesis.prompts import format_passage, load_template, parse_template
from ragctl.types import Chunk, Config, Generation, SynthesisResult


def chunk(i: int, words: int = 40) -> Chunk:
    text = f"Passage {i} says " + " ".join(f"fact{i}_{w}" for w in range(words)) + "."
    return Chunk(id=f"doc{i}::0", doc_id=f"doc{i}", text=text, title=f"Title_{i}")


def gen(text: str, logprobs: tuple[float, ...] | None = None, prompt: int = 10) -> Generation:
    return Generation(text, prompt, len(text.split()), "stop", logprobs)


@pytest.fixture
def synth(tokenizer) -> Synthesizer:
    return Synthesizer(tokenizer, max_model_len=4096, answer_max_tokens=32)


def test_templates_parse_with_versions_and_fill_every_placeholder() -> None:
    for name in ("map_rerank", "stuff", "map", "reduce"):
        t = load_template(name)
        assert t.version == "v1" and t.system and "$question" in t.user
    with pytest.raises(KeyError):
        load_template("stuff").render(question="q")  # $context missing
    with pytest.raises(ValueError):
        parse_template("broken", "[system]\nno user section")


def test_stuff_puts_every_chunk_in_one_numbered_prompt(synth: Synthesizer) -> None:
    chunks = [chunk(i) for i in range(5)]
    step = synth.plan(Config("stuff", 5), "Which facts?", chunks)
    assert step.name == "answer" and len(step.requests) == 1
    prompt = step.requests[0].messages[-1].content
    for i, c in enumerate(chunks, 1):
        assert f"[{i}] Title {i - 1}\n{c.text}" in prompt
    assert prompt.rstrip().endswith("Question: Which facts?")
    assert step.requests[0].logprobs and step.requests[0].max_tokens == 32
    result = step.finish([gen(" fact0_1 ", (-0.1, -0.2))])
    assert isinstance(result, SynthesisResult)
    assert result.answer == "fact0_1"
    assert result.used_chunk_ids == tuple(c.id for c in chunks)


def test_stuff_keeps_the_longest_prefix_that_fits(tokenizer) -> None:
    synth = Synthesizer(tokenizer, max_model_len=1024, answer_max_tokens=32)
    chunks = [chunk(i, words=60) for i in range(20)]  # far more than 1,024 tokens in all
    step = synth.plan(Config("stuff", 20), "q?", chunks)
    call = step.requests[0]
    used = step.finish([gen("a")]).used_chunk_ids
    assert 1 <= len(used) < 20
    assert synth.prompt_tokens(call.messages) + call.max_tokens <= 1024
    # One more chunk would not have fitted.
    context = "\n\n".join(format_passage(i, c) for i, c in enumerate(chunks[: len(used) + 1], 1))
    bigger = load_template("stuff").render(context=context, question="q?")
    assert synth.prompt_tokens(bigger) + 32 > 1024


def test_stuff_with_no_room_for_one_chunk_is_refused(tokenizer) -> None:
    synth = Synthesizer(tokenizer, max_model_len=120, answer_max_tokens=32)
    with pytest.raises(PromptTooLong):
        synth.plan(Config("stuff", 2), "q?", [chunk(0, words=200), chunk(1)])


def test_map_rerank_prefers_answers_then_confidence(synth: Synthesizer) -> None:
    chunks = [chunk(i) for i in range(3)]
    step = synth.plan(Config("map_rerank", 3), "q?", chunks)
    assert step.name == "rerank" and len(step.requests) == 3
    assert all(r.logprobs for r in step.requests)
    assert chunks[1].text in step.requests[1].messages[-1].content
    result = step.finish(
        [
            gen("Unanswerable.", (-0.01,)),  # most confident, but a refusal
            gen("blue", (-0.9, -0.7)),
            gen("red", (-0.2, -0.1)),
        ]
    )
    assert result.answer == "red" and result.source_chunk_id == chunks[2].id
    assert result.confidence == pytest.approx(2.718281828 ** (-0.15))
    # All refusals: the most confident refusal is returned as the answer.
    only_refusals = step.finish(
        [gen("unanswerable", (-0.5,)), gen("unanswerable", (-0.1,)), gen("", None)]
    )
    assert only_refusals.source_chunk_id == chunks[1].id


def test_map_reduce_maps_in_one_batch_then_reduces_useful_notes(synth: Synthesizer) -> None:
    chunks = [chunk(i) for i in range(4)]
    step = synth.plan(Config("map_reduce", 4, 50), "q?", chunks)
    assert step.name == "map" and len(step.requests) == 4
    assert all(r.max_tokens == 50 and not r.logprobs for r in step.requests)
    reduce_step = step.finish(
        [gen("note zero"), gen("Nothing relevant."), gen("note two"), gen("note three")]
    )
    assert isinstance(reduce_step, Step) and reduce_step.name == "reduce"
    prompt = reduce_step.requests[0].messages[-1].content
    assert "[1] note zero\n\n[2] note two\n\n[3] note three" in prompt
    assert "Nothing relevant" not in prompt
    result = reduce_step.finish([gen("final", (-0.3,))])
    assert result.answer == "final"
    assert result.intermediate == ("note zero", "Nothing relevant.", "note two", "note three")
    assert result.used_chunk_ids == tuple(c.id for c in chunks)


def test_plan_takes_a_prefix_and_needs_a_chunk(synth: Synthesizer) -> None:
    step = synth.plan(Config("map_rerank", 2), "q?", [chunk(i) for i in range(5)])
    assert len(step.requests) == 2
    with pytest.raises(InvalidRequest):
        synth.plan(Config("stuff", 3), "q?", [])


def test_estimates_are_exact_for_known_prompts_and_bound_the_reducer(synth: Synthesizer) -> None:
    chunks = [chunk(i) for i in range(3)]
    for cfg in (Config("map_rerank", 3), Config("stuff", 3)):
        step = synth.plan(cfg, "q?", chunks)
        est = synth.estimate_calls(cfg, "q?", chunks)
        assert [e.prompt_tokens for e in est] == [
            synth.tokenizer.count_chat(r.messages) for r in step.requests
        ]
    cfg = Config("map_reduce", 3, 40)
    est = synth.estimate_calls(cfg, "q?", chunks)
    assert [e.stage for e in est] == ["map", "map", "map", "reduce"]
    # Notes at their full 40-token budget: the real reducer prompt cannot exceed the estimate.
    full_note = " ".join(["word"] * 40)
    while synth.tokenizer.count(full_note) > 40:
        full_note = full_note.rsplit(" ", 1)[0]
    reduce_step = synth.plan(cfg, "q?", chunks).finish([gen(full_note)] * 3)
    assert synth.prompt_tokens(reduce_step.requests[0].messages) <= est[-1].prompt_tokens


def test_config_parse_and_validation() -> None:
    assert Config.parse("map_reduce:6:100") == Config("map_reduce", 6, 100)
    assert Config.parse("stuff:5").label == "stuff:5"
    for bad in ("stuff", "stuff:x", "map_reduce:5", "stuff:5:10", "nope:3", "stuff:0"):
        with pytest.raises(ValueError):
            Config.parse(bad)


@pytest.mark.parametrize("counted", [False, True], ids=["tokenised", "n_tokens"])
@pytest.mark.parametrize("max_model_len", [4096, 900])
def test_sizer_bounds_the_exact_estimates_closely(
    tokenizer, max_model_len: int, counted: bool
) -> None:
    from ragctl.synthesis.methods import PASSAGE_SLACK_TOKENS, QUESTION_SLACK_TOKENS

    synth = Synthesizer(tokenizer, max_model_len=max_model_len, answer_max_tokens=32)
    # Uneven passages, with and without titles, so prefix sums and numbering both matter.
    chunks = [chunk(i, words=10 + 7 * i) for i in range(12)]
    chunks[3] = Chunk(id="untitled::0", doc_id="untitled", text="A passage with no title.")
    if counted:  # as retrieval gives them: the text's token count known from chunking
        chunks = [replace(c, n_tokens=tokenizer.count(c.text)) for c in chunks]
    q = "Which facts hold for the eleventh passage?"
    sizer = synth.sizer(q, chunks)
    assert synth.sizer(q, chunks) == sizer  # the second time from the passage cache
    configs = [Config("map_rerank", 12), Config("map_reduce", 12, 75), Config("map_reduce", 5, 8)]
    configs += [Config("stuff", n) for n in (1, 4, 12)]
    for cfg in configs:
        exact = synth.estimate_calls(cfg, q, chunks)
        fast = sizer.estimate(cfg)
        assert [(e.stage, e.max_tokens) for e in fast] == [(e.stage, e.max_tokens) for e in exact]
        for e, f in zip(exact, fast, strict=True):
            slack = PASSAGE_SLACK_TOKENS * (cfg.num_chunks if e.stage == "answer" else 1)
            slack += 2 if e.stage == "map" else 0  # word budget sized at its widest, "999"
            slack += QUESTION_SLACK_TOKENS
            assert e.prompt_tokens <= f.prompt_tokens <= e.prompt_tokens + slack, (cfg, e, f)
