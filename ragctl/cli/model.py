"""`ragctl model prepare`."""

from __future__ import annotations

import typer

from ragctl.cli.common import out, status
from ragctl.settings import Settings

app = typer.Typer(help="The serving model.", no_args_is_help=True)


@app.command("prepare")
def prepare(
    ctx: typer.Context,
    force: bool = typer.Option(False, help="Convert again even if a verified folder exists."),
) -> None:
    """Convert the packaged SmolLM2-135M GGUF into an HF folder vLLM loads (once)."""
    from ragctl.engine.embedded_model import prepare

    settings: Settings = ctx.obj
    with status("preparing the embedded model (SHA-256 check, GGUF -> safetensors)"):
        done = prepare(settings.cache_dir, force=force)
    verb = "converted" if done.converted else "already prepared, verified"
    out.print(f"model {verb}: {done.path} ({done.seconds:.1f}s)")
