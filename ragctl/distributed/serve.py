"""`ragctl serve --ray`: the OpenAI-compatible server as a Ray Serve application of R replicas.

Each replica runs the same FastAPI app as `ragctl serve` (`server.create_app`, wrapped with
`serve.ingress`), so the routes, the error JSON and `/metrics` are unchanged; Ray's HTTP proxy
is the entry and spreads requests over the replicas. The replicas share the engine(s) they are
pointed at (`--engine-url`: one vLLM server per engine, however it is deployed) and one KV
reservation ledger (`ledger.KVLedgerActor`, a named actor this process creates), so that
together they never reserve more of an engine's KV cache than it has free.

An in-process engine is refused: every replica would start its own engine (R engines, R times
the memory), and their ledgers would not describe one cache.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from ragctl.distributed.ledger import (
    LEASE_S,
    NAMESPACE,
    SharedKVLedger,
    find_ledger,
    get_or_create_ledger,
    kill_ledger,
)
from ragctl.errors import InvalidSetting, MissingDependency
from ragctl.server.app import ServerOptions, create_app
from ragctl.settings import Settings

APP_NAME = "ragctl"
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME", "RAGCTL_API_KEY")
"""Environment variables a replica receives from the deploying process (settings travel as
values, not through the environment)."""


class RagctlReplica:
    """One replica: opens the service (engine client, profiler, the default collection) at
    startup, with its admission queue over the shared ledger, and serves the ragctl app."""

    def __init__(self, settings: dict[str, Any], options: ServerOptions) -> None:
        self.settings = Settings.model_validate(settings)
        self.options = options
        self.ledgers: list[SharedKVLedger] = []
        """One per engine (of the pool)."""

    def __serve_build_asgi_app__(self) -> Any:
        from ragctl.service import Service

        async def open_service() -> Service:
            def ledger_for(engine_key: str) -> SharedKVLedger:
                ledger = SharedKVLedger(find_ledger(), engine_key)
                ledger.start()
                self.ledgers.append(ledger)
                return ledger

            return await Service.open(
                self.settings, (self.options.default_collection,), ledger_for=ledger_for
            )

        return create_app(None, self.options, open_service=open_service)


def check_settings(settings: Settings, replicas: int) -> None:
    """Refuse what cannot work on Ray, in one line, before Ray starts."""
    if importlib.util.find_spec("ray") is None:
        raise MissingDependency("serve --ray needs Ray Serve: pip install 'ragctl[ray]'")
    if replicas < 1:
        raise InvalidSetting(f"--replicas must be at least 1, got {replicas}")
    from ragctl.engine.pool import pool_specs

    if any(spec.url is None for spec in pool_specs(settings)):
        raise InvalidSetting(
            "serve --ray needs --engine-url (running vLLM servers the replicas share; no `local`): "
            "an in-process engine per replica would be one engine each, with no shared KV ledger"
        )


def application(
    settings: Settings,
    options: ServerOptions,
    *,
    replicas: int,
    replica_cpus: float = 1.0,
) -> Any:
    """The Ray Serve application (`Deployment.bind(...)`): `replicas` ragctl replicas, each
    taking up to `options.max_inflight` requests at once (ragctl's own 429 above that)."""
    from ray import serve

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    deployment = serve.deployment(
        serve.ingress()(RagctlReplica),
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=options.max_inflight,
        graceful_shutdown_timeout_s=10,
    )
    return deployment.bind(settings.model_dump(mode="json"), options)


def run(
    settings: Settings,
    options: ServerOptions,
    *,
    host: str,
    port: int,
    replicas: int,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    lease_s: float = LEASE_S,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Start (or join, `ray_address`) a Ray cluster, create the ledger, deploy the app behind
    Ray's HTTP proxy on `host:port`, and serve until SIGINT/SIGTERM; then take the app, the
    ledger and (when this process started it) Ray down again."""
    import ray
    from ray import serve

    check_settings(settings, replicas)
    own_cluster = ray_address is None
    if own_cluster:
        ray.init(
            num_cpus=num_cpus or replicas, include_dashboard=False, namespace=NAMESPACE,
            log_to_driver=False,
        )  # fmt: skip
    else:
        ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        get_or_create_ledger(lease_s)
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            application(settings, options, replicas=replicas), name=APP_NAME, route_prefix="/"
        )
        if on_ready is not None:
            on_ready()
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            if own_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
            kill_ledger()
        finally:
            ray.shutdown()
