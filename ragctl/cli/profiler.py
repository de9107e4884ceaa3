"""`ragctl profiler train | status | bench`: the profiler's outcome labels, calibration and
learned model per (model, collection), and the side-by-side measurement of the profilers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.table import Table

from ragctl.cli.common import DATASET_FLAGS, out, progress, status
from ragctl.settings import Settings

app = typer.Typer(
    help="Query profiler: train its calibration and learned model, show them, measure them.",
    no_args_is_help=True,
)


@app.command()
def train(
    ctx: typer.Context,
    dataset: str = typer.Option(..., *DATASET_FLAGS, help="Dataset card name."),
    calibration: int = typer.Option(30, min=2, help="Calibration queries to label and fit on."),
    seed: int = typer.Option(0, help="Query sample (the one eval run draws)."),
    configs: str = typer.Option(
        None,
        help="Candidate configurations to label with (default: the dataset card's grid where "
        "it has one, else a feedback budget of each method over a few chunk counts).",
    ),
    agreement: str = typer.Option(
        "gold",
        help="gold: a configuration agrees when it scores near the best on the references; "
        "golden: when its answer agrees with the most expensive configuration's.",
    ),
) -> None:
    """Label the calibration queries with the cheapest configuration that agrees (answering
    what the outcome grid lacks), profile them with the LLM, fit the LLM's calibration and the
    learned profiler, and save them for this model and collection."""
    from ragctl.errors import InvalidRequest
    from ragctl.evaluation.profiler_train import TrainRequest, train_profiler

    if agreement not in ("gold", "golden"):
        raise InvalidRequest(f"--agreement must be gold or golden, got {agreement!r}")
    settings: Settings = ctx.obj
    request = TrainRequest(dataset, calibration, seed, configs or None, agreement)  # type: ignore[arg-type]
    report = train_profiler(settings, request, progress=progress)
    out.print(
        f"{report.dataset}: {report.labelled} of {report.queries} calibration queries labelled "
        f"({report.built} cells answered) in {report.seconds:.0f}s; saved in {report.folder}",
        highlight=False,
    )
    setting = "llm" if settings.profiler == "json" else settings.profiler
    _print_status(report.status, str(report.folder.parent.name), report.dataset, setting)


@app.command("status")
def status_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(..., *DATASET_FLAGS, help="Dataset card name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Per field: labelled samples, calibration error (ECE) before and after calibration,
    held-out accuracy of the LLM and learned profilers against the outcome labels, and which
    profiler `auto` uses."""
    import json
    from dataclasses import asdict

    from ragctl.errors import InvalidSetting
    from ragctl.profiler.store import ProfilerState
    from ragctl.retrieval.collection import load_card

    settings: Settings = ctx.obj
    card = load_card(dataset)
    model = settings.profiler_model_key()
    if model is None:
        raise InvalidSetting(
            "the profiler's model is known only to its server: name it with --profiler-model "
            "(with --profiler-url) or --model (with --engine-url)"
        )
    state = ProfilerState.at(settings.cache_dir, model, card.name)
    setting = "llm" if settings.profiler == "json" else settings.profiler
    st = state.status(setting=setting)
    if as_json:
        print(json.dumps({"model": model, "collection": card.name, **asdict(st)}, default=str))
        return
    _print_status(st, model, card.name, setting)


def _print_status(st: object, model: str, collection: str, setting: str) -> None:
    table = Table(title=f"profiler state: {collection} on {model}", title_justify="left")
    cols = ("field", "labels", "LLM ECE before", "LLM ECE after", "LLM acc", "learned ECE before",
            "learned ECE after", "learned acc")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "field" else "right")
    for f in st.fields:
        table.add_row(
            f.name, str(f.n), _fmt(f.llm_ece_before), _fmt(f.llm_ece_after),
            _fmt(f.llm_accuracy), _fmt(f.learned_ece_before), _fmt(f.learned_ece_after),
            _fmt(f.learned_accuracy),
        )  # fmt: skip
    out.print(table)
    out.print(
        f"{st.samples} labelled queries ({st.with_beliefs} with LLM beliefs, {st.with_features} "
        f"with features; learned profiler fitted on {st.learned_samples}); calibrated LLM "
        f"fields: {', '.join(st.llm_calibrated) or 'none'}; with --profiler {setting} it uses: "
        f"{st.in_use}\nstate folder: {st.folder}",
        highlight=False,
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


@app.command()
def bench(
    ctx: typer.Context,
    datasets: str = typer.Option("squad,musique", "--datasets"),
    limit: int = typer.Option(30, min=2, help="Test queries per dataset (eval run's sample)."),
    calibration: int = typer.Option(30, help="Calibration queries (kept out of the test ones)."),
    seed: int = typer.Option(0),
    out_dir: Path = typer.Option(Path("eval/out/profiler-bench"), "--out"),
    profile_only: bool = typer.Option(
        False,
        "--profile-only",
        help="Profile the test queries without answering them: agreement, AUC and seconds, "
        "no share of delay (cheap on the long-document sets).",
    ),
) -> None:
    """The JSON, LLM field (raw, calibrated), learned and auto profilers side by side on the
    same test queries: share of the end-to-end delay, agreement with the annotations, AUC of
    P(joint_reasoning), learned prediction time."""
    from ragctl.evaluation.profiler_bench import compare_profilers

    settings: Settings = ctx.obj
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    payload = asyncio.run(
        compare_profilers(
            settings, names, limit, calibration, seed, out_dir, status=status,
            answer=not profile_only,
        )  # fmt: skip
    )
    table = Table(title="profilers side by side (95% intervals)", title_justify="left")
    for col in ("dataset", "profiler", "n", "seconds", "share of delay", "joint agreement"):
        table.add_column(col, justify="left" if col in ("dataset", "profiler") else "right")
    for d, r in payload["per_dataset"].items():
        for name, p in r["profilers"].items():
            agree = p["joint_agreement"]
            table.add_row(
                d, name, str(p["seconds"]["n"]), _with_ci(p["seconds"], "{:.3f}"),
                _with_ci(p["share"], "{:.1%}"), "-" if agree is None else f"{agree:.0%}",
            )  # fmt: skip
    out.print(table)
    aucs = ", ".join(f"{k} {_fmt(v)}" for k, v in payload["auc_joint"].items())
    out.print(f"AUC of P(joint) over {payload['auc_queries']} queries: {aucs}", highlight=False)
    if t := payload.get("learned_predict_s"):
        out.print(
            f"learned profiler over {t['n']} predictions: p50 {t['p50'] * 1e6:.0f} us, "
            f"p99 {t['p99'] * 1e6:.0f} us",
            highlight=False,
        )
    out.print(f"results in {out_dir}/results.json", highlight=False)


def _with_ci(v: dict, fmt: str) -> str:
    if v["mean"] is None:
        return "-"
    text = fmt.format(v["mean"])
    if v["ci95"]:
        text += f" [{fmt.format(v['ci95'][0])}, {fmt.format(v['ci95'][1])}]"
    return text
