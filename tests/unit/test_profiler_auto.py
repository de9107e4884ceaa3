"""AutoProfiler: the learned profiler answers when it was trained and is sure, the LLM's
beliefs are calibrated, and a corrupt state file is a clear error at load."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ragctl.errors import ProfilerStateError
from ragctl.profiler.auto import AutoProfiler, RetrievalSignals
from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.profiler.labels import OutcomeLabel
from ragctl.profiler.learned import query_features
from ragctl.profiler.profiler import ProfileOutcome
from ragctl.profiler.store import LabelRecord, ProfilerState
from ragctl.types import Config

DIM = 8


class FakeLLM:
    engine = None
    templates = {"fields": "v1"}
    examples = None
    last_feedback = None

    def __init__(self) -> None:
        self.calls = 0

    async def profile(self, question, metadata, chunk_tokens, *, collection=None):
        self.calls += 1
        b = FieldBeliefs(0.7, 0.3, (1.0,) + (0.0,) * 8, (1.0, 0.0, 0.0))
        return ProfileOutcome(b.to_profile(0.7), None, None, 0.1, "v1", beliefs=b, profiler="llm")

    async def aclose(self) -> None:
        pass


def _vector(joint: bool, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(0, 0.05, DIM)
    v[0] += 1.0 if joint else -1.0
    return v


def _train(root, n: int = 60) -> None:
    rng = np.random.default_rng(0)
    state = ProfilerState.at(root, "m", "c")
    records = []
    for i in range(n):
        joint = i % 2 == 0
        config = Config("stuff", 3) if joint else Config("map_rerank", 1)
        label = OutcomeLabel.of(f"q{i}", config, 1.0, "gold")
        features = query_features(_vector(joint, rng), [0.5, 0.4, 0.3], "who is it")
        # The LLM says joint=0.7 on every query: uninformative, so the learned one wins.
        beliefs = FieldBeliefs(0.7, 0.3, (1.0,) + (0.0,) * 8, (1.0, 0.0, 0.0))
        records.append(LabelRecord(label, "who is it", tuple(features), beliefs))
    state.append(records)
    state.refit()


def test_without_state_the_llm_answers_uncalibrated(tmp_path):
    llm = FakeLLM()
    auto = AutoProfiler(llm, state_root=tmp_path, model="m")
    signals = RetrievalSignals(np.ones(DIM), (0.5,))
    out = asyncio.run(auto.profile("q", "meta", 100, collection="c", retrieval=signals))
    assert llm.calls == 1 and out.profiler == "llm"
    assert out.profile.confidence == pytest.approx(0.7)
    assert out.raw_beliefs is None


def test_trained_learned_profiler_answers_without_an_llm_call(tmp_path):
    _train(tmp_path)
    llm = FakeLLM()
    auto = AutoProfiler(llm, state_root=tmp_path, model="m", learned_min_confidence=0.6)
    assert auto.load("c").use == "learned"
    rng = np.random.default_rng(1)
    for joint in (True, False):
        signals = RetrievalSignals(_vector(joint, rng), (0.5, 0.4, 0.3))
        out = asyncio.run(auto.profile("who is it", "m", 100, collection="c", retrieval=signals))
        assert out.profiler == "learned"
        assert out.profile.joint_reasoning is joint
    assert llm.calls == 0


def test_the_fingerprint_changes_with_the_fitted_state_only(tmp_path):
    auto = AutoProfiler(FakeLLM(), state_root=tmp_path, model="m")
    untrained = auto.fingerprint("c")
    _train(tmp_path, n=40)
    trained = auto.fingerprint("c")
    assert trained != untrained and auto.fingerprint("c") == trained
    assert auto.fingerprint("other") == untrained  # per collection
    _train(tmp_path, n=60)  # refitted on more labels
    assert auto.fingerprint("c") != trained
    assert AutoProfiler(FakeLLM(), mode="llm", state_root=tmp_path, model="m").fingerprint(
        "c"
    ) != auto.fingerprint("c")  # the mode decides which profiler answers


def test_llm_mode_calibrates_the_llm_beliefs(tmp_path):
    _train(tmp_path)
    llm = FakeLLM()
    auto = AutoProfiler(llm, mode="llm", state_root=tmp_path, model="m")
    signals = RetrievalSignals(np.ones(DIM), (0.5,))
    out = asyncio.run(auto.profile("q", "meta", 100, collection="c", retrieval=signals))
    assert llm.calls == 1 and out.profiler == "llm"
    assert out.raw_beliefs is not None and out.raw_beliefs.joint == pytest.approx(0.7)
    # Half the labels are joint whatever the LLM said: calibrated, 0.7 means about 0.5.
    assert out.beliefs.joint == pytest.approx(0.5, abs=0.1)


def test_learned_without_signals_falls_back_to_the_llm(tmp_path):
    _train(tmp_path)
    llm = FakeLLM()
    auto = AutoProfiler(llm, mode="learned", state_root=tmp_path, model="m")
    out = asyncio.run(auto.profile("q", "meta", 100, collection="c"))
    assert llm.calls == 1 and out.learned_note == "learned: no retrieval signals"


def test_corrupt_calibration_is_a_clear_error_at_load(tmp_path):
    _train(tmp_path)
    state = ProfilerState.at(tmp_path, "m", "c")
    state.calibration_path.write_text("{not json")
    auto = AutoProfiler(FakeLLM(), state_root=tmp_path, model="m")
    with pytest.raises(ProfilerStateError, match="calibration.json"):
        auto.load("c")


def test_needs_retrieval_only_where_a_learned_profiler_may_answer(tmp_path):
    _train(tmp_path)
    assert AutoProfiler(FakeLLM(), state_root=tmp_path, model="m").needs_retrieval("c")
    assert not AutoProfiler(FakeLLM(), state_root=tmp_path, model="m").needs_retrieval("other")
    assert not AutoProfiler(FakeLLM(), mode="llm", state_root=tmp_path, model="m").needs_retrieval(
        "c"
    )


def test_learned_outcome_without_a_model_is_an_error_the_profile_call_absorbs(tmp_path):
    auto = AutoProfiler(FakeLLM(), mode="learned", state_root=tmp_path, model="m")
    with pytest.raises(ValueError, match="no learned profiler"):
        auto.learned_outcome(auto.load("c"), "q", RetrievalSignals(np.ones(DIM), (0.5,)))


# --- per-field: the LLM is asked only for the fields it answers better ---------------------------


class FieldLLM(FakeLLM):
    """A per-field LLM whose P(joint) is informative (0.9 on joint questions, 0.1 otherwise);
    it records which fields each call asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, ...] | None] = []

    async def profile(self, question, metadata, chunk_tokens, *, collection=None, fields=None):
        self.calls += 1
        self.asked.append(None if fields is None else tuple(fields))
        joint = 0.9 if "joint" in question else 0.1
        b = FieldBeliefs(joint, 0.3, (1.0,) + (0.0,) * 8, (1.0, 0.0, 0.0))
        names = ("joint", "complexity", "pieces", "summary")
        uniform = () if fields is None else tuple(n for n in names if n not in fields)
        return ProfileOutcome(b.to_profile(0.7), None, None, 0.1, "v1", beliefs=b, profiler="llm",
                              uniform_fields=uniform)  # fmt: skip


def _train_llm_better_on_joint(root, n: int = 60) -> None:
    """Features that say nothing of joint, LLM beliefs that do."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        joint = i % 2 == 0
        config = Config("stuff", 3) if joint else Config("map_rerank", 1)
        label = OutcomeLabel.of(f"q{i}", config, 1.0, "gold")
        features = query_features(rng.normal(0, 1.0, DIM), [0.5, 0.4, 0.3], "who is it")
        beliefs = FieldBeliefs(0.9 if joint else 0.1, 0.3, (1.0,) + (0.0,) * 8, (1.0, 0.0, 0.0))
        records.append(LabelRecord(label, "who is it", tuple(features), beliefs))
    state = ProfilerState.at(root, "m", "c")
    state.append(records)
    state.refit()


def test_llm_fields_asks_only_where_the_llm_measured_better():
    from ragctl.profiler.store import FieldStatus, llm_fields

    def field(name, n, llm, learned):
        return FieldStatus(name, n, None, None, llm, n, None, None, learned)

    fields = [
        field("joint", 30, 0.8, 0.6),  # the LLM is better: asked
        field("complexity", 30, 0.5, 0.9),  # the learned one is better: not asked
        field("pieces", 30, 0.7, 0.7),  # a tie goes to the free one
        field("summary", 3, 1.0, None),  # too few labels to say: not asked
    ]
    assert llm_fields(fields, learned_samples=30, min_samples=20) == ("joint",)
    # a learned profiler fitted on too few labels: the LLM answers everything
    assert llm_fields(fields, learned_samples=10, min_samples=20) == (
        "joint", "complexity", "pieces", "summary",
    )  # fmt: skip


def test_auto_asks_the_llm_only_for_the_fields_it_answers_better(tmp_path):
    _train_llm_better_on_joint(tmp_path)
    llm = FieldLLM()
    auto = AutoProfiler(llm, state_root=tmp_path, model="m", learned_min_confidence=0.0)
    state = auto.load("c")
    assert "joint" in state.llm_fields and len(state.llm_fields) < 4
    signals = RetrievalSignals(np.ones(DIM), (0.5, 0.4, 0.3))
    out = asyncio.run(auto.profile("a joint question", "m", 100, collection="c", retrieval=signals))
    assert llm.asked == [state.llm_fields]  # one call, only those fields
    assert out.profiler == "llm" and out.ok
    assert set(out.learned_fields) == {"joint", "complexity", "pieces", "summary"} - set(
        state.llm_fields
    )
    assert out.uniform_fields == ()
    assert out.beliefs.joint > 0.8  # the LLM's (calibrated) reading of joint
    assert out.to_dict()["learned_fields"] == list(out.learned_fields)
    # such a mixed profile is no LLM reading to calibrate on: the label asks the LLM again
    from ragctl.profiler.store import llm_beliefs

    assert llm_beliefs(out) is None


def test_a_calibration_of_another_template_is_not_applied(tmp_path):
    _train(tmp_path)
    assert ProfilerState.at(tmp_path, "m", "c").load_calibration("llm").calibrated_fields
    other = ProfilerState.at(tmp_path, "m", "c", template="v9")
    cal = other.load_calibration("llm")
    assert cal.calibrated_fields == ()
    assert "fitted on fields v1, asked with v9" in cal.fields["joint"].note
    # a refit under v9 finds no v9 beliefs: nothing to calibrate, the v1 labels stay on disk
    other.refit()
    assert other.load_calibration("llm").calibrated_fields == ()
    assert len(other.records()) == 60 and other.records()[0].template == "v1"


def test_auto_does_not_ask_the_llm_when_no_answer_could_make_the_profile_trusted(tmp_path):
    """The LLM said 0.7 on every query: calibrated, any answer of it means about 0.5, so it
    could never lift the profile to the trust threshold; the learned profile stands, at no
    engine call."""
    from ragctl.profiler.calibration import Calibration, FieldCalibration

    _train(tmp_path)
    llm = FakeLLM()
    auto = AutoProfiler(llm, state_root=tmp_path, model="m", learned_min_confidence=0.999)
    state = auto.load("c")
    # complexity, too, calibrated to about 0.5 whatever the LLM says
    flat = FieldCalibration("complexity", "binary", x=(0.1, 0.9), y=(0.45, 0.55), n=60)
    state.calibration = Calibration({**state.calibration.fields, "complexity": flat})
    signals = RetrievalSignals(_vector(True, np.random.default_rng(1)), (0.5, 0.4, 0.3))
    out = asyncio.run(auto.profile("who is it", "m", 100, collection="c", retrieval=signals))
    assert llm.calls == 0 and out.profiler == "learned"
    assert out.llm_note.startswith("llm not asked: at most 0.")
    # with a threshold the LLM could reach, it is asked
    low = AutoProfiler(llm, state_root=tmp_path, model="m", learned_min_confidence=0.999,
                       trust_threshold=0.4)  # fmt: skip
    low.load("c").calibration = state.calibration
    asyncio.run(low.profile("who is it", "m", 100, collection="c", retrieval=signals))
    assert llm.calls == 1


def test_reachable_confidence_reads_the_calibration_and_the_learned_beliefs():
    from ragctl.profiler.auto import reachable_confidence
    from ragctl.profiler.calibration import Calibration, FieldCalibration

    learned = FieldBeliefs(0.95, 0.2, (1.0,) + (0.0,) * 8, (1.0, 0.0, 0.0))
    narrow = FieldCalibration("joint", "binary", x=(0.1, 0.9), y=(0.71, 0.77), n=20)
    cal = Calibration({"joint": narrow})
    assert reachable_confidence(cal, learned, {"joint"}) == pytest.approx(0.77)
    # complexity from the learned profile (0.8 sure): the cap when joint is uncalibrated
    assert reachable_confidence(Calibration.identity(), learned, {"joint"}) == pytest.approx(0.8)
    assert reachable_confidence(Calibration.identity(), learned, set()) == pytest.approx(0.8)


def test_unsure_fields_are_the_decisive_ones_below_the_bar():
    from ragctl.profiler.auto import unsure_fields

    b = FieldBeliefs(0.6, 0.02, (1.0,) + (0.0,) * 8, (1.0, 0.0, 0.0))
    assert unsure_fields(b, 0.8) == {"joint"}  # complexity is 0.98 sure
    assert unsure_fields(b, 0.99) == {"joint", "complexity"}
    assert unsure_fields(b, 0.5) == set()
    assert unsure_fields(None, 0.5) == {"joint", "complexity"}
