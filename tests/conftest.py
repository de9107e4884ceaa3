"""Shared fixtures. Integration tests run the real vLLM engine with the embedded model; the
model folder is prepared once (idempotent) by the `model_path` fixture."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ragctl.engine.base import Engine
from ragctl.engine.embedded_model import resolve_model
from ragctl.engine.tokenizer import Tokenizer
from ragctl.settings import Settings

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared datasets (RAGCTL_DATA_DIR, else ../shared/datasets beside the repository)."""
    path = Path(os.environ.get("RAGCTL_DATA_DIR") or REPO.parent / "shared" / "datasets")
    if not (path / "squad" / "corpus.jsonl").is_file():
        pytest.skip(f"datasets not found in {path}")
    return path


@pytest.fixture(scope="session")
def settings(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=data_dir)


@pytest.fixture(scope="session")
def model_path() -> str:
    """The embedded model's folder (the engine tests need no datasets)."""
    settings = Settings()
    return resolve_model(settings.model, settings.cache_dir)


@pytest.fixture(scope="session")
def tokenizer(model_path: str) -> Tokenizer:
    return Tokenizer.load(model_path)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def local_engine(model_path: str) -> AsyncIterator[Engine]:
    """The real in-process vLLM engine with the embedded model, shared by the session."""
    from ragctl.engine.local import LocalEngine

    engine = LocalEngine.start(model_path, kv_cache_gib=1, max_model_len=4096)
    try:
        yield engine
    finally:
        await engine.aclose()
