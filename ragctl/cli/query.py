"""`ragctl ask`, `ragctl profile` and `ragctl demo`: one question (or a few) through the
controller, with the decision shown in a few lines."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import typer
from rich.table import Table

from ragctl.cli.common import (
    DATASET_FLAGS,
    load_rules,
    open_controller,
    out,
    parse_config,
    print_json,
    serving_tokenizer,
    start_engine,
    tally,
)
from ragctl.errors import InvalidRequest, PromptTooLong
from ragctl.settings import Settings
from ragctl.synthesis import registry
from ragctl.types import METHODS, AnswerOptions, Config


def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question."),
    dataset: str = typer.Option("squad", *DATASET_FLAGS, help="Collection to answer from."),
    method: str | None = typer.Option(
        None, help=f"Fix the method ({' | '.join(METHODS)}). Unset: adaptive."
    ),
    chunks: int | None = typer.Option(
        None, help="With --method: number of chunks (num_chunks; default: the method's)."
    ),
    intermediate_length: int | None = typer.Option(
        None, help="With --method map_reduce: mapper output budget in tokens (default: its)."
    ),
    max_tokens: int | None = typer.Option(
        None, min=1, help="Cap the answer (at most the collection's answer budget)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Answer one question: adaptively (profile, rules, best-fit), or with --method fixed. On
    a terminal the answer is printed as it is decoded."""
    settings: Settings = ctx.obj
    config = _config(method, chunks, intermediate_length) if method else None
    if method is None and intermediate_length is not None:
        raise InvalidRequest("--intermediate-length applies to a fixed --method only")
    _precheck_question(settings, question)

    live = not json_out and sys.stdout.isatty()

    def show(delta: str) -> None:
        out.print(delta, end="", style="bold", highlight=False, markup=False)

    async def run() -> Any:
        # Checks the dataset and the rules file before the engine starts.
        controller = await open_controller(settings, dataset)
        try:
            options = AnswerOptions(max_tokens=max_tokens)
            return await controller.aask(
                question, config, options=options, on_token=show if live else None
            )
        finally:
            await controller.aclose()

    answer = asyncio.run(run())
    d = answer.to_dict()
    if json_out:
        print_json(d)
        return
    if live:
        out.print("(empty answer)" if not answer.text else "", style="bold")
    else:
        out.print(f"[bold]{answer.text or '(empty answer)'}[/bold]")
    for line in decision_lines(answer.decision):
        out.print(line, highlight=False)
    out.print(f"chunks  {', '.join(d['chunk_ids'])}", highlight=False)
    tk = d["tokens"]
    out.print(f"tokens  {tk['prompt']} prompt + {tk['output']} output in {tk['calls']} calls")
    out.print("timings " + "  ".join(f"{k} {v:.2f}s" for k, v in d["timings"].items()))


def profile(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question."),
    dataset: str = typer.Option("squad", *DATASET_FLAGS, help="Collection it is asked of."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Profile one question (complexity, joint reasoning, pieces, summary length, confidence)
    and show the configuration space the rules give it."""
    settings: Settings = ctx.obj
    from ragctl.policy import resolve_space
    from ragctl.retrieval.collection import check_dataset
    from ragctl.service import load_profiler_state, open_profiler, quality_model

    _precheck_question(settings, question)
    rules = load_rules(settings)
    card = check_dataset(settings.data_dir, dataset)

    async def run() -> Any:
        engine = await start_engine(settings)
        profiler = await open_profiler(settings, engine)
        try:
            outcome = await profiler.profile(
                question.strip(), card.metadata, card.chunking.size, collection=card.name
            )
            return outcome, quality_model(load_profiler_state(profiler, card.name))
        finally:
            await profiler.aclose()
            await engine.aclose()

    outcome, quality = asyncio.run(run())
    # The space a controller of this collection would give it (no confident history here).
    choice = resolve_space(
        outcome, rules, (), settings.confidence_threshold,
        learned=quality.label_space(), labelled=quality.label_space(min_labels=1),
    )  # fmt: skip
    if json_out:
        print_json(
            {
                "question": question.strip(),
                "dataset": dataset,
                "profile": None if outcome.profile is None else outcome.profile.to_dict(),
                "error": outcome.error,
                "trusted": choice.profile_used,
                "note": choice.note,
                "space": choice.space.to_dict(),
                "seconds": outcome.seconds,
                "template": outcome.template,
                "profiler": outcome.profiler,
                "beliefs": None if outcome.beliefs is None else outcome.beliefs.to_dict(),
                "raw_beliefs": (
                    None if outcome.raw_beliefs is None else outcome.raw_beliefs.to_dict()
                ),
            }
        )
        return
    used = "trusted" if choice.profile_used else f"not trusted: {choice.note}"
    out.print(f"profile {_profile_text(outcome.profile)} ({used})", highlight=False)
    out.print(f"space   {_space_text(choice.space)}", highlight=False)
    if outcome.beliefs is not None:
        b = outcome.beliefs
        out.print(
            f"beliefs P(joint) {b.joint:.2f}, P(complexity high) {b.complexity_high:.2f}, "
            f"E[pieces] {b.expected_pieces():.1f}"
            + (" (calibrated)" if outcome.raw_beliefs is not None else " (uncalibrated)"),
            highlight=False,
        )
    out.print(
        f"took    {outcome.seconds:.2f}s ({outcome.profiler} profiler, prompt {outcome.template})",
        highlight=False,
    )


DEMO_INTRO = (
    "[bold]ragctl[/bold] decides, per query, how many chunks to retrieve and how to combine them "
    "(map_rerank, stuff, map_reduce), from a profile of the question and what the engine can "
    "hold and how fast it answers now, where a RAG service would use one fixed configuration "
    "for every query. Below: the adaptive answer next to a fixed one, with the decision that "
    "explains it."
)


def demo(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", *DATASET_FLAGS),
    questions: int = typer.Option(3, help="How many of the dataset's questions."),
    fixed: str = typer.Option("stuff:5", help="The fixed configuration shown beside ragctl's."),
    learn: int = typer.Option(
        24,
        min=0,
        help="On first use of the collection with this model, label this many calibration "
        "questions with the feedback budget and train the profiler first (0: do not).",
    ),
) -> None:
    """Answer a few questions adaptively (profile, pruned space, chosen configuration and why)
    next to one fixed configuration's answer and time, then the bottom line of both
    (`demo_summary`). On first use of a collection, ragctl first learns which configurations
    answer it (`ragctl profiler train` over `--learn` calibration questions, reused
    afterwards)."""
    settings: Settings = ctx.obj
    from ragctl.evaluation.systems import split
    from ragctl.retrieval.collection import check_dataset, load_queries

    baseline = parse_config(fixed)
    check_dataset(settings.data_dir, dataset)
    out.print(DEMO_INTRO, highlight=False)
    every = load_queries(settings.data_dir, dataset)
    calibration: set[str] = set()
    if learn:
        _, calib = split(every, 1, min(learn, len(every) - 1), 0)
        calibration = {q.id for q in calib}
        _learn_first(settings, dataset, learn)
    # Never a question the profiler was trained on.
    unseen = [q for q in every if q.id not in calibration]
    queries, spare = unseen[:questions], unseen[questions : questions + 1]

    async def run() -> list[tuple[Any, Any, Any]]:
        controller = await open_controller(settings, dataset)
        rows = []

        async def timed(question: str, config: Any = None) -> Any:
            # Each answer from an empty prefix cache: the second of a pair would otherwise
            # reuse the first's prefill of the same chunks and look faster than it is.
            await controller.engine.reset_prefix_cache()
            return await controller.aask(question, config)

        try:
            with tally("answering", len(queries) * 2 + 2 * len(spare)) as advance:
                for q in spare:  # warm-up, not shown: an engine's first calls are slow
                    for config in (None, baseline):
                        await timed(q.question, config)
                        advance()
                for i, q in enumerate(queries):
                    # Alternate which goes first, so neither always meets the engine's state.
                    pair = {}
                    for name in ("adaptive", "fixed") if i % 2 == 0 else ("fixed", "adaptive"):
                        pair[name] = await timed(q.question, baseline if name == "fixed" else None)
                        advance()
                    rows.append((q, pair["adaptive"], pair["fixed"]))
        finally:
            await controller.aclose()
        return rows

    rows = asyncio.run(run())
    model = settings.model or "the embedded model (SmolLM2-135M: mechanics, not quality)"
    out.print(f"[bold]{dataset}[/bold]: ragctl (adaptive) next to fixed {baseline.label}")
    out.print(f"model: {model}")
    for q, adaptive, fixed_answer in rows:
        gold = q.answers[0] if q.answers else ""
        table = Table(title=q.question, caption=f"gold: {_clip(gold, 200)}", title_justify="left",
                      caption_justify="left", expand=True)  # fmt: skip
        table.add_column("system", no_wrap=True)
        table.add_column("answer", ratio=1)
        table.add_column("tokens in+out", justify="right", no_wrap=True)
        table.add_column("seconds", justify="right", no_wrap=True)
        table.add_column("gold in context", no_wrap=True)
        for name, a in (("ragctl " + adaptive.decision.config.label, adaptive),
                        ("fixed " + baseline.label, fixed_answer)):  # fmt: skip
            tk = a.tokens
            table.add_row(name, _clip(a.text, 200), f"{tk['prompt']}+{tk['output']}",
                          f"{a.timings['total']:.1f}", _gold_text(dataset, q, a))  # fmt: skip
        out.print(table)
        for line in decision_lines(adaptive.decision):
            out.print("  " + line, highlight=False)
        t = adaptive.timings
        out.print(f"  profile {t.get('profile', 0):.2f}s of {t['total']:.2f}s", highlight=False)
    if rows:
        out.print(demo_summary(dataset, baseline.label, rows), highlight=False)


def _gold_text(dataset: str, q: Any, answer: Any) -> str:
    hit = _gold_in_context(dataset, q, answer)
    return "n/a" if hit is None else "yes" if hit else "no"


def _gold_in_context(dataset: str, q: Any, answer: Any) -> bool | None:
    """Whether the answer's chunks hold the gold evidence as the dataset's card counts it (any
    one gold document, or all: `evidence_hit`); None without gold ids."""
    from ragctl.evaluation.metrics import evidence_scores

    hit = evidence_scores(dataset, q, [c.doc_id for c in answer.chunks])["evidence_hit"]
    return None if hit is None else hit == 1.0


def demo_summary(dataset: str, fixed: str, rows: list[tuple[Any, Any, Any]]) -> str:
    """The demo's bottom line over its (query, adaptive answer, fixed answer) rows: time in
    all, the dataset's primary answer score and how often the gold evidence was in context, for
    ragctl beside the fixed configuration. Three questions are an anecdote; the evaluation CLI
    measures the same on many (eval/RESULTS.md)."""
    from ragctl.evaluation.metrics import resolve_metric, score

    metric = resolve_metric(dataset)
    sides = {"ragctl": [a for _, a, _ in rows], f"fixed {fixed}": [f for _, _, f in rows]}
    seconds = {k: sum(a.timings["total"] for a in v) for k, v in sides.items()}
    parts = []
    for name, answers in sides.items():
        pairs = [(q, a) for (q, _, _), a in zip(rows, answers, strict=True)]
        scores = [score(metric, a.text, q)[metric.primary] for q, a in pairs]
        known = [s for s in scores if s is not None]
        hits = [h for q, a in pairs if (h := _gold_in_context(dataset, q, a)) is not None]
        text = f"{name} {seconds[name]:.1f} s"
        if known:
            text += f", {metric.primary} {sum(known) / len(known):.2f}"
        if hits:
            text += f", gold in context {sum(hits)} of {len(hits)}"
        parts.append(text)
    ragctl_s, fixed_s = seconds.values()
    ratio = f" (ragctl took {ragctl_s / fixed_s:.2f}x the fixed time)" if fixed_s > 0 else ""
    asked = f"{len(rows)} question" + ("s" if len(rows) != 1 else "")
    return f"in all, {asked}: " + "; ".join(parts) + ratio


def _learn_first(settings: Settings, dataset: str, calibration: int) -> None:
    """Train the profiler of `dataset` when its state has too few labels for this model (the
    state of a collection's first use), on the feedback budget's configurations."""
    from ragctl.cli.common import progress
    from ragctl.evaluation.profiler_train import TrainRequest, train_profiler
    from ragctl.profiler.calibration import MIN_SAMPLES
    from ragctl.profiler.store import ProfilerState

    model = settings.profiler_model_key()
    if settings.profiler == "json" or model is None:
        return
    known = len(ProfilerState.at(settings.cache_dir, model, dataset).records())
    if known >= MIN_SAMPLES:
        return
    configs = ",".join(filter(None, (x.strip() for x in settings.feedback_configs.split(","))))
    if not configs:
        return
    out.print(
        f"First use of {dataset} with {model}: {known} outcome labels, {MIN_SAMPLES} needed. "
        f"Learning from {calibration} calibration questions answered with {configs} (each "
        "labelled with the cheapest that answers it), once; later runs reuse it.",
        highlight=False,
    )
    request = TrainRequest(dataset, calibration, 0, configs, "gold")
    report = train_profiler(settings, request, progress=progress)
    out.print(
        f"learned: {report.labelled} of {report.queries} questions labelled in "
        f"{report.seconds:.0f}s; profiler in use: {report.status.in_use}",
        highlight=False,
    )


def decision_lines(d: Any) -> list[str]:
    """The Decision in a few human lines."""
    if d.reason == "fixed":
        return [f"config  {d.config.label} (fixed)"]
    used = "used" if d.profile_used else f"not used: {d.profile_note}"
    by = f" by {d.profiler}" if d.profiler else ""
    lines = [f"profile {_profile_text(d.profile)}{by} ({used})"]
    if d.beliefs:
        b = d.beliefs
        lines.append(
            f"beliefs P(joint)={b['joint']:.2f} P(high)={b['complexity_high']:.2f} "
            f"E[pieces]={_expected(b['pieces']):.1f}"
        )
    if d.space is not None:
        lines.append(f"space   {_space_text(d.space)}")
    why = d.reason + (", queued for KV memory" if d.queued else "")
    kv = d.kv
    free = f"{kv.free_blocks}/{kv.total_blocks} blocks free" if kv else "KV unknown"
    lines.append(
        f"config  {d.config.label} ({why}: needs {d.need_blocks} blocks; {free}, "
        f"{d.reserved_blocks} reserved in flight)"
    )
    if d.engine not in ("", "in-process"):
        lines.append(f"engine  {d.engine}")
    choice = getattr(d, "choice", None)
    if choice is not None:
        lines.append(f"choice  {choice.objective} among {choice.fitting} that fit: {choice.why}")
    return lines


def _expected(pieces: list[float]) -> float:
    return sum((i + 1) * p for i, p in enumerate(pieces))


def _precheck_question(settings: Settings, question: str) -> None:
    if not question.strip():
        raise InvalidRequest("the question is empty")
    if not settings.engine_url:
        # Fail before the ~30 s engine start; the controller checks the exact prompt again.
        n = serving_tokenizer(settings).count(question)
        if n >= settings.max_model_len:
            raise PromptTooLong(
                f"the question is {n} tokens; the model's context is {settings.max_model_len}"
            )


def _config(method: str, chunks: int | None, ilen: int | None) -> Config:
    """The fixed configuration of `--method`, with the method's defaults where unset."""
    try:
        spec = registry.spec(method)
        if ilen is not None and not spec.takes_intermediate:
            raise InvalidRequest(f"--intermediate-length does not apply to --method {method}")
        return spec.fixed_config(chunks, ilen)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def _profile_text(profile: Any) -> str:
    if profile is None:
        return "none"
    conf = "n/a" if profile.confidence is None else f"{profile.confidence:.2f}"
    lo, hi = profile.summary_length
    return (
        f"complexity={profile.complexity} joint={'yes' if profile.joint_reasoning else 'no'} "
        f"pieces={profile.pieces} summary={lo}-{hi} confidence={conf}"
    )


def _space_text(space: Any) -> str:
    lo, hi = space.num_chunks
    text = f"{'|'.join(space.methods)} x chunks {lo}-{hi}"
    if space.intermediate_lengths:
        text += f" x summary {'/'.join(map(str, space.intermediate_lengths))}"
    return f"{text} (from {space.source})"


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
