"""`ragctl serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine and a
controller per collection. `create_app` builds the app; `serve` runs it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ragctl.server.app import ServerOptions, create_app
from ragctl.settings import Settings

__all__ = ["ServerOptions", "create_app", "serve"]


def serve(
    settings: Settings,
    options: ServerOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Open the service (engine, rules, the default collection's index) first, so a bad
    setting fails with its own error before the port opens; then serve until interrupted."""
    import uvicorn

    from ragctl.service import Service

    async def main() -> None:
        service = await Service.open(settings, (options.default_collection,))
        try:
            app = create_app(service, options)
            config = uvicorn.Config(
                app, host=host, port=port, log_level=log_level, lifespan="on",
                timeout_graceful_shutdown=5,
            )  # fmt: skip
            server = uvicorn.Server(config)
            if on_ready is not None:
                on_ready()
            await server.serve()
        finally:
            await service.aclose()

    asyncio.run(main())
