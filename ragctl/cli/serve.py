"""`ragctl serve`: the OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ragctl.cli.common import DATASET_FLAGS, err, field_help, load_plan_option, plan_option
from ragctl.settings import Settings

if TYPE_CHECKING:
    from ragctl.server import ServerOptions


def serve(
    ctx: typer.Context,
    dataset: str = typer.Option(
        "squad", *DATASET_FLAGS, help="Default collection (opened at start; others on use)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: str | None = typer.Option(
        None, envvar="RAGCTL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."
    ),
    engine_url: list[str] | None = typer.Option(
        None,
        help="Serve from this running vLLM server instead of an in-process engine; repeat it "
        "for a pool of engines.",
    ),
    max_inflight: int = typer.Option(
        64, min=1, help="Requests answered at once; more get 429 with Retry-After."
    ),
    log_level: str = typer.Option("warning", help="uvicorn's log level."),
    slo_ms: int | None = typer.Option(None, min=1, help=field_help("slo_ms")),
    slo_mitigation: str | None = typer.Option(None, help=field_help("slo_mitigation")),
    plan_file: Path | None = plan_option(),
    ray: bool = typer.Option(
        False, "--ray", help="Run as a Ray Serve application (needs --engine-url; the [ray] extra)."
    ),
    replicas: int = typer.Option(1, min=1, help="--ray: ragctl replicas behind Ray's proxy."),
    ray_address: str | None = typer.Option(
        None, help="--ray: join this Ray cluster (default: start a local one)."
    ),
    ray_cpus: int | None = typer.Option(
        None, min=1, help="--ray: CPUs of the local Ray instance (default: one per replica)."
    ),
) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics. Model `ragctl/auto` is adaptive; `ragctl/<method>` fixes the method. With --ray,
    R replicas on Ray Serve share the engine at --engine-url and one KV reservation ledger."""
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
    if ray:
        _serve_on_ray(
            settings, options, dataset=dataset, host=host, port=port, replicas=replicas,
            ray_address=ray_address, ray_cpus=ray_cpus,
        )  # fmt: skip
        return
    err.print(f"[dim]starting the engine ({where}) and opening {dataset}[/dim]")
    run_server(
        settings, options, host=host, port=port, log_level=log_level,
        on_ready=lambda: err.print(
            f"ragctl serving {dataset} on http://{host}:{port}/v1 (engine: {where})",
            highlight=False,
        ),
    )  # fmt: skip


def _serve_on_ray(
    settings: Settings,
    options: ServerOptions,
    *,
    dataset: str,
    host: str,
    port: int,
    replicas: int,
    ray_address: str | None,
    ray_cpus: int | None,
) -> None:
    from ragctl.distributed import serve as on_ray

    on_ray.check_settings(settings, replicas)  # one-line error before Ray starts
    err.print(
        f"[dim]starting Ray ({ray_address or 'local'}) and {replicas} replica(s) on "
        f"{settings.engine_url}[/dim]"
    )
    on_ray.run(
        settings, options, host=host, port=port, replicas=replicas,
        ray_address=ray_address, num_cpus=ray_cpus,
        on_ready=lambda: err.print(
            f"ragctl serving {dataset} on http://{host}:{port}/v1 with {replicas} Ray Serve "
            f"replica(s) (engine: {settings.engine_url})",
            highlight=False,
        ),
    )  # fmt: skip
