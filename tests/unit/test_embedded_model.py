"""Preparing the embedded model: checksum, conversion, idempotency."""

from __future__ import annotations

import json

import pytest

from ragctl.engine import embedded_model as em
from ragctl.errors import ModelPreparationError


def test_converts_once_into_an_hf_folder_then_reuses_it(tmp_path) -> None:
    first = em.prepare(tmp_path)
    assert first.converted and first.path == em.model_folder(tmp_path)
    config = json.loads((first.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # vLLM must not see a GGUF quantizer
    assert (first.path / "model.safetensors").stat().st_size > 100_000_000
    assert (first.path / "tokenizer.json").is_file()
    marker = json.loads((first.path / em.MARKER).read_text())
    assert marker["gguf_sha256"] == em.GGUF_SHA256

    mtime = (first.path / "model.safetensors").stat().st_mtime_ns
    second = em.prepare(tmp_path)
    assert not second.converted and second.seconds < 1
    assert (second.path / "model.safetensors").stat().st_mtime_ns == mtime
    assert em.resolve_model(None, tmp_path) == str(first.path)
    assert em.resolve_model("some/other-model", tmp_path) == "some/other-model"


def test_a_gguf_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(em, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ModelPreparationError, match="SHA-256"):
        em.prepare(tmp_path)
    assert not em.model_folder(tmp_path).exists()
    assert not em.is_prepared(tmp_path)
