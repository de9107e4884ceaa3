"""Embedding backends: the real packaged MiniLM, and the Cohere / OpenAI adapters against a local
HTTP server that speaks their wire formats (so the official SDKs run unmodified)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from ragctl.errors import EmbeddingError, InvalidRequest, MissingDependency, ModelNotFound
from ragctl.retrieval.embeddings import (
    CohereEmbedder,
    Embedder,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
    make_embedder,
)
from ragctl.settings import Settings

FAKE_DIM = 8


def fake_vector(text: str) -> list[float]:
    """Deterministic, deliberately not unit-length, so the adapters' normalisation shows."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 128) / 16 for b in digest[:FAKE_DIM]]


def unit(rows: list[list[float]]) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.float32)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)


@dataclass
class FakeAPI:
    """A local stand-in for the Cohere v2 and OpenAI v1 embedding endpoints."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_with: int | None = None
    """Answer every request with this HTTP status (an error body in the API's format)."""

    def url(self, suffix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{suffix}"

    def handle(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        self.requests.append({"path": path, "headers": headers, "body": body})
        if path == "/v2/embed":
            if self.fail_with:
                return self.fail_with, {"message": "fake cohere failure"}
            texts = body["texts"]
            return 200, {
                "id": f"emb-{len(self.requests)}",
                "embeddings": {"float": [fake_vector(t) for t in texts]},
                "texts": texts,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 7}},
                "response_type": "embeddings_by_type",
            }
        if path == "/v1/embeddings":
            if self.fail_with:
                error = {"message": "fake openai failure", "type": "server_error"}
                return self.fail_with, {"error": {**error, "param": None, "code": None}}
            inputs = body["input"]
            data = []
            for i, text in enumerate(inputs):
                vec = fake_vector(text)
                if body.get("encoding_format") == "base64":
                    vec = base64.b64encode(np.asarray(vec, dtype=np.float32).tobytes()).decode()
                data.append({"object": "embedding", "index": i, "embedding": vec})
            # The API does not promise order: the client must sort by `index`.
            data.reverse()
            return 200, {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
            }
        return 404, {"message": f"no route {path}"}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAPI]:
    api = FakeAPI()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload = api.handle(self.path, headers, body)
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield api
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def api(server: FakeAPI) -> FakeAPI:
    server.requests.clear()
    server.fail_with = None
    return server


def texts(n: int) -> list[str]:
    return [f"passage number {i}" for i in range(n)]


# --- sentence-transformers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def test_minilm_shapes_and_normalisation(minilm: SentenceTransformerEmbedder) -> None:
    assert isinstance(minilm, Embedder)
    assert minilm.name == "sentence-transformers:all-MiniLM-L6-v2"
    docs = minilm.embed_documents(["The cat sat on the mat.", "Stocks fell sharply.", "Hi"])
    assert docs.dtype == np.float32 and docs.shape == (3, minilm.dim)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, rtol=1e-5)
    assert minilm.embed_queries([]).shape == (0, minilm.dim)


def test_minilm_puts_a_paraphrase_closer_than_an_unrelated_sentence(minilm) -> None:
    q = minilm.embed_queries(["Who won the football championship in 2016?"])[0]
    docs = minilm.embed_documents(
        [
            "The Denver Broncos won the 2016 American football title game.",
            "Photosynthesis converts light energy into chemical energy in plants.",
        ]
    )
    paraphrase, unrelated = docs @ q
    assert paraphrase > unrelated + 0.2


def test_minilm_model_is_loaded_once_per_process(minilm: SentenceTransformerEmbedder) -> None:
    again = make_embedder(Settings(embedder="sentence-transformers:all-MiniLM-L6-v2"))
    assert isinstance(again, SentenceTransformerEmbedder)
    assert again._model is minilm._model


def test_minilm_from_a_local_folder(minilm: SentenceTransformerEmbedder) -> None:
    by_path = SentenceTransformerEmbedder(str(minilm.path))
    assert by_path.name == f"sentence-transformers:{minilm.path}"
    sentence = ["A sentence to embed."]
    np.testing.assert_allclose(
        by_path.embed_documents(sentence), minilm.embed_documents(sentence), atol=1e-6
    )


# --- backend selection and errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["faiss:thing", "all-MiniLM-L6-v2", "cohere:", "sentence_transformers:x"]
)
def test_unknown_or_malformed_spec_lists_the_backends(spec: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        make_embedder(Settings(embedder=spec))
    assert all(b in str(info.value) for b in ("sentence-transformers", "cohere", "openai"))


def test_missing_local_model_folder(tmp_path) -> None:
    with pytest.raises(ModelNotFound, match="no-model-here"):
        make_embedder(Settings(embedder=f"sentence-transformers:{tmp_path / 'no-model-here'}"))


@pytest.mark.parametrize(
    "module, spec", [("cohere", "cohere:embed-english-v3.0"), ("openai", "openai:te-3")]
)
def test_missing_sdk_names_the_extra(monkeypatch, module: str, spec: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` fail
    with pytest.raises(MissingDependency, match=rf"pip install 'ragctl\[{module}\]'"):
        make_embedder(Settings(embedder=spec, embedding_api_key="k"))


def test_remote_backends_need_a_key(monkeypatch) -> None:
    monkeypatch.delenv("CO_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for spec in ("cohere:embed-english-v3.0", "openai:text-embedding-3-small"):
        with pytest.raises(InvalidRequest, match="RAGCTL_EMBEDDING_API_KEY"):
            make_embedder(Settings(embedder=spec))


# --- Cohere ------------------------------------------------------------------------------------


def test_cohere_batches_of_96_with_input_types(api: FakeAPI) -> None:
    settings = Settings(
        embedder="cohere:embed-english-v3.0",
        embedding_url=api.url(),
        embedding_api_key="test-key",
    )
    emb = make_embedder(settings)
    assert isinstance(emb, CohereEmbedder) and emb.name == "cohere:embed-english-v3.0"
    docs = texts(200)
    out = emb.embed_documents(docs)
    np.testing.assert_allclose(out, unit([fake_vector(t) for t in docs]), rtol=1e-6)
    assert out.dtype == np.float32 and emb.dim == FAKE_DIM

    assert [r["path"] for r in api.requests] == ["/v2/embed"] * 3
    assert [len(r["body"]["texts"]) for r in api.requests] == [96, 96, 8]
    assert [t for r in api.requests for t in r["body"]["texts"]] == docs
    for r in api.requests:
        assert r["body"]["model"] == "embed-english-v3.0"
        assert r["body"]["input_type"] == "search_document"
        assert r["body"]["embedding_types"] == ["float"]
        assert r["headers"]["authorization"] == "Bearer test-key"

    api.requests.clear()
    emb.embed_queries(["what is this?"])
    assert [r["body"]["input_type"] for r in api.requests] == ["search_query"]


def test_cohere_learns_its_dimension_with_one_probe(api: FakeAPI) -> None:
    emb = CohereEmbedder("embed-v4.0", api_key="k", base_url=api.url())
    assert emb.dim == FAKE_DIM
    assert len(api.requests) == 1
    assert emb.dim == FAKE_DIM and len(api.requests) == 1


def test_cohere_server_error_becomes_embedding_error(api: FakeAPI) -> None:
    api.fail_with = 500
    emb = CohereEmbedder("embed-english-v3.0", api_key="k", base_url=api.url(), max_retries=0)
    with pytest.raises(EmbeddingError, match="500"):
        emb.embed_documents(["x"])
    api.fail_with = 401
    with pytest.raises(EmbeddingError, match="401"):
        emb.embed_queries(["x"])


# --- OpenAI ------------------------------------------------------------------------------------


def test_openai_batches_of_256_in_index_order(api: FakeAPI) -> None:
    settings = Settings(
        embedder="openai:text-embedding-3-small",
        embedding_url=api.url("/v1"),
        embedding_api_key="sk-test",
    )
    emb = make_embedder(settings)
    assert isinstance(emb, OpenAIEmbedder) and emb.name == "openai:text-embedding-3-small"
    docs = texts(300)
    out = emb.embed_documents(docs)
    # The fake answers in reverse order: rows must still line up with the inputs.
    np.testing.assert_allclose(out, unit([fake_vector(t) for t in docs]), rtol=1e-6)
    assert [r["path"] for r in api.requests] == ["/v1/embeddings"] * 2
    assert [len(r["body"]["input"]) for r in api.requests] == [256, 44]
    for r in api.requests:
        assert r["body"]["model"] == "text-embedding-3-small"
        assert r["body"]["encoding_format"] == "float"
        assert r["headers"]["authorization"] == "Bearer sk-test"
    queries = emb.embed_queries(["what is this?"])
    np.testing.assert_allclose(queries, unit([fake_vector("what is this?")]), rtol=1e-6)


def test_openai_server_error_becomes_embedding_error(api: FakeAPI) -> None:
    api.fail_with = 503
    emb = OpenAIEmbedder("m", api_key="k", base_url=api.url("/v1"), max_retries=0)
    with pytest.raises(EmbeddingError, match="fake openai failure"):
        emb.embed_documents(["x"])


def test_unreachable_server_becomes_embedding_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    for emb in (
        CohereEmbedder("m", api_key="k", base_url=url, max_retries=0, timeout_s=5),
        OpenAIEmbedder("m", api_key="k", base_url=url + "/v1", max_retries=0, timeout_s=5),
    ):
        with pytest.raises(EmbeddingError) as info:
            emb.embed_documents(["x"])
        assert info.value.__cause__ is not None
