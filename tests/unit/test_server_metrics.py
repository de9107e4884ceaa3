"""The server's Prometheus metrics for the profiler: which profiler profiled each adaptive
request, and why a learned profiler that was asked first did not answer."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ragctl.server.metrics import ServerMetrics, learned_fallback
from ragctl.types import Answer, Config, Decision


def _answer(profiler: str, note: str = "") -> Answer:
    d = Decision(Config("stuff", 3), "fit", profiler=profiler, profiler_note=note)
    return Answer("q", "x", d, (), (), timings={"total": 1.0})


def _samples(m: ServerMetrics) -> dict[tuple[str, tuple], float]:
    text = m.render(None, 0, 0).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_learned_fallback_reasons() -> None:
    assert learned_fallback("learned error: ValueError: x") == "learned-error"
    assert learned_fallback("learned unsure 0.62") == "learned-unsure"
    assert learned_fallback("learned: no trained model") == "learned-unavailable"


def test_profiler_answers_and_learned_fallbacks_are_counted() -> None:
    m = ServerMetrics()
    m.observe_answer("ragctl/auto", _answer("learned"))
    m.observe_answer("ragctl/auto", _answer("llm", "learned unsure 0.55"))
    m.observe_answer("ragctl/auto", _answer("llm", "learned unsure 0.41"))
    s = _samples(m)
    assert s[("ragctl_profiler_answers_total", (("profiler", "learned"),))] == 1
    assert s[("ragctl_profiler_answers_total", (("profiler", "llm"),))] == 2
    assert s[("ragctl_profiler_fallbacks_total", (("reason", "learned-unsure"),))] == 2
