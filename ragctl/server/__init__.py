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
        # The app's lifespan closes the service: uvicorn re-raises SIGTERM/SIGINT once it has
        # shut down, which would end this process before a `finally` here could stop the
        # engine, leaving its engine-core process behind.
        app = create_app(service, options, close_service=True)
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, lifespan="on",
            timeout_graceful_shutdown=5,
        )  # fmt: skip
        server = uvicorn.Server(config)
        if on_ready is not None:
            on_ready()
        try:
            await server.serve()
        finally:
            if not server.started:  # the lifespan never ran (the port was taken, ...)
                await service.aclose()

    asyncio.run(main())
