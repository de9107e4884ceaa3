"""The only code that talks to an LLM engine. `open_engine(settings)` picks the implementation:
a remote vLLM server when `engine_url` is set, else vLLM in this process."""

from __future__ import annotations

from ragctl.engine.base import Engine
from ragctl.engine.embedded_model import resolve_model
from ragctl.settings import Settings

__all__ = ["Engine", "open_engine"]


async def open_engine(settings: Settings) -> Engine:
    if settings.engine_url:
        from ragctl.engine.remote import RemoteEngine

        return await RemoteEngine.connect(
            settings.engine_url,
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
        max_num_seqs=settings.max_num_seqs,
    )
