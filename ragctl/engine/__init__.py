"""The only code that talks to an LLM engine. `open_engine(settings)` picks the implementation:
a remote vLLM server when `engine_url` names one, vLLM in this process when it names none, and
an `EnginePool` of them when the settings name several (`engine_url` with several URLs, or a
pool file)."""

from __future__ import annotations

from dataclasses import replace

from ragctl.engine.base import Engine
from ragctl.engine.embedded_model import resolve_model
from ragctl.engine.pool import EnginePool, EngineSpec, PoolHealth, pool_specs
from ragctl.errors import InvalidSetting
from ragctl.settings import Settings

__all__ = ["Engine", "EnginePool", "open_engine"]


async def open_engine(settings: Settings) -> Engine:
    specs = pool_specs(settings)
    seqs = settings.int_list(settings.engine_max_num_seqs)
    if seqs:
        if len(seqs) != len(specs):
            raise InvalidSetting(
                f"engine_max_num_seqs names {len(seqs)} engines; the pool has {len(specs)}"
            )
        specs = [replace(spec, max_num_seqs=n or None) for spec, n in zip(specs, seqs, strict=True)]
    if len(specs) == 1:
        return await _open_one(settings, specs[0])
    opened: list[tuple[Engine, str]] = []
    try:
        for spec in specs:
            opened.append((await _open_one(settings, spec), spec.label))
    except BaseException:
        for engine, _ in opened:
            await engine.aclose()
        raise
    pool = EnginePool.of(opened, PoolHealth(interval_s=settings.engine_health_interval_s))
    pool.start_health_checks()
    return pool


async def _open_one(settings: Settings, spec: EngineSpec) -> Engine:
    if spec.url is not None:
        from ragctl.engine.remote import RemoteEngine

        return await RemoteEngine.connect(
            spec.url,
            model=settings.model,
            tokenizer=settings.tokenizer,
            api_key=settings.engine_api_key,
            timeout_s=settings.engine_timeout_s,
            cache_dir=settings.cache_dir,
        )
    from ragctl.engine.local import LocalEngine

    model = resolve_model(settings.model, settings.cache_dir)
    return LocalEngine.start(
        model,
        tokenizer=settings.tokenizer,
        max_model_len=settings.max_model_len,
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        kv_cache_gib=settings.kv_cache_gib,
        kv_cache_blocks=settings.kv_cache_blocks,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        timeout_s=settings.engine_timeout_s,
        max_num_seqs=spec.max_num_seqs or settings.max_num_seqs,
    )
