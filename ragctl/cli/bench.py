"""`ragctl bench configs | overhead | profiler | load | pressure`: options in, a
`ragctl.benchmarks` run, tables out."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ragctl.cli.common import (
    DATASET_FLAGS,
    load_rules,
    open_controller,
    open_retriever,
    out,
    parse_config,
    serving_tokenizer,
    status,
    tally,
)
from ragctl.errors import RuntimeFailure
from ragctl.settings import Settings

app = typer.Typer(help="Measurements (figures for eval/RESULTS.md).", no_args_is_help=True)

DEFAULT_SYSTEMS = "ragctl,map_rerank:5,stuff:5,map_reduce:5:64"


@app.command("configs")
def configs(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", *DATASET_FLAGS),
    questions: int = typer.Option(20),
    systems: str = typer.Option(DEFAULT_SYSTEMS, help="ragctl and/or fixed method:chunks[:ilen]."),
    out_dir: Path = typer.Option(Path("eval/out/bench-configs"), "--out"),
) -> None:
    """Time ragctl and fixed configurations on the same questions, interleaved, one question at
    a time; write results.json and samples.jsonl to --out."""
    from ragctl.benchmarks import configs_bench, parse_systems

    settings: Settings = ctx.obj
    run = configs_bench(
        settings, dataset, questions, parse_systems(systems), out_dir,
        open_controller=open_controller, tally=tally,
    )  # fmt: skip
    result = asyncio.run(run)
    table = Table(title=f"{dataset}: {result['questions']} questions, one at a time")
    cols = ("system", "mean s/q", "p50 s", "profile share", "prompt tok", "output tok", "calls",
            "evidence", "configs")  # fmt: skip
    for col in cols:
        table.add_column(col, no_wrap=col != "configs")
    for label, s in result["systems"].items():
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
        f"engine start-up {result['engine_startup_seconds']:.1f}s, first (warm-up) call "
        f"{result['warmup_seconds']:.1f}s, not counted; results in {out_dir}/results.json"
    )


@app.command("overhead")
def overhead(
    ctx: typer.Context,
    decisions: int = typer.Option(1000, help="Synthetic decisions to time."),
    dataset: str = typer.Option("squad", *DATASET_FLAGS, help="Chunks drawn from this index."),
    seed: int = typer.Option(0),
    out_dir: Path = typer.Option(Path("eval/out/bench-overhead"), "--out"),
) -> None:
    """The controller's own cost per query, LLM calls excluded: rules, best-fit (with call
    sizing), reservation bookkeeping and the Decision record, over synthetic decisions."""
    from ragctl.benchmarks import overhead_bench
    from ragctl.retrieval.collection import check_dataset

    settings: Settings = ctx.obj
    card = check_dataset(settings.data_dir, dataset)
    rules = load_rules(settings)
    tokenizer = serving_tokenizer(settings)
    retriever = open_retriever(settings, dataset, tokenizer)
    with status(f"timing {decisions} decisions"):
        result = overhead_bench(
            settings, card, rules, tokenizer, retriever.chunks, out_dir,
            decisions=decisions, seed=seed,
        )  # fmt: skip
    table = Table(title=f"controller overhead, {decisions} decisions, LLM calls excluded")
    for col in ("part", "p50 ms", "p99 ms"):
        table.add_column(col)
    for key, name in (("policy_ms", "rules + best-fit + bookkeeping"),
                      ("sizing_ms", f"call sizing ({result['chunks_per_decision']} chunks)"),
                      ("total_ms", "total")):  # fmt: skip
        table.add_row(name, f"{result[key]['p50']:.3f}", f"{result[key]['p99']:.3f}")
    out.print(table)
    out.print(f"reasons {result['reasons']}; results in {out_dir}/results.json", highlight=False)


@app.command("profiler")
def profiler(
    ctx: typer.Context,
    datasets: str = typer.Option("squad,musique,finsec,qmsum", "--datasets"),
    questions: int = typer.Option(30, help="Questions per dataset."),
    out_dir: Path = typer.Option(Path("eval/out/bench-profiler"), "--out"),
) -> None:
    """Profiler agreement with what each dataset annotates (MuSiQue hops, FinSec question type,
    QMSum query type; SQuAD is single-fact): confusion tables per dataset, over questions
    spread evenly across the annotated classes."""
    from ragctl.benchmarks import profiler_bench

    settings: Settings = ctx.obj
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    payload = asyncio.run(profiler_bench(settings, names, questions, out_dir, status=status))
    for d in names:
        r = payload[d]
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


@app.command("load")
def load(
    ctx: typer.Context,
    url: str = typer.Option(..., help="A running `ragctl serve`, e.g. http://127.0.0.1:8000."),
    dataset: str = typer.Option("squad", *DATASET_FLAGS, help="Where the questions come from."),
    requests: int = typer.Option(50, min=1, help="Requests in all."),
    concurrency: int = typer.Option(50, min=1, help="Requests in flight at once."),
    model: str = typer.Option("ragctl/auto", help="Model to ask (ragctl/auto, ragctl/stuff, ...)."),
    config: str | None = typer.Option(
        None, help="A fixed configuration (stuff:5, map_reduce:5:64): sets the model and fields."
    ),
    stream: bool = typer.Option(
        False,
        "--stream/--no-stream",
        help="Stream (time to first token = first delta) or read whole answers (= the delay).",
    ),
    questions: int | None = typer.Option(
        None, min=1, help="Use only the dataset's first N questions (cycled)."
    ),
    max_tokens: int | None = typer.Option(None, min=1, help="The requests' max_tokens."),
    compare: bool = typer.Option(
        False,
        "--compare",
        help="Ask each question twice, streamed and whole, the first alternating; report the "
        "paired TTFT and delay ratios with 95% intervals (--requests counts both).",
    ),
    api_key: str | None = typer.Option(None, envvar="RAGCTL_API_KEY", help="The server's key."),
    timeout_s: float = typer.Option(600.0, help="Per-request client timeout."),
    out_file: Path = typer.Option(Path("eval/out/bench-load/results.json"), "--out"),
) -> None:
    """Load test over HTTP with the openai client: answered, rejected (429/503), failed, and
    latency and time-to-first-token percentiles; every request is accounted for. One question
    at a time: --concurrency 1."""
    from ragctl.loadtest import load_bench
    from ragctl.retrieval.collection import load_queries

    settings: Settings = ctx.obj
    qs = [q.question for q in load_queries(settings.data_dir, dataset)][:questions]
    extra_body = None
    if config is not None:
        fixed = parse_config(config)
        model = f"ragctl/{fixed.method}"
        extra_body = {"num_chunks": fixed.num_chunks}
        if fixed.intermediate_length is not None:
            extra_body["intermediate_length"] = fixed.intermediate_length
    with status(f"{requests} requests at concurrency {concurrency} to {url}"):
        result, d = asyncio.run(
            load_bench(
                url,
                qs,
                out_file,
                requests=requests,
                concurrency=concurrency,
                model=model,
                api_key=api_key,
                timeout_s=timeout_s,
                extra_body=extra_body,
                stream=stream,
                max_tokens=max_tokens,
                alternate=compare,
            )  # fmt: skip
        )
    table = Table("requests", "answered", "rejected", "failed", "p50 s", "p95 s", "TTFT mean s",
                  "TTFT p50 s", "TTFT p95 s", "wall s", "qps",
                  title="streamed" if stream else "whole answers (TTFT = delay)")  # fmt: skip
    table.add_row(
        str(d["requests"]), str(d["completed"]),
        ", ".join(f"{k}: {v}" for k, v in d["rejected"].items()) or "0",
        ", ".join(f"{k}: {v}" for k, v in d["failed"].items()) or "0",
        _fmt(d["p50_s"]), _fmt(d["p95_s"]), _fmt(d["ttft_mean_s"]), _fmt(d["ttft_p50_s"]),
        _fmt(d["ttft_p95_s"]), f"{d['wall_s']:.1f}", f"{d['throughput_qps']:.2f}",
    )  # fmt: skip
    out.print(table)
    if compare:
        _print_comparison(result, out_file)
    out.print(f"configurations: {d['configs']}", highlight=False)
    out.print(f"results in {out_file}")
    if result.accounted != requests:
        raise RuntimeFailure(f"{requests - result.accounted} requests unaccounted for")


def _print_comparison(result: Any, out_file: Path) -> None:
    """Streamed against whole answers of the same questions: means, and the paired ratios
    (whole / streamed) with 95% bootstrap intervals; added to the results file."""
    import json

    from ragctl.evaluation.intervals import ratio_ci

    pairs = result.pairs()
    s_ttft = [p[0]["ttft_s"] for p in pairs]
    w_ttft = [p[1]["ttft_s"] for p in pairs]
    s_lat = [p[0]["latency_s"] for p in pairs]
    w_lat = [p[1]["latency_s"] for p in pairs]
    paired = {
        "pairs": len(pairs),
        "ttft_ratio_whole_over_streamed": sum(w_ttft) / sum(s_ttft) if pairs else None,
        "ttft_ratio_ci": ratio_ci(w_ttft, s_ttft),
        "delay_ratio_whole_over_streamed": sum(w_lat) / sum(s_lat) if pairs else None,
        "delay_ratio_ci": ratio_ci(w_lat, s_lat),
    }
    data = json.loads(out_file.read_text())
    data["paired"] = paired
    out_file.write_text(json.dumps(data, indent=2) + "\n")
    table = Table("mode", "answered", "TTFT mean s", "TTFT p50 s", "delay mean s", "delay p50 s",
                  title="the same questions, streamed and whole")  # fmt: skip
    for name, m in result.by_mode().items():
        table.add_row(name, str(m["n"]), _fmt(m["ttft_mean_s"]), _fmt(m["ttft_p50_s"]),
                      _fmt(m["mean_s"]), _fmt(m["p50_s"]))  # fmt: skip
    out.print(table)

    def ratio(v: float | None, ci: list[float] | None) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    out.print(
        f"{len(pairs)} paired questions: TTFT whole/streamed "
        f"{ratio(paired['ttft_ratio_whole_over_streamed'], paired['ttft_ratio_ci'])}, delay "
        f"{ratio(paired['delay_ratio_whole_over_streamed'], paired['delay_ratio_ci'])} (95%)",
        highlight=False,
    )


@app.command("pressure")
def pressure(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", *DATASET_FLAGS),
    questions: int = typer.Option(12, help="Questions sent at once."),
    stagger_ms: float = typer.Option(0.0, help="Delay between arrivals."),
    out_dir: Path = typer.Option(Path("eval/out/bench-pressure"), "--out"),
) -> None:
    """Many adaptive queries at once (use a small --kv-cache-gib): the configurations chosen as
    free KV shrinks, who queued, and that every query was answered."""
    from ragctl.benchmarks import pressure_bench

    settings: Settings = ctx.obj
    run = pressure_bench(
        settings, dataset, questions, stagger_ms, out_dir, open_controller=open_controller
    )
    result = asyncio.run(run)
    rows, n = result["rows"], result["questions"]
    table = Table(title=f"{n} {dataset} queries at once, in decision order")
    for col in ("#", "decided s", "free", "reserved", "space", "config", "need", "reason",
                "queued s", "total s"):  # fmt: skip
        table.add_column(col, no_wrap=True)
    for r in rows:
        sp = r["space"]
        space = f"{'|'.join(sp['methods'])} {sp['num_chunks'][0]}-{sp['num_chunks'][1]}"
        table.add_row(
            str(r["i"]), f"{r['decided_s']:.2f}", str(r["free_blocks"]),
            str(r["reserved_blocks"]), space, r["config"], str(r["need_blocks"]), r["reason"],
            f"{r['queue_s']:.2f}", f"{r['seconds']:.2f}",
        )  # fmt: skip
    out.print(table)
    total = rows[0]["total_blocks"] if rows else 0
    out.print(f"{result['answered']}/{n} answered; KV cache {total} blocks; "
              f"results in {out_dir}/results.json")  # fmt: skip


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


@app.command("adaptive-k")
def adaptive_k(
    ctx: typer.Context,
    dataset: str = typer.Option("squad", *DATASET_FLAGS, help="Dataset card name."),
    questions: int = typer.Option(200, min=2, help="Queries (the first N of the data)."),
    out_dir: Path = typer.Option(Path("eval/out/bench-adaptive-k"), "--out"),
) -> None:
    """Evidence recall against context tokens, fixed chunk counts against the retrieval-score
    gap cut (`--retrieval-aware-k`), per rule range; retrieval only, no LLM."""
    from rich.console import Console

    from ragctl.evaluation.adaptive_k import DEFAULT_RANGES, compare, write
    from ragctl.retrieval.collection import check_dataset, load_queries

    settings: Settings = ctx.obj
    card = check_dataset(settings.data_dir, dataset)
    queries = load_queries(settings.data_dir, dataset)[:questions]
    retriever = open_retriever(settings, dataset, serving_tokenizer(settings))
    top = max(hi for _, hi in DEFAULT_RANGES) + 1  # the score after the last count tells its gap
    with status(f"retrieving {len(queries)} queries"):
        retrieved = retriever.search_batch([q.question for q in queries], top)
    rows = compare(card, queries, retrieved)

    def ci(v: list[float] | None, fmt: str = ".3f") -> str:
        return "" if v is None else f" [{v[0]:{fmt}}, {v[1]:{fmt}}]"

    table = Table(title=f"{dataset}: fixed k = hi against the gap cut in [lo, hi]")
    for col in ("range", "n", "k", "recall", "context tokens", "recall / 1k tokens",
                "gap - fixed recall"):  # fmt: skip
        table.add_column(col)
    for r in rows:
        for name, side in (("fixed", r.fixed), ("gap", r.gap)):
            table.add_row(
                f"[{r.lo}, {r.hi}] {name}", str(r.n), f"{side.chunks:.2f}",
                f"{side.recall:.3f}{ci(side.recall_ci)}",
                f"{side.tokens:.0f}{ci(side.tokens_ci, '.0f')}",
                "-" if side.recall_per_1k_tokens is None
                else f"{side.recall_per_1k_tokens:.3f}{ci(side.recall_per_1k_tokens_ci)}",
                ci(r.recall_diff_ci).strip() if name == "gap" else "",
            )  # fmt: skip
    wide = out if out.is_terminal else Console(width=160)  # keep the columns when piped
    wide.print(table)
    meta = {"questions": len(queries), "embedder": retriever.embedder_name}
    path = write(out_dir, dataset, rows, meta)
    out.print(f"results in {path}", highlight=False)
