"""`ragctl eval run`'s phases (`ragctl.evaluation.run`) on a fake controller, no engine: the
calibration of AdaptiveRAG*, the rows and files a run writes, `--resume` skipping what is done,
and the checks before anything starts."""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from ragctl.errors import InvalidRequest
from ragctl.evaluation.run import RunRequest, read_meta, run_evaluation
from ragctl.settings import Settings
from ragctl.types import Answer, Config, ConfigSpace, Decision


class FakeController:
    """Answers `x` to every question; counts calls."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Config | None]] = []
        self.profiled: list[str] = []
        self.counters = {"asks": 0}
        self.policy = SimpleNamespace(slo_for=lambda name: None)
        self.slo_resets: list[tuple[int, bool]] = []
        """(asks before it, whether it forgot what was learned) of each SLO loop reset."""
        self.slo = SimpleNamespace(
            reset=lambda learned=True: self.slo_resets.append((len(self.asked), learned)),
            snapshot=lambda: {"fake": True},
        )
        self.closed = False
        # What the outcome grid's key reads (calibration answers land in the grid).
        self.engine = SimpleNamespace(name="fake", max_model_len=4096,
                                      reset_prefix_cache=self._reset)  # fmt: skip
        self.resets: list[int] = []
        """How many asks came before each prefix-cache reset."""
        self.slos: list[float | None] = []
        """Each ask's `slo_ms` argument."""
        self.retriever = SimpleNamespace(fingerprint="fp")
        self.synthesizer = SimpleNamespace(
            template_versions={"stuff": "v1"}, answer_max_tokens=32, temperature=0.0
        )
        self.collection = SimpleNamespace(name="squad")

    can_reset = False
    """Whether the fake engine says it emptied its prefix cache."""
    answer_s = 0.0
    """How long each answer takes."""

    async def _reset(self) -> bool:
        self.resets.append(len(self.asked))
        return self.can_reset

    async def aask(
        self, question: str, config: Config | None = None, *, options=None, slo_ms=None
    ) -> Answer:
        self.asked.append((question, config))
        self.slos.append(slo_ms)
        self.counters["asks"] += 1
        if self.answer_s:
            await asyncio.sleep(self.answer_s)
        used = config or Config("stuff", 3)
        decision = Decision(used, "fixed" if config else "fit")
        return Answer(question, "x", decision, (), (), {"queue": 0.0, "profile": 0.01})

    async def profile(self, question: str) -> tuple[Any, Any]:
        self.profiled.append(question)
        space = ConfigSpace(("stuff",), (3, 3), (50,))
        return SimpleNamespace(profile=None, seconds=0.01), SimpleNamespace(space=space)

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "squad"
    folder.mkdir(parents=True)
    queries = [{"id": f"q{i}", "question": f"what is {i}?", "answers": ["x"],
                "gold_doc_ids": ["d1"]} for i in range(4)]  # fmt: skip
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "corpus.jsonl").write_text(json.dumps({"id": "d1", "title": "t", "text": "x"}))
    return tmp_path / "data"


@pytest.fixture
def controllers(monkeypatch: pytest.MonkeyPatch) -> list[FakeController]:
    made: list[FakeController] = []

    async def fake_open(settings: Settings, collection: str, progress: Any = None) -> Any:
        made.append(FakeController())
        return made[-1]

    monkeypatch.setattr("ragctl.service.open_controller", fake_open)
    return made


def _progress() -> Progress:
    return Progress(console=Console(file=io.StringIO()))


def _run(data_dir: Path, out: Path, *, resume: bool = False, limit: int = 2) -> Any:
    request = RunRequest("squad", "ragctl,fixed:stuff:3,fixed:stuff:5,adaptiverag", limit, 1,
                         None, 2, 0)  # fmt: skip
    settings = Settings(data_dir=data_dir, cache_dir=data_dir.parent / "cache")
    return run_evaluation(settings, request, out, resume=resume, allocation=None,
                          progress=_progress)  # fmt: skip


def test_run_writes_rows_files_and_meta(
    tmp_path: Path, data_dir: Path, controllers: list[FakeController]
) -> None:
    out = tmp_path / "out"
    evaluation = _run(data_dir, out)
    (ctl,) = controllers
    assert ctl.closed
    # calibration: one query on both fixed configurations, then its profile
    calibration = [json.loads(line) for line in (out / "calibration.jsonl").open()]
    assert sorted(r["system"] for r in calibration) == ["fixed:stuff:3", "fixed:stuff:5"]
    # ... answered into the outcome grid, which a second run reads instead of answering again
    grid = tmp_path / "cache" / "grids" / "squad" / read_meta(out)["calibration_grid"]
    assert len((grid / "cells.jsonl").read_text().splitlines()) == 2
    _run(data_dir, tmp_path / "out2")
    again = controllers[-1]
    assert len(again.asked) == 1 + 2 * 4  # the warm-up and the test jobs, no calibration
    assert read_meta(tmp_path / "out2")["adaptiverag_table"] == read_meta(out)["adaptiverag_table"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert len(samples) == 2 * 4
    assert {r["concurrency"] for r in samples} == {2} and {r["rate"] for r in samples} == {None}
    assert all(r["scores"]["f1"] == 1.0 and r["error"] is None for r in samples)
    meta = read_meta(out)
    assert meta["adaptiverag_table"]["*"] in ("stuff:3", "stuff:5")
    assert meta["counters"] == {"asks": ctl.counters["asks"]} and meta["slo"] == {"fake": True}
    assert meta["rates"] == [] and meta["concurrency"] == 2 and meta["calibration"] == 1
    assert meta["cold_phases"] == [False]  # asked once, before its one phase (this one cannot)
    phase = evaluation.phases["closed:2"]
    assert list(phase.systems) == ["ragctl", "adaptiverag", "fixed:stuff:3", "fixed:stuff:5"]
    assert phase.systems["ragctl"].n == 2 and phase.systems["ragctl"].primary_value == 1.0
    assert evaluation.meta["model"] == meta["model"]
    for name in ("results.json", "summary.csv", "quality_vs_delay.png", "delay_cdf.png"):
        assert (out / name).exists()


def test_resume_runs_only_what_is_missing(
    tmp_path: Path, data_dir: Path, controllers: list[FakeController]
) -> None:
    out = tmp_path / "out"
    _run(data_dir, out)
    with pytest.raises(InvalidRequest, match="already holds a run"):
        _run(data_dir, out)
    with pytest.raises(InvalidRequest, match="same run as before"):
        _run(data_dir, out, resume=True, limit=3)
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])
    samples.write_text("".join(lines[:-1]) + lines[-1][:20] + "\n")  # the last row torn
    started = read_meta(out)["started_at"]
    _run(data_dir, out, resume=True)
    resumed = controllers[-1]
    # the warm-up and the one torn job; calibration is not run again (its table is in run.json)
    question = f"what is {torn['query_id'][1:]}?"
    assert resumed.asked[1][0] == question and len(resumed.asked) == 2
    assert resumed.profiled == ([question] if torn["system"] == "adaptiverag" else [])
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.endswith("}")]
    assert len({(r["system"], r["query_id"]) for r in rows}) == 8
    assert read_meta(out)["started_at"] == started


def test_warmup_answers_other_queries_first_and_counts_none_of_them(
    tmp_path: Path, data_dir: Path, controllers: list[FakeController]
) -> None:
    # 4 queries, 1 for testing (ragctl needs no calibration): 3 left to warm up with, of 5.
    request = RunRequest("squad", "ragctl", 1, 0, None, 1, 0, warmup=5)
    settings = Settings(data_dir=data_dir, cache_dir=data_dir.parent / "cache")
    out = tmp_path / "out"
    run_evaluation(settings, request, out, resume=False, allocation=None, progress=_progress)
    (ctl,) = controllers
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    (test_id,) = {r["query_id"] for r in samples}
    asked = [q for q, config in ctl.asked]
    warm = asked[1:4]  # after the one stuff:1 warm-up call, before the measured query
    assert len(asked) == 5 and asked[4] == f"what is {test_id[1:]}?"
    assert f"what is {test_id[1:]}?" not in warm and len(set(warm)) == 3
    assert read_meta(out)["warmup"] == 5 and len(samples) == 1
    # Warm-ups carry no SLO (none to be shed by); the measured query gets the run's default.
    assert ctl.slos[:4] == [math.inf] * 4 and ctl.slos[4] is None
    # All at once, a warm-up only shows the engine its batch shapes: the SLO loop forgets it,
    # as it forgets the engine's slow first call.
    assert ctl.slo_resets == [(1, True), (4, True)]


def test_an_open_loop_warmup_is_paced_traffic_with_the_runs_slo_and_is_learned_from(
    tmp_path: Path, data_dir: Path, controllers: list[FakeController]
) -> None:
    request = RunRequest("squad", "ragctl", 1, 0, "50", None, 0, warmup=3)
    settings = Settings(data_dir=data_dir, cache_dir=data_dir.parent / "cache", slo_ms=2000)
    out = tmp_path / "out"
    run_evaluation(settings, request, out, resume=False, allocation=None, progress=_progress)
    (ctl,) = controllers
    assert len(ctl.asked) == 5
    # The warm-ups arrive like the phase's queries, with the run's SLO (the loop may act on
    # them), and what the loop learned from them stays; only their counts go.
    assert ctl.slos[1:4] == [None] * 3
    assert ctl.slo_resets == [(1, True), (4, False)]


@pytest.mark.parametrize(("answer_s", "sent"), [(0.3, 2), (0.0, 0)])
def test_a_cooldown_goes_on_arriving_until_the_measured_queries_finish_and_is_not_recorded(
    tmp_path: Path,
    data_dir: Path,
    controllers: list[FakeController],
    monkeypatch: pytest.MonkeyPatch,
    answer_s: float,
    sent: int,
) -> None:
    # 4 queries: 1 measured, 1 to warm up with, the other 2 for the cool-down. At 20 q/s both
    # arrive while a measured answer takes 0.3 s; an instant one leaves none to send.
    monkeypatch.setattr(FakeController, "answer_s", answer_s)
    request = RunRequest("squad", "ragctl", 1, 0, "20", None, 0, warmup=1, cooldown=5)
    settings = Settings(data_dir=data_dir, cache_dir=data_dir.parent / "cache", slo_ms=2000)
    out = tmp_path / "out"
    run_evaluation(settings, request, out, resume=False, allocation=None, progress=_progress)
    (ctl,) = controllers
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert len(samples) == 1 and read_meta(out)["cooldown"] == 5
    measured = f"what is {samples[0]['query_id'][1:]}?"
    asked = [q for q, _ in ctl.asked]
    assert asked[2] == measured and len(asked) == 3 + sent
    assert len(set(asked[1:])) == len(asked) - 1  # the cool-down's are other queries
    assert ctl.slos[3:] == [None] * sent  # with the run's SLO, as the measured ones


def test_a_cooldown_needs_open_loop_arrivals(tmp_path: Path, data_dir: Path) -> None:
    request = RunRequest("squad", "ragctl", 1, 0, None, 1, 0, cooldown=2)
    settings = Settings(data_dir=data_dir, cache_dir=data_dir.parent / "cache")
    with pytest.raises(InvalidRequest, match="--cooldown needs --rate"):
        run_evaluation(settings, request, tmp_path / "out", resume=False, allocation=None,
                       progress=_progress)  # fmt: skip


def test_warmup_queries_are_seeded_and_never_test_or_calibration_ones() -> None:
    from ragctl.evaluation.run import warmup_queries

    queries = [SimpleNamespace(id=f"q{i}") for i in range(10)]
    used = queries[:3]
    picked = warmup_queries(queries, used, 4, seed=1)
    assert len(picked) == 4 and not {q.id for q in picked} & {"q0", "q1", "q2"}
    assert picked == warmup_queries(queries, used, 4, seed=1)
    assert len(warmup_queries(queries, used, 50, seed=1)) == 7


def test_every_rate_phase_starts_from_an_empty_prefix_cache(
    tmp_path: Path,
    data_dir: Path,
    controllers: list[FakeController],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The phases answer the same queries: each empties the prefix cache before its first
    request, so none reuses an earlier phase's prompts."""
    request = RunRequest("squad", "ragctl", 2, 0, "500,1000", None, 0)
    settings = Settings(data_dir=data_dir, cache_dir=data_dir.parent / "cache")
    out = tmp_path / "out"
    monkeypatch.setattr(FakeController, "can_reset", True)
    run_evaluation(settings, request, out, resume=False, allocation=None, progress=_progress)
    (ctl,) = controllers
    assert ctl.resets == [1, 3]  # after the warm-up call, then after the first phase's 2 queries
    assert read_meta(out)["cold_phases"] == [True, True]
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert sorted(r["rate"] for r in samples) == [500, 500, 1000, 1000]


def test_a_later_phase_that_could_not_start_cold_is_warned_about(
    tmp_path: Path,
    data_dir: Path,
    controllers: list[FakeController],
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = RunRequest("squad", "ragctl", 2, 0, "500,1000", None, 0)
    settings = Settings(data_dir=data_dir, cache_dir=data_dir.parent / "cache")
    with caplog.at_level("WARNING", logger="ragctl.evaluation.run"):
        run_evaluation(
            settings, request, tmp_path / "out", resume=False, allocation=None,
            progress=_progress,
        )  # fmt: skip
    assert read_meta(tmp_path / "out")["cold_phases"] == [False, False]
    warned = [r.getMessage() for r in caplog.records if "prefix cache" in r.getMessage()]
    assert len(warned) == 1 and "phase 2" in warned[0]  # the first phase has nothing before it
