"""What the command modules share: the consoles, opening the engine / retriever / controller with
a spinner or progress bars, the `--plan` option, `--json` output, the global options generated
from the Settings fields, and the error handling of `main` (one line on stderr; exit 2: you
asked wrongly, 1: it failed while running)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress

from ragctl.console import progress_bar, stage_progress
from ragctl.errors import InvalidRequest, RagctlError, UserError
from ragctl.settings import Settings, invalid_setting
from ragctl.types import Config

out = Console()
err = Console(stderr=True)

DATASET_FLAGS = ("--dataset", "-d")


def field_help(field: str) -> str:
    return Settings.model_fields[field].description or ""


def plan_option() -> Any:
    return typer.Option(
        None,
        "--plan",
        help="An allocation plan (`ragctl allocate`): batch sizes, threads, engine sequences.",
    )


def load_plan_option(path: Path | None, dataset: str) -> Any:
    """`--plan` of `serve` and `eval run`: the checked plan, its warnings printed (None
    without the option)."""
    if path is None:
        return None
    from ragctl.allocation.plan import load_plan

    plan = load_plan(path)
    for line in plan.warnings(cpu_count=os.cpu_count(), dataset=dataset):
        err.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    return plan


def print_json(data: Any) -> None:
    """One JSON object on stdout (`--json`)."""
    print(json.dumps(data, ensure_ascii=False))


def parse_config(text: str) -> Config:
    try:
        return Config.parse(text)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


# -- opening things, with a spinner or progress bars -------------------------------------------


@contextmanager
def status(text: str) -> Iterator[None]:
    with err.status(text):
        yield


def progress() -> Progress:
    return progress_bar(err, transient=True)


@contextmanager
def tally(description: str, total: int) -> Iterator[Callable[[], None]]:
    """A transient progress bar of `total` steps; yields the function that advances it."""
    with progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def serving_tokenizer(settings: Settings) -> Any:
    from ragctl.engine.embedded_model import resolve_model
    from ragctl.engine.tokenizer import Tokenizer

    with status("loading the tokenizer"):
        model = resolve_model(settings.model, settings.cache_dir)
        return Tokenizer.load(settings.tokenizer or model)


def open_retriever(settings: Settings, dataset: str, tokenizer: Any, rebuild: bool = False) -> Any:
    from ragctl.retrieval.index import open_retriever

    with stage_progress(err, dataset) as (_, stages):
        return open_retriever(settings, dataset, tokenizer, rebuild=rebuild, progress=stages)


def load_rules(settings: Settings) -> Any:
    from ragctl.rules import load_rules

    return load_rules(settings.rules_file)


async def start_engine(settings: Settings) -> Any:
    from ragctl.engine import open_engine

    with status(f"starting the engine ({settings.engine_url or 'in-process'})"):
        return await open_engine(settings)


async def open_controller(settings: Settings, dataset: str) -> Any:
    """Check the dataset and rules first (cheap, clear errors), then start the engine, then
    the profiler and the index (with progress bars when it is built)."""
    from ragctl.service import open_controller

    where = settings.engine_url or "in-process"
    with stage_progress(err, dataset) as (bar, stages):
        bar.console.print(f"[dim]starting the engine ({where}) and opening {dataset}[/dim]")
        return await open_controller(settings, dataset, progress=stages)


# -- global options from the Settings fields ---------------------------------------------------


def _optional(annotation: Any) -> Any:
    """`X | None` for a field of type X (or X | None): unset means "no override"."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
    return Optional[annotation]  # noqa: UP045 (typer wants typing.Optional here)


def settings_flags() -> dict[str, str]:
    """Field name -> flag, for the fields marked as CLI flags."""
    flags = {}
    for name, field in Settings.model_fields.items():
        cli = (field.json_schema_extra or {}).get("cli")  # type: ignore[union-attr]
        if cli:
            flags[name] = cli if isinstance(cli, str) else "--" + name.replace("_", "-")
    return flags


KW = inspect.Parameter.KEYWORD_ONLY


def with_settings_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Give `fn(ctx, verbose, **overrides)` one typer option per CLI-flag field of Settings
    (type and help from the field), passed as `overrides` keyed by field name."""
    ctx, *own = list(inspect.signature(fn).parameters.values())[:-1]  # drop **overrides
    annotations = {p.name: p.annotation for p in (ctx, *own)}
    flags = []
    for name, flag in settings_flags().items():
        field = Settings.model_fields[name]
        annotations[name] = _optional(field.annotation)
        option = typer.Option(None, flag, help=field.description or "")
        if (field.json_schema_extra or {}).get("repeatable"):  # type: ignore[union-attr]
            annotations[name] = Optional[list[str]]  # noqa: UP045 (typer wants Optional)
            option = typer.Option(None, flag, help=field.description or "", metavar="TEXT")
        flags.append(inspect.Parameter(name, KW, default=option, annotation=annotations[name]))
    params = [ctx, *flags, *(p.replace(kind=KW) for p in own)]  # fn's own options last
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {**annotations, "return": None}
    return fn


# -- errors ---------------------------------------------------------------------------------


TERMINATED_EXIT = 128 + signal.SIGTERM


def run_app(app: typer.Typer, argv: list[str] | None) -> None:
    """Run the typer app; a ragctl error is one line on stderr and exit 2 (user error) or 1.
    SIGTERM unwinds as Ctrl-C does (exit 143)."""
    with _terminate_as_interrupt() as terminated:
        try:
            app(args=argv, prog_name="ragctl")
        except ValidationError as e:  # RAGCTL_* environment variables
            _fail(invalid_setting(e))
        except RagctlError as e:
            _fail(e)
        except KeyboardInterrupt:
            _interrupted(terminated)
        except SystemExit:
            if terminated:  # typer turned the interrupt into "Aborted!" and exit 1
                _interrupted(terminated)
            raise


@contextmanager
def _terminate_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM (`kill`, a job runner's timeout) is turned into SIGINT, so that it
    unwinds like Ctrl-C: by default it would end this process at once and leave the engine's
    worker processes running with no parent. Yields the list of the SIGTERMs received."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def on_term(signum: int, _frame: object) -> None:
        got.append(signum)
        if not callable(signal.getsignal(signal.SIGINT)):
            # A shell starts background jobs with SIGINT ignored; SIGTERM must still unwind.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # Whichever SIGINT handler is current runs next (asyncio's cancels the running task).
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_term)
    # A parent that blocked them (some engine and cluster libraries do, in their threads)
    # passes the mask on to this process: SIGTERM would stay pending and never unwind.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(terminated: list[int]) -> None:
    err.print("terminated" if terminated else "interrupted")
    sys.exit(TERMINATED_EXIT if terminated else 130)


def _fail(e: RagctlError) -> None:
    err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2 if isinstance(e, UserError) else 1)
