"""`ragctl` command line (typer + rich). Global options are the settings (each also readable
from `RAGCTL_<NAME>`); errors print one line on stderr and exit non-zero (2: you asked wrongly,
1: it failed while running)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ragctl.allocation.cli import allocate, load_plan_option
from ragctl.console import progress_bar, stage_progress
from ragctl.errors import InvalidRequest, PromptTooLong, RagctlError, RuntimeFailure, UserError
from ragctl.evaluation.cli import eval_app
from ragctl.rules.cli import rules_app
from ragctl.settings import Settings
from ragctl.types import Config

app = typer.Typer(
    name="ragctl",
    help="Query-adaptive RAG controller in front of a vLLM engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The serving model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(rules_app, name="rules")
app.add_typer(eval_app, name="eval")
app.command("allocate")(allocate)

out = Console()
err = Console(stderr=True)


def _help(field: str) -> str:
    return Settings.model_fields[field].description or ""


@app.callback()
def _global(
    ctx: typer.Context,
    model: str | None = typer.Option(None, help=_help("model")),
    tokenizer: str | None = typer.Option(None, help=_help("tokenizer")),
    engine_url: str | None = typer.Option(None, help=_help("engine_url")),
    engine_api_key: str | None = typer.Option(None, help=_help("engine_api_key")),
    engine_timeout_s: float | None = typer.Option(None, help=_help("engine_timeout_s")),
    data_dir: Path | None = typer.Option(None, help=_help("data_dir")),
    cache_dir: Path | None = typer.Option(None, help=_help("cache_dir")),
    kv_cache_gib: float | None = typer.Option(None, help=_help("kv_cache_gib")),
    kv_cache_blocks: int | None = typer.Option(None, help=_help("kv_cache_blocks")),
    max_model_len: int | None = typer.Option(None, help=_help("max_model_len")),
    embedder: str | None = typer.Option(None, help=_help("embedder")),
    embedding_url: str | None = typer.Option(None, help=_help("embedding_url")),
    embedding_api_key: str | None = typer.Option(None, help=_help("embedding_api_key")),
    answer_max_tokens: int | None = typer.Option(None, help=_help("answer_max_tokens")),
    rules: Path | None = typer.Option(None, "--rules", help=_help("rules_file")),
    profiler_url: str | None = typer.Option(None, help=_help("profiler_url")),
    profiler_model: str | None = typer.Option(None, help=_help("profiler_model")),
    profiler_api_key: str | None = typer.Option(None, help=_help("profiler_api_key")),
    golden_every: int | None = typer.Option(None, help=_help("golden_every")),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the engine's own logs."),
) -> None:
    if not verbose:
        # vLLM and transformers log every step at INFO and warn about CPU tuning; keep the
        # terminal for results (children inherit these, so the engine process is quiet too).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx.obj = Settings().with_overrides(
        model=model,
        tokenizer=tokenizer,
        engine_url=engine_url,
        engine_api_key=engine_api_key,
        engine_timeout_s=engine_timeout_s,
        data_dir=data_dir,
        cache_dir=cache_dir,
        kv_cache_gib=kv_cache_gib,
        kv_cache_blocks=kv_cache_blocks,
        max_model_len=max_model_len,
        embedder=embedder,
        embedding_url=embedding_url,
        embedding_api_key=embedding_api_key,
        answer_max_tokens=answer_max_tokens,
        rules_file=rules,
        profiler_url=profiler_url,
        profiler_model=profiler_model,
        profiler_api_key=profiler_api_key,
        golden_every=golden_every,
    )


# -- model ----------------------------------------------------------------------------------


@model_app.command("prepare")
def model_prepare(
    ctx: typer.Context,
    force: bool = typer.Option(False, help="Convert again even if a verified folder exists."),
) -> None:
    """Convert the packaged SmolLM2-135M GGUF into an HF folder vLLM loads (once)."""
    from ragctl.engine.embedded_model import prepare

    settings: Settings = ctx.obj
    with _status("preparing the embedded model (SHA-256 check, GGUF -> safetensors)"):
        done = prepare(settings.cache_dir, force=force)
    verb = "converted" if done.converted else "already prepared, verified"
    out.print(f"model {verb}: {done.path} ({done.seconds:.1f}s)")


# -- index ----------------------------------------------------------------------------------


@app.command()
def index(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", "--dataset", "-d", help="Dataset card name."),
    rebuild: bool = typer.Option(False, help="Rebuild even if a current index exists."),
) -> None:
    """Chunk, embed and index a dataset (reused until data, chunking or embedder change)."""
    from ragctl.retrieval.collection import load_card

    settings: Settings = ctx.obj
    load_card(dataset)
    t = time.perf_counter()
    retriever = _open_retriever(settings, dataset, _serving_tokenizer(settings), rebuild=rebuild)
    out.print(
        f"index {dataset}: {len(retriever.chunks)} chunks, embedder {retriever.embedder_name}, "
        f"{retriever.path} ({time.perf_counter() - t:.1f}s)"
    )


# -- ask ------------------------------------------------------------------------------------


@app.command()
def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question."),
    dataset: str = typer.Option("squad", "--dataset", "-d", help="Collection to answer from."),
    method: str | None = typer.Option(
        None, help="Fix the method (map_rerank | stuff | map_reduce). Unset: adaptive."
    ),
    chunks: int = typer.Option(5, help="With --method: number of chunks (num_chunks)."),
    intermediate_length: int | None = typer.Option(
        None, help="With --method map_reduce: mapper output budget in tokens (default 100)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Answer one question: adaptively (profile, rules, best-fit), or with --method fixed."""
    settings: Settings = ctx.obj
    config = _config(method, chunks, intermediate_length) if method else None
    if method is None and intermediate_length is not None:
        raise InvalidRequest("--intermediate-length applies to --method map_reduce only")
    _precheck_question(settings, question)

    async def run() -> Any:
        # Checks the dataset and the rules file before the engine starts.
        controller = await _open_controller(settings, dataset)
        try:
            return await controller.aask(question, config)
        finally:
            await controller.aclose()

    answer = asyncio.run(run())
    if json_out:
        print(json.dumps(answer.to_dict(), ensure_ascii=False))
        return
    d = answer.to_dict()
    out.print(f"[bold]{answer.text or '(empty answer)'}[/bold]")
    for line in _decision_lines(answer.decision):
        out.print(line, highlight=False)
    out.print(f"chunks  {', '.join(d['chunk_ids'])}", highlight=False)
    tk = d["tokens"]
    out.print(f"tokens  {tk['prompt']} prompt + {tk['output']} output in {tk['calls']} calls")
    out.print("timings " + "  ".join(f"{k} {v:.2f}s" for k, v in d["timings"].items()))


def _precheck_question(settings: Settings, question: str) -> None:
    if not question.strip():
        raise InvalidRequest("the question is empty")
    if not settings.engine_url:
        # Fail before the ~30 s engine start; the controller checks the exact prompt again.
        n = _serving_tokenizer(settings).count(question)
        if n >= settings.max_model_len:
            raise PromptTooLong(
                f"the question is {n} tokens; the model's context is {settings.max_model_len}"
            )


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


def _decision_lines(d: Any) -> list[str]:
    """The Decision in a few human lines."""
    if d.reason == "fixed":
        return [f"config  {d.config.label} (fixed)"]
    used = "used" if d.profile_used else f"not used: {d.profile_note}"
    lines = [f"profile {_profile_text(d.profile)} ({used})"]
    if d.space is not None:
        lines.append(f"space   {_space_text(d.space)}")
    why = d.reason + (", queued for KV memory" if d.queued else "")
    kv = d.kv
    free = f"{kv.free_blocks}/{kv.total_blocks} blocks free" if kv else "KV unknown"
    lines.append(
        f"config  {d.config.label} ({why}: needs {d.need_blocks} blocks; {free}, "
        f"{d.reserved_blocks} reserved in flight)"
    )
    return lines


@app.command()
def profile(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question."),
    dataset: str = typer.Option("squad", "--dataset", "-d", help="Collection it is asked of."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Profile one question (complexity, joint reasoning, pieces, summary length, confidence)
    and show the configuration space the rules give it."""
    settings: Settings = ctx.obj
    from ragctl.controller import resolve_space
    from ragctl.profiler import open_profiler
    from ragctl.retrieval.collection import check_dataset

    _precheck_question(settings, question)
    rules = _load_rules(settings)
    card = check_dataset(settings.data_dir, dataset)

    async def run() -> Any:
        engine = await _start_engine(settings)
        profiler = await open_profiler(settings, engine)
        try:
            return await profiler.profile(
                question.strip(), card.metadata, card.chunking.size, collection=card.name
            )
        finally:
            await profiler.aclose()
            await engine.aclose()

    outcome = asyncio.run(run())
    choice = resolve_space(outcome, rules, (), settings.confidence_threshold)
    if json_out:
        print(
            json.dumps(
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
                },
                ensure_ascii=False,
            )
        )
        return
    used = "trusted" if choice.profile_used else f"not trusted: {choice.note}"
    out.print(f"profile {_profile_text(outcome.profile)} ({used})", highlight=False)
    out.print(f"space   {_space_text(choice.space)}", highlight=False)
    out.print(f"took    {outcome.seconds:.2f}s (prompt {outcome.template})", highlight=False)


# -- demo and bench -------------------------------------------------------------------------


# -- serve ----------------------------------------------------------------------------------


@app.command()
def serve(
    ctx: typer.Context,
    dataset: str = typer.Option(
        "squad", "--dataset", "-d", help="Default collection (opened at start; others on use)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: str | None = typer.Option(
        None, envvar="RAGCTL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."
    ),
    engine_url: str | None = typer.Option(
        None, help="Serve from this running vLLM server instead of an in-process engine."
    ),
    max_inflight: int = typer.Option(
        64, min=1, help="Requests answered at once; more get 429 with Retry-After."
    ),
    log_level: str = typer.Option("warning", help="uvicorn's log level."),
    slo_ms: int | None = typer.Option(None, min=1, help=_help("slo_ms")),
    slo_mitigation: str | None = typer.Option(None, help=_help("slo_mitigation")),
    plan_file: Path | None = typer.Option(
        None,
        "--plan",
        help="An allocation plan (`ragctl allocate`): batch sizes, threads, engine sequences.",
    ),
) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics. Model `ragctl/auto` is adaptive; `ragctl/<method>` fixes the method."""
    from ragctl.scheduler.slo import Mitigation
    from ragctl.server import ServerOptions
    from ragctl.server import serve as run_server

    settings: Settings = ctx.obj.with_overrides(
        engine_url=engine_url, slo_ms=slo_ms, slo_mitigation=slo_mitigation
    )
    Mitigation.parse(settings.slo_mitigation)  # a typo fails before the engine starts
    allocation = load_plan_option(plan_file, dataset)
    if allocation is not None:
        settings = allocation.apply(settings)
    options = ServerOptions(dataset, api_key=api_key or None, max_inflight=max_inflight)
    where = settings.engine_url or "in-process"
    err.print(f"[dim]starting the engine ({where}) and opening {dataset}[/dim]")
    run_server(
        settings, options, host=host, port=port, log_level=log_level,
        on_ready=lambda: err.print(
            f"ragctl serving {dataset} on http://{host}:{port}/v1 (engine: {where})",
            highlight=False,
        ),
    )  # fmt: skip


# -- demo and bench -------------------------------------------------------------------------


@app.command()
def demo(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", "--dataset", "-d"),
    questions: int = typer.Option(3, help="How many of the dataset's questions."),
    fixed: str = typer.Option("stuff:5", help="The fixed configuration shown beside ragctl's."),
) -> None:
    """Answer a few questions adaptively (profile, pruned space, chosen configuration and why)
    next to one fixed configuration's answer and time."""
    settings: Settings = ctx.obj
    from ragctl.retrieval.collection import load_queries

    baseline = _parse_config(fixed)
    queries = load_queries(settings.data_dir, dataset)[:questions]

    async def run() -> list[tuple[Any, Any, Any]]:
        controller = await _open_controller(settings, dataset)
        rows = []
        try:
            with _progress() as bar:
                task = bar.add_task("answering", total=len(queries) * 2)
                for q in queries:
                    adaptive = await controller.aask(q.question)
                    bar.advance(task)
                    rows.append((q, adaptive, await controller.aask(q.question, baseline)))
                    bar.advance(task)
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
            hit = bool(set(q.gold_doc_ids) & {c.doc_id for c in a.chunks})
            tk = a.tokens
            table.add_row(name, _clip(a.text, 200), f"{tk['prompt']}+{tk['output']}",
                          f"{a.timings['total']:.1f}", "yes" if hit else "no")  # fmt: skip
        out.print(table)
        for line in _decision_lines(adaptive.decision):
            out.print("  " + line, highlight=False)
        t = adaptive.timings
        out.print(f"  profile {t.get('profile', 0):.2f}s of {t['total']:.2f}s", highlight=False)


def _parse_config(text: str) -> Any:
    try:
        return Config.parse(text)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


bench_app = typer.Typer(help="Measurements (figures for eval/RESULTS.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

DEFAULT_SYSTEMS = "ragctl,map_rerank:5,stuff:5,map_reduce:5:64"


def _systems(text: str) -> list[Any]:
    """`ragctl` (adaptive) or a fixed `method:chunks[:ilen]`, comma-separated."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InvalidRequest("--systems is empty")
    return [None if n == "ragctl" else _parse_config(n) for n in names]


def _system_label(config: Any) -> str:
    return "ragctl" if config is None else config.label


@bench_app.command("configs")
def bench_configs(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", "--dataset", "-d"),
    questions: int = typer.Option(20),
    systems: str = typer.Option(DEFAULT_SYSTEMS, help="ragctl and/or fixed method:chunks[:ilen]."),
    out_dir: Path = typer.Option(Path("eval/out/bench-configs"), "--out"),
) -> None:
    """Time ragctl and fixed configurations on the same questions, interleaved, one question at
    a time; write results.json and samples.jsonl to --out."""
    settings: Settings = ctx.obj
    from ragctl.retrieval.collection import load_queries

    configs = _systems(systems)
    queries = load_queries(settings.data_dir, dataset)[:questions]
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"

    async def run() -> tuple[float, float, list[dict[str, Any]]]:
        t = time.perf_counter()
        controller = await _open_controller(settings, dataset)
        startup = time.perf_counter() - t
        samples = []
        try:
            # The first call pays one-off costs (loading the embedding model, the engine's first
            # batch); report it apart instead of charging it to whichever system runs first.
            t = time.perf_counter()
            await controller.aask(queries[0].question, Config("stuff", 1))
            warmup = time.perf_counter() - t
            with _progress() as bar, open(samples_path, "w") as f:
                task = bar.add_task("bench", total=len(queries) * len(configs))
                for q in queries:
                    # Interleaved: every system sees the same machine conditions.
                    for cfg in configs:
                        a = await controller.aask(q.question, cfg)
                        row = {"query_id": q.id, "system": _system_label(cfg),
                               "gold": list(q.answers[:1]), "gold_doc_ids": list(q.gold_doc_ids),
                               **a.to_dict()}  # fmt: skip
                        samples.append(row)
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        bar.advance(task)
        finally:
            await controller.aclose()
        return startup, warmup, samples

    startup, warmup, samples = asyncio.run(run())
    summary = _bench_summary(samples)
    result = {
        "dataset": dataset,
        "questions": len(queries),
        "model": settings.model or "embedded:SmolLM2-135M-Instruct",
        "engine": settings.engine_url or "in-process",
        "engine_startup_seconds": round(startup, 2),
        "warmup_seconds": round(warmup, 2),
        "systems": summary,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    table = Table(title=f"{dataset}: {len(queries)} questions, one at a time")
    cols = ("system", "mean s/q", "p50 s", "profile share", "prompt tok", "output tok", "calls",
            "evidence", "configs")  # fmt: skip
    for col in cols:
        table.add_column(col, no_wrap=col != "configs")
    for label, s in summary.items():
        share = s.get("profile_share")
        top = ", ".join(f"{k} x{v}" for k, v in list(s["configs"].items())[:3])
        table.add_row(
            label,
            f"{s['mean_seconds']:.2f}",
            f"{s['p50_seconds']:.2f}",
            "-" if share is None else f"{share:.1%}",
            str(s["prompt_tokens"]),
            str(s["output_tokens"]),
            str(s["calls"]),
            f"{s['evidence_recall']:.2f}",
            top,
        )
    out.print(table)
    out.print(
        f"engine start-up {startup:.1f}s, first (warm-up) call {warmup:.1f}s, not counted; "
        f"results in {out_dir}/results.json"
    )


def _bench_summary(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_system: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_system.setdefault(s["system"], []).append(s)
    summary = {}
    for label, rows in by_system.items():
        secs = [r["timings"]["total"] for r in rows]
        recall = [
            len(set(r["gold_doc_ids"]) & set(r["doc_ids"])) / len(r["gold_doc_ids"])
            for r in rows if r["gold_doc_ids"]
        ]  # fmt: skip
        profile = [r["timings"]["profile"] for r in rows if "profile" in r["timings"]]
        configs = Counter(r["config"] for r in rows)
        summary[label] = {
            "n": len(rows),
            "mean_seconds": statistics.fmean(secs),
            "p50_seconds": statistics.median(secs),
            "p95_seconds": _quantile(secs, 0.95),
            # Profiler time over end-to-end time, summed over the questions.
            "profile_share": sum(profile) / sum(secs) if profile else None,
            "profile_mean_seconds": statistics.fmean(profile) if profile else None,
            "prompt_tokens": sum(r["tokens"]["prompt"] for r in rows),
            "output_tokens": sum(r["tokens"]["output"] for r in rows),
            "calls": sum(r["tokens"]["calls"] for r in rows),
            "evidence_recall": statistics.fmean(recall) if recall else 0.0,
            "configs": dict(configs.most_common()),
        }
    return summary


def _quantile(values: list[float], q: float) -> float:
    from ragctl.benchmarks import percentile

    return percentile(values, q)


@bench_app.command("overhead")
def bench_overhead(
    ctx: typer.Context,
    decisions: int = typer.Option(1000, help="Synthetic decisions to time."),
    dataset: str = typer.Option("squad", "--dataset", "-d", help="Chunks drawn from this index."),
    seed: int = typer.Option(0),
    out_dir: Path = typer.Option(Path("eval/out/bench-overhead"), "--out"),
) -> None:
    """The controller's own cost per query, LLM calls excluded: rules, best-fit (with call
    sizing), reservation bookkeeping and the Decision record, over synthetic decisions."""
    settings: Settings = ctx.obj
    from ragctl.benchmarks import overhead_run
    from ragctl.retrieval.collection import check_dataset
    from ragctl.synthesis.methods import Synthesizer

    card = check_dataset(settings.data_dir, dataset)
    rules = _load_rules(settings)
    tokenizer = _serving_tokenizer(settings)
    retriever = _open_retriever(settings, dataset, tokenizer)
    synthesizer = Synthesizer(
        tokenizer, settings.max_model_len, settings.answer_max_tokens or card.answer_max_tokens
    )
    with _status(f"timing {decisions} decisions"):
        result = overhead_run(synthesizer, rules, retriever.chunks, decisions=decisions, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    table = Table(title=f"controller overhead, {decisions} decisions, LLM calls excluded")
    for col in ("part", "p50 ms", "p99 ms"):
        table.add_column(col)
    for key, name in (("policy_ms", "rules + best-fit + bookkeeping"),
                      ("sizing_ms", f"call sizing ({result['chunks_per_decision']} chunks)"),
                      ("total_ms", "total")):  # fmt: skip
        table.add_row(name, f"{result[key]['p50']:.3f}", f"{result[key]['p99']:.3f}")
    out.print(table)
    out.print(f"reasons {result['reasons']}; results in {out_dir}/results.json", highlight=False)


@bench_app.command("profiler")
def bench_profiler(
    ctx: typer.Context,
    datasets: str = typer.Option("squad,musique,finsec,qmsum", "--datasets"),
    questions: int = typer.Option(30, help="Questions per dataset."),
    out_dir: Path = typer.Option(Path("eval/out/bench-profiler"), "--out"),
) -> None:
    """Profiler agreement with what each dataset annotates (MuSiQue hops, FinSec question type,
    QMSum query type; SQuAD is single-fact): confusion tables per dataset, over questions
    spread evenly across the annotated classes."""
    settings: Settings = ctx.obj
    from ragctl.benchmarks import agreement_run, agreement_tables, spread_by_class
    from ragctl.profiler import open_profiler
    from ragctl.retrieval.collection import check_dataset, load_queries

    names = [d.strip() for d in datasets.split(",") if d.strip()]
    cards = {d: check_dataset(settings.data_dir, d) for d in names}
    # Spread over each dataset's annotated classes, so every row of the tables is filled.
    queries = {d: spread_by_class(d, load_queries(settings.data_dir, d), questions) for d in names}

    async def run() -> dict[str, Any]:
        engine = await _start_engine(settings)
        profiler = await open_profiler(settings, engine)
        try:
            results = {}
            for d in names:
                card = cards[d]
                with _status(f"profiling {len(queries[d])} {d} questions"):
                    rows = await agreement_run(
                        profiler, d, card.metadata, card.chunking.size, queries[d]
                    )
                results[d] = agreement_tables(d, rows)
            return results
        finally:
            await profiler.aclose()
            await engine.aclose()

    results = asyncio.run(run())
    out_dir.mkdir(parents=True, exist_ok=True)
    profiler_model = settings.profiler_model or settings.profiler_url or settings.model
    payload = {"profiler": profiler_model or "embedded:SmolLM2-135M-Instruct", **results}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
    for d, r in results.items():
        agree = r["joint_agreement"]
        out.print(
            f"[bold]{d}[/bold]: {r['queries']} questions, {r['failed']} failed, joint-reasoning "
            f"agreement {'n/a' if agree is None else f'{agree:.0%}'} of {r['joint_scored']}, "
            f"mean confidence {r['mean_confidence'] or 0:.2f}, {r['mean_seconds']:.2f}s each"
        )
        for name, t in r["tables"].items():
            cols = sorted({c for row in t.values() for c in row})
            table = Table(title=f"{d}: annotated class x predicted {name}", title_justify="left")
            table.add_column("class")
            for c in cols:
                table.add_column(c, justify="right")
            for cls, row in sorted(t.items()):
                table.add_row(cls, *(str(row.get(c, 0)) for c in cols))
            out.print(table)
    out.print(f"results in {out_dir}/results.json")


@bench_app.command("load")
def bench_load(
    ctx: typer.Context,
    url: str = typer.Option(..., help="A running `ragctl serve`, e.g. http://127.0.0.1:8000."),
    dataset: str = typer.Option("squad", "--dataset", "-d", help="Where the questions come from."),
    requests: int = typer.Option(50, min=1, help="Requests in all."),
    concurrency: int = typer.Option(50, min=1, help="Requests in flight at once."),
    model: str = typer.Option("ragctl/auto", help="Model to ask (ragctl/auto, ragctl/stuff, ...)."),
    api_key: str | None = typer.Option(None, envvar="RAGCTL_API_KEY", help="The server's key."),
    timeout_s: float = typer.Option(600.0, help="Per-request client timeout."),
    out_file: Path = typer.Option(Path("eval/out/bench-load/results.json"), "--out"),
) -> None:
    """Load test over HTTP with the openai client: answered, rejected (429/503), failed, and
    latency percentiles; every request is accounted for."""
    from ragctl.loadtest import chat_load
    from ragctl.retrieval.collection import load_queries

    settings: Settings = ctx.obj
    qs = [q.question for q in load_queries(settings.data_dir, dataset)]
    with _status(f"{requests} requests at concurrency {concurrency} to {url}"):
        result = asyncio.run(
            chat_load(
                url,
                qs,
                requests=requests,
                concurrency=concurrency,
                model=model,
                api_key=api_key,
                timeout_s=timeout_s,
            )  # fmt: skip
        )
    d = result.to_dict()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({"url": url, "model": model, **d}, indent=2) + "\n")
    table = Table("requests", "answered", "rejected", "failed", "p50 s", "p95 s", "wall s", "qps")
    table.add_row(
        str(d["requests"]), str(d["completed"]),
        ", ".join(f"{k}: {v}" for k, v in d["rejected"].items()) or "0",
        ", ".join(f"{k}: {v}" for k, v in d["failed"].items()) or "0",
        _fmt(d["p50_s"]), _fmt(d["p95_s"]), f"{d['wall_s']:.1f}", f"{d['throughput_qps']:.2f}",
    )  # fmt: skip
    out.print(table)
    out.print(f"configurations: {d['configs']}", highlight=False)
    out.print(f"results in {out_file}")
    if result.accounted != requests:
        raise RuntimeFailure(f"{requests - result.accounted} requests unaccounted for")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


@bench_app.command("pressure")
def bench_pressure(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", "--dataset", "-d"),
    questions: int = typer.Option(12, help="Questions sent at once."),
    stagger_ms: float = typer.Option(0.0, help="Delay between arrivals."),
    out_dir: Path = typer.Option(Path("eval/out/bench-pressure"), "--out"),
) -> None:
    """Many adaptive queries at once (use a small --kv-cache-gib): the configurations chosen as
    free KV shrinks, who queued, and that every query was answered."""
    settings: Settings = ctx.obj
    from ragctl.benchmarks import pressure_run
    from ragctl.retrieval.collection import load_queries

    qs = [q.question for q in load_queries(settings.data_dir, dataset)[:questions]]

    async def run() -> tuple[list[dict[str, Any]], dict[str, int]]:
        controller = await _open_controller(settings, dataset)
        try:
            await controller.aask(qs[0], Config("stuff", 1))  # warm-up, not counted
            rows = await pressure_run(controller, qs, stagger_s=stagger_ms / 1000)
            return rows, dict(controller.counters)
        finally:
            await controller.aclose()

    rows, counters = asyncio.run(run())
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "dataset": dataset,
        "questions": len(qs),
        "answered": sum(r["answered"] for r in rows),
        "kv_cache_blocks": settings.kv_cache_blocks,
        "counters": counters,
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    table = Table(title=f"{len(qs)} {dataset} queries at once, in decision order")
    for col in ("#", "decided s", "free", "reserved", "space", "config", "need", "reason",
                "queued s", "total s"):  # fmt: skip
        table.add_column(col, no_wrap=True)
    for r in rows:
        sp = r["space"]
        space = f"{'|'.join(sp['methods'])} {sp['num_chunks'][0]}-{sp['num_chunks'][1]}"
        table.add_row(
            str(r["i"]),
            f"{r['decided_s']:.2f}",
            str(r["free_blocks"]),
            str(r["reserved_blocks"]),
            space,
            r["config"],
            str(r["need_blocks"]),
            r["reason"],
            f"{r['queue_s']:.2f}",
            f"{r['seconds']:.2f}",
        )
    out.print(table)
    total = rows[0]["total_blocks"] if rows else 0
    out.print(f"{result['answered']}/{len(qs)} answered; KV cache {total} blocks; "
              f"results in {out_dir}/results.json")  # fmt: skip


# -- plumbing -------------------------------------------------------------------------------


def _config(method: str, chunks: int, ilen: int | None) -> Any:
    if method == "map_reduce" and ilen is None:
        ilen = 100
    if method != "map_reduce" and ilen is not None:
        raise InvalidRequest("--intermediate-length applies to --method map_reduce only")
    try:
        return Config(method, chunks, ilen)  # type: ignore[arg-type]
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def _serving_tokenizer(settings: Settings) -> Any:
    from ragctl.engine.embedded_model import resolve_model
    from ragctl.engine.tokenizer import Tokenizer

    with _status("loading the tokenizer"):
        model = resolve_model(settings.model, settings.cache_dir)
        return Tokenizer.load(settings.tokenizer or model)


def _open_retriever(settings: Settings, dataset: str, tokenizer: Any, rebuild: bool = False) -> Any:
    from ragctl.retrieval.index import open_retriever

    with stage_progress(err, dataset) as (_, progress):
        return open_retriever(settings, dataset, tokenizer, rebuild=rebuild, progress=progress)


def _load_rules(settings: Settings) -> Any:
    from ragctl.rules import load_rules

    return load_rules(settings.rules_file)


async def _start_engine(settings: Settings) -> Any:
    from ragctl.engine import open_engine

    where = settings.engine_url or "in-process"
    with _status(f"starting the engine ({where})"):
        return await open_engine(settings)


async def _open_controller(settings: Settings, dataset: str) -> Any:
    """Check the dataset and rules first (cheap, clear errors), then start the engine, then
    the profiler and the index (with progress bars when it is built)."""
    from ragctl.service import open_controller

    where = settings.engine_url or "in-process"
    with stage_progress(err, dataset) as (bar, progress):
        bar.console.print(f"[dim]starting the engine ({where}) and opening {dataset}[/dim]")
        return await open_controller(settings, dataset, progress=progress)


@contextmanager
def _status(text: str) -> Iterator[None]:
    with err.status(text):
        yield


def _progress() -> Progress:
    return progress_bar(err, transient=True)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="ragctl")
    except RagctlError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        err.print(f"error: invalid setting {where}: {first['msg']}", markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
