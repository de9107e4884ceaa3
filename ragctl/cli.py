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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ragctl.errors import InvalidRequest, PromptTooLong, RagctlError, UserError
from ragctl.settings import Settings

app = typer.Typer(
    name="ragctl",
    help="Query-adaptive RAG controller in front of a vLLM engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The serving model.", no_args_is_help=True)
app.add_typer(model_app, name="model")

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
    max_model_len: int | None = typer.Option(None, help=_help("max_model_len")),
    embedder: str | None = typer.Option(None, help=_help("embedder")),
    embedding_url: str | None = typer.Option(None, help=_help("embedding_url")),
    embedding_api_key: str | None = typer.Option(None, help=_help("embedding_api_key")),
    answer_max_tokens: int | None = typer.Option(None, help=_help("answer_max_tokens")),
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
        max_model_len=max_model_len,
        embedder=embedder,
        embedding_url=embedding_url,
        embedding_api_key=embedding_api_key,
        answer_max_tokens=answer_max_tokens,
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
    method: str = typer.Option("stuff", help="map_rerank | stuff | map_reduce"),
    chunks: int = typer.Option(5, help="Number of chunks (num_chunks)."),
    intermediate_length: int | None = typer.Option(
        None, help="map_reduce: mapper output budget in tokens (default 100)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Answer one question with a fixed configuration."""
    settings: Settings = ctx.obj
    config = _config(method, chunks, intermediate_length)
    if not question.strip():
        raise InvalidRequest("the question is empty")
    if not settings.engine_url:
        # Fail before the ~30 s engine start; the controller checks the exact prompt again.
        n = _serving_tokenizer(settings).count(question)
        if n >= settings.max_model_len:
            raise PromptTooLong(
                f"the question is {n} tokens; the model's context is {settings.max_model_len}"
            )

    async def run() -> Any:
        controller = await _open_controller(settings, dataset)
        try:
            return await controller.ask(question, config)
        finally:
            await controller.aclose()

    answer = asyncio.run(run())
    if json_out:
        print(json.dumps(answer.to_dict(), ensure_ascii=False))
        return
    d = answer.to_dict()
    out.print(f"[bold]{answer.text or '(empty answer)'}[/bold]")
    out.print(f"config  {d['config']}   chunks  {', '.join(d['chunk_ids'])}")
    tk = d["tokens"]
    out.print(f"tokens  {tk['prompt']} prompt + {tk['output']} output in {tk['calls']} calls")
    out.print("timings " + "  ".join(f"{k} {v:.2f}s" for k, v in d["timings"].items()))


# -- demo and bench -------------------------------------------------------------------------


def _demo_configs(chunks: int, ilen: int) -> list[Any]:
    from ragctl.types import Config

    return [
        Config("map_rerank", chunks),
        Config("stuff", chunks),
        Config("map_reduce", chunks, ilen),
    ]


@app.command()
def demo(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", "--dataset", "-d"),
    questions: int = typer.Option(3, help="How many of the dataset's questions."),
    chunks: int = typer.Option(5),
    intermediate_length: int = typer.Option(64),
) -> None:
    """Answer a few questions with each synthesis method and show what each cost."""
    settings: Settings = ctx.obj
    from ragctl.retrieval.collection import load_queries

    queries = load_queries(settings.data_dir, dataset)[:questions]
    configs = _demo_configs(chunks, intermediate_length)

    async def run() -> list[tuple[Any, Any]]:
        controller = await _open_controller(settings, dataset)
        rows = []
        try:
            with _progress() as bar:
                task = bar.add_task("answering", total=len(queries) * len(configs))
                for q in queries:
                    for cfg in configs:
                        rows.append((q, await controller.ask(q.question, cfg)))
                        bar.advance(task)
        finally:
            await controller.aclose()
        return rows

    rows = asyncio.run(run())
    model = settings.model or "the embedded model (SmolLM2-135M: mechanics, not quality)"
    out.print(f"[bold]{dataset}[/bold]: fixed configurations on {model}")
    for i in range(0, len(rows), len(configs)):
        q = rows[i][0]
        gold = q.answers[0] if q.answers else ""
        table = Table(title=q.question, caption=f"gold: {gold}", title_justify="left",
                      caption_justify="left", expand=True)
        table.add_column("config", no_wrap=True)
        table.add_column("answer", ratio=1)
        table.add_column("tokens in+out", justify="right", no_wrap=True)
        table.add_column("seconds", justify="right", no_wrap=True)
        table.add_column("gold in context", no_wrap=True)
        for _, a in rows[i : i + len(configs)]:
            hit = bool(set(q.gold_doc_ids) & {c.doc_id for c in a.chunks})
            tk = a.tokens
            table.add_row(a.decision.config.label, _clip(a.text, 200),
                          f"{tk['prompt']}+{tk['output']}", f"{a.timings['total']:.1f}",
                          "yes" if hit else "no")
        out.print(table)


@app.command()
def bench(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", "--dataset", "-d"),
    questions: int = typer.Option(20),
    chunks: int = typer.Option(5),
    intermediate_length: int = typer.Option(64),
    out_dir: Path = typer.Option(Path("eval/out/bench-fixed"), "--out"),
) -> None:
    """Time each synthesis method on the same questions, interleaved, one question at a time;
    write results.json and samples.jsonl to --out."""
    settings: Settings = ctx.obj
    from ragctl.retrieval.collection import load_queries

    queries = load_queries(settings.data_dir, dataset)[:questions]
    configs = _demo_configs(chunks, intermediate_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"

    async def run() -> tuple[float, float, list[dict[str, Any]]]:
        t = time.perf_counter()
        controller = await _open_controller(settings, dataset)
        startup = time.perf_counter() - t
        samples = []
        try:
            # The first call pays one-off costs (loading the embedding model, the engine's first
            # batch); report it apart instead of charging it to whichever method runs first.
            t = time.perf_counter()
            await controller.ask(queries[0].question, configs[0])
            warmup = time.perf_counter() - t
            with _progress() as bar, open(samples_path, "w") as f:
                task = bar.add_task("bench", total=len(queries) * len(configs))
                for q in queries:
                    # Interleaved: every method sees the same machine conditions.
                    for cfg in configs:
                        a = await controller.ask(q.question, cfg)
                        row = {"query_id": q.id, "gold": list(q.answers[:1]),
                               "gold_doc_ids": list(q.gold_doc_ids), **a.to_dict()}
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
        "methods": summary,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    table = Table(title=f"{dataset}: {len(queries)} questions, {chunks} chunks, one at a time")
    for col in ("config", "mean s/q", "p50 s", "prompt tok", "output tok", "calls", "evidence"):
        table.add_column(col, no_wrap=True)
    for label, s in summary.items():
        table.add_row(label, f"{s['mean_seconds']:.2f}", f"{s['p50_seconds']:.2f}",
                      str(s["prompt_tokens"]), str(s["output_tokens"]), str(s["calls"]),
                      f"{s['evidence_recall']:.2f}")
    out.print(table)
    out.print(
        f"engine start-up {startup:.1f}s, first (warm-up) call {warmup:.1f}s, not counted; "
        f"results in {out_dir}/results.json"
    )


def _bench_summary(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by_config: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_config.setdefault(s["config"], []).append(s)
    summary = {}
    for label, rows in by_config.items():
        secs = [r["timings"]["total"] for r in rows]
        recall = [
            len(set(r["gold_doc_ids"]) & set(r["doc_ids"])) / len(r["gold_doc_ids"])
            for r in rows if r["gold_doc_ids"]
        ]
        summary[label] = {
            "n": len(rows),
            "mean_seconds": statistics.fmean(secs),
            "p50_seconds": statistics.median(secs),
            "prompt_tokens": sum(r["tokens"]["prompt"] for r in rows),
            "output_tokens": sum(r["tokens"]["output"] for r in rows),
            "calls": sum(r["tokens"]["calls"] for r in rows),
            "evidence_recall": statistics.fmean(recall) if recall else 0.0,
        }
    return summary


# -- plumbing -------------------------------------------------------------------------------


def _config(method: str, chunks: int, ilen: int | None) -> Any:
    from ragctl.types import Config

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

    with _progress() as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{dataset}: {stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return open_retriever(settings, dataset, tokenizer, rebuild=rebuild, progress=progress)


async def _open_controller(settings: Settings, dataset: str) -> Any:
    """Check the dataset first (cheap, clear errors), then start the engine, then the index."""
    from ragctl.controller import Controller
    from ragctl.engine import open_engine
    from ragctl.retrieval.collection import check_dataset

    card = check_dataset(settings.data_dir, dataset)
    where = settings.engine_url or "in-process"
    with _status(f"starting the engine ({where})"):
        engine = await open_engine(settings)
    try:
        retriever = _open_retriever(settings, dataset, engine.tokenizer)
        return Controller(
            engine,
            retriever,
            answer_max_tokens=settings.answer_max_tokens or card.answer_max_tokens,
            temperature=settings.temperature,
        )
    except BaseException:
        await engine.aclose()
        raise


@contextmanager
def _status(text: str) -> Iterator[None]:
    with err.status(text):
        yield


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    )


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

