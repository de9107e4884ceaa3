"""The `ragctl` command (typer + rich): one module per command group (`index`, `model`, `query`:
ask/profile/demo, `serve`, `bench`, `rules`, `allocate`, `eval`, `profiler`). Global options are the
Settings fields marked as CLI flags (each also readable from `RAGCTL_<NAME>`); errors print one
line on stderr and exit non-zero (2: you asked wrongly, 1: it failed while running)."""

from __future__ import annotations

import os
from typing import Any

import typer

from ragctl.cli import allocate, bench, index, model, profiler, query, rules, serve
from ragctl.cli.common import run_app, with_settings_options
from ragctl.cli.eval import eval_app
from ragctl.settings import Settings

app = typer.Typer(
    name="ragctl",
    help="Query-adaptive RAG controller in front of a vLLM engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
@with_settings_options
def _global(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the engine's own logs."),
    **overrides: Any,
) -> None:
    if not verbose:
        # vLLM and transformers log every step at INFO and warn about CPU tuning; keep the
        # terminal for results (children inherit these, so the engine process is quiet too).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx.obj = Settings().with_overrides(**overrides)


app.add_typer(model.app, name="model")
app.add_typer(rules.app, name="rules")
app.add_typer(eval_app, name="eval")
app.command("allocate")(allocate.allocate)
for command in (index.index, query.ask, query.profile, serve.serve, query.demo):
    app.command()(command)
app.add_typer(bench.app, name="bench")
app.add_typer(profiler.app, name="profiler")


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)
