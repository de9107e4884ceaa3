"""`ragctl profiler bench`: the profilers side by side on the same test queries, in one run.

Per dataset, one engine and one controller; every test query is answered adaptively once with
each profiler (`json`: the structured-output call; `llm`: the per-field constrained tokens,
calibrated; `learned`: no LLM call where a learned profiler is trained and sure; `auto`, the
default: the learned one, with the LLM asked only for the fields it answers better, and for the
decisive ones where the learned one is unsure), in an order
that rotates from query to query so that neither warm-up nor machine noise favours one. Per
profiler (each with its own history of confident spaces, as if it ran alone): the profiler's
seconds and its share of the answer's end-to-end delay (95% bootstrap intervals), the
configurations chosen, and agreement of its joint-reasoning call with what the
dataset annotates (`joint_annotation`). The AUC of P(joint) against the annotations is computed
over all annotated test queries of the run (raw LLM beliefs, calibrated LLM beliefs, learned
beliefs; the JSON profiler's yes/no as a score). The learned profiler's per-query time (features,
prediction, calibration) is measured over 1,000 queries.

Test and calibration queries never overlap (`split`); train with `ragctl profiler train` on the
calibration split first, or the learned profiler has nothing to answer with (it then says so and
the LLM answers).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragctl.evaluation.intervals import mean_ci

if TYPE_CHECKING:
    from ragctl.settings import Settings
    from ragctl.types import Query

PROFILERS = ("json", "llm", "learned", "auto")


def joint_annotation(dataset: str, query: Query) -> bool | None:
    """Whether the dataset's own annotation says the query needs several pieces combined:
    SQuAD no (single-fact extractive), MuSiQue yes (2-4 hops), FinSec by question_type (not for
    "Single-Doc Single-Chunk RAG"), QMSum yes for general queries (the whole meeting) and
    unknown for specific ones (a span of turns, one fact or several)."""
    extra = query.extra
    if dataset == "squad":
        return False
    if dataset == "musique":
        return True
    if dataset == "finsec":
        kind = extra.get("question_type")
        return None if kind is None else kind != "Single-Doc Single-Chunk RAG"
    if dataset == "qmsum":
        return True if extra.get("query_type") == "general" else None
    return None


def auc(scores: Sequence[float], truth: Sequence[bool]) -> float | None:
    """ROC AUC (scikit-learn); None unless both classes occur."""
    if len(set(truth)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(truth, dtype=int), np.asarray(scores, dtype=float)))


def confusion(pred: Sequence[bool], truth: Sequence[bool]) -> dict[str, int]:
    """Joint reasoning predicted against annotated: true/false positives and negatives."""
    c = Counter((bool(p), bool(t)) for p, t in zip(pred, truth, strict=True))
    return {"tp": c[(True, True)], "fp": c[(True, False)], "fn": c[(False, True)],
            "tn": c[(False, False)]}  # fmt: skip


def summarize_profiler(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One profiler's rows (one per test query) as figures with 95% intervals."""
    ok = [r for r in rows if r["error"] is None]
    seconds = [r["profile_s"] for r in ok]
    # Profile-only rows have no answer, hence no delay and no share of it.
    share = [r["profile_s"] / r["total_s"] for r in ok if r.get("total_s")]
    total = [r["total_s"] for r in ok if r.get("total_s")]
    annotated = [r for r in ok if r["annotation"] is not None and r["joint"] is not None]
    pred = [bool(r["joint"]) for r in annotated]
    truth = [bool(r["annotation"]) for r in annotated]
    agree = sum(p == t for p, t in zip(pred, truth, strict=True))

    def fig(values: Sequence[float]) -> dict[str, Any]:
        return {"mean": float(np.mean(values)) if values else None, "ci95": mean_ci(values),
                "n": len(values)}  # fmt: skip

    return {
        "seconds": fig(seconds),
        "share": fig(share),
        "delay_s": fig(total),
        "answered_by": dict(Counter(r["answered_by"] for r in ok)),
        "profile_used": sum(bool(r["profile_used"]) for r in ok),
        "configs": dict(Counter(r["config"] for r in ok if r.get("config")).most_common()),
        "joint_agreement": agree / len(annotated) if annotated else None,
        "confusion": confusion(pred, truth) if annotated else None,
        "errors": len(rows) - len(ok),
    }


async def compare_profilers(
    settings: Settings,
    datasets: Sequence[str],
    limit: int,
    calibration: int,
    seed: int,
    out_dir: Path,
    *,
    status: Callable[[str], Any],
    answer: bool = True,
) -> dict[str, Any]:
    """Run the comparison (see the module doc); writes `samples.jsonl` and `results.json` to
    `out_dir` and returns the results. `answer=False`: each profiler only profiles each query
    (no synthesis, so no share of delay)."""
    from ragctl.evaluation.systems import split
    from ragctl.retrieval.collection import check_dataset, load_card, load_queries

    plan = []
    for name in datasets:  # cheap checks for every dataset before any engine starts
        check_dataset(settings.data_dir, name)
        card = load_card(name)
        test, _ = split(load_queries(settings.data_dir, card.name), limit, calibration, seed)
        plan.append((card, test))
    out_dir.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    learned_times: list[float] = []
    for card, test in plan:
        with status(f"{card.name}: {len(test)} queries x {len(PROFILERS)} profilers"):
            samples += await _dataset(settings, card.name, test, learned_times, answer)
    with (out_dir / "samples.jsonl").open("w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    payload = results(samples, learned_times)
    payload["settings"] = {"limit": limit, "calibration": calibration, "seed": seed,
                           "model": settings.profiler_model_key(), "answered": answer}  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def results(samples: Sequence[Mapping[str, Any]], learned_times: Sequence[float]) -> dict[str, Any]:
    """Per dataset and profiler figures, the pooled AUCs, the learned profiler's time."""
    per_dataset: dict[str, Any] = {}
    for d in dict.fromkeys(r["dataset"] for r in samples):
        rows = [r for r in samples if r["dataset"] == d]
        per_dataset[d] = {
            "queries": len({r["query_id"] for r in rows}),
            "profilers": {
                p: summarize_profiler([r for r in rows if r["profiler"] == p]) for p in PROFILERS
            },
        }
    # AUC of P(joint): one score per query and profiler, over every annotated test query (the
    # JSON profiler has no probability: its yes/no is its score).
    scored: dict[str, tuple[list[float], list[bool]]] = {}
    by_query: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in samples:
        by_query.setdefault((r["dataset"], r["query_id"]), []).append(r)
    for rows in by_query.values():
        annotation = rows[0]["annotation"]
        if annotation is None:
            continue
        scores = dict(rows[0]["scores"])
        for r in rows:
            if r["profiler"] == "json" and r.get("error") is None and r["joint"] is not None:
                scores["json"] = float(r["joint"])
        for key, value in scores.items():
            if value is not None:
                xs, ys = scored.setdefault(key, ([], []))
                xs.append(float(value))
                ys.append(bool(annotation))
    payload: dict[str, Any] = {
        "per_dataset": per_dataset,
        "auc_joint": {k: auc(xs, ys) for k, (xs, ys) in sorted(scored.items())},
        "auc_queries": max((len(xs) for xs, _ in scored.values()), default=0),
    }
    if learned_times:
        t = np.asarray(learned_times)
        payload["learned_predict_s"] = {"n": len(t), "p50": float(np.percentile(t, 50)),
                                        "p99": float(np.percentile(t, 99))}  # fmt: skip
    return payload


async def _dataset(
    settings: Settings,
    dataset: str,
    test: Sequence[Query],
    learned_times: list[float],
    answer: bool = True,
) -> list[dict[str, Any]]:
    from ragctl.profiler import Profiler
    from ragctl.profiler.auto import AutoProfiler
    from ragctl.service import open_controller
    from ragctl.types import Config

    # No golden runs: they would load the engine beside the measured answers and add labels
    # to the state being measured.
    controller = await open_controller(
        settings.with_overrides(profiler="llm", golden_every=0), dataset
    )
    try:
        calibrated = controller.profiler
        field = calibrated.llm
        profilers = {
            "json": Profiler(controller.engine, timeout_s=settings.profiler_timeout_s),
            "llm": calibrated,
            **{
                mode: AutoProfiler(
                    field, mode=mode, state_root=settings.cache_dir, model=calibrated.model,
                    learned_min_confidence=settings.learned_min_confidence,
                    trust_threshold=settings.confidence_threshold,
                )  # fmt: skip
                for mode in ("learned", "auto")
            },
        }
        learned_state = profilers["learned"].load(dataset)
        # Each profiler keeps its own history of confident spaces (the fallback of the queries
        # it is not trusted on), as if it ran alone.
        histories: dict[str, dict] = {name: {} for name in PROFILERS}
        await controller.aask(test[0].question, Config("stuff", 1))  # warm-up
        rows = []
        for i, query in enumerate(test):
            annotation = joint_annotation(dataset, query)
            scores = await _scores(controller, field, calibrated, learned_state, query)
            k = i % len(PROFILERS)
            order = PROFILERS[k:] + PROFILERS[:k]
            for name in order:
                if not answer:
                    rows.append(await _profile(controller, profilers[name], dataset, query, name,
                                               annotation, scores))  # fmt: skip
                    continue
                controller.profiler = profilers[name]
                controller.history = histories[name]
                rows.append(await _answer(controller, dataset, query, name, annotation, scores))
        if learned_state.learned is not None:
            learned_times += await _time_learned(profilers["learned"], controller, test)
        return rows
    finally:
        controller.profiler = calibrated
        await controller.aclose()


async def _answer(
    controller: Any, dataset: str, query: Query, name: str, annotation: bool | None,
    scores: Mapping[str, float | None],
) -> dict[str, Any]:  # fmt: skip
    from ragctl.errors import RagctlError
    from ragctl.types import AnswerOptions

    base = {"dataset": dataset, "query_id": query.id, "profiler": name, "annotation": annotation,
            "scores": dict(scores)}  # fmt: skip
    try:
        # The bench measures the profiler: asked even where the objective would not ask it.
        answer = await controller.aask(query.question, options=AnswerOptions(ask_profiler=True))
    except RagctlError as e:
        return {**base, "error": f"{type(e).__name__}: {e}"}
    d = answer.decision
    return {
        **base,
        "error": None,
        "profile_s": float(answer.timings.get("profile", 0.0)),
        "total_s": float(answer.timings.get("total", 0.0)),
        "answered_by": d.profiler or "none",
        "profile_used": d.profile_used,
        "joint": None if d.profile is None else d.profile.joint_reasoning,
        "config": d.config.label,
        "note": d.profile_note,
    }


async def _profile(
    controller: Any, profiler: Any, dataset: str, query: Query, name: str,
    annotation: bool | None, scores: Mapping[str, float | None],
) -> dict[str, Any]:  # fmt: skip
    """One profiler's profile of the query, unanswered (the row `_answer` gives, without the
    answer's delay and configuration)."""
    c = controller.collection
    kwargs: dict[str, Any] = {"collection": c.name}
    if hasattr(profiler, "needs_retrieval"):
        kwargs["retrieval"] = await controller.retrieval_signals(query.question)
    outcome = await profiler.profile(query.question, c.metadata, c.chunk_tokens, **kwargs)
    return {
        "dataset": dataset, "query_id": query.id, "profiler": name, "annotation": annotation,
        "scores": dict(scores), "error": None, "profile_s": outcome.seconds, "total_s": None,
        "answered_by": outcome.profiler if outcome.ok else "none",
        "profile_used": False, "config": None, "note": outcome.error or "",
        "joint": None if outcome.profile is None else outcome.profile.joint_reasoning,
    }  # fmt: skip


async def _scores(
    controller: Any, field: Any, calibrated: Any, learned_state: Any, query: Query
) -> dict[str, float | None]:
    """P(joint) of each profiler for one query (None where it has none): the field profiler's
    raw and calibrated beliefs, the learned profiler's calibrated ones, the JSON profiler's
    yes/no is added from its own answer row."""
    c = controller.collection
    raw = await field.profile(query.question, c.metadata, c.chunk_tokens, collection=c.name)
    out: dict[str, float | None] = {"llm_raw": None, "llm_calibrated": None, "learned": None}
    if raw.beliefs is not None:
        out["llm_raw"] = raw.beliefs.joint
        cal = calibrated.load(c.name).calibration
        out["llm_calibrated"] = cal.apply(raw.beliefs).joint
    if learned_state.learned is not None:
        from ragctl.profiler.learned import query_features

        signals = await controller.retrieval_signals(query.question)
        if signals.embedding is not None:
            x = query_features(signals.embedding, signals.scores, query.question)
            beliefs = learned_state.learned.predict(x)
            if learned_state.learned_calibration is not None:
                beliefs = learned_state.learned_calibration.apply(beliefs)
            out["learned"] = beliefs.joint
    return out


async def _time_learned(
    profiler: Any, controller: Any, test: Sequence[Query], n: int = 1000
) -> list[float]:
    """Seconds of the learned profiler's whole answer (features, prediction, calibration) over
    `n` queries, cycling through the test queries' retrieval signals."""
    signals = [await controller.retrieval_signals(q.question) for q in test[:20]]
    state = profiler.load(controller.collection.name)
    times = []
    for i in range(n):
        q, s = test[i % len(signals)], signals[i % len(signals)]
        t = time.perf_counter()
        profiler.learned_outcome(state, q.question, s)
        times.append(time.perf_counter() - t)
    return times
