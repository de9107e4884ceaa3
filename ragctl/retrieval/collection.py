"""Datasets: their cards (shipped YAML under `datasets/`) and their data (JSONL under
`settings.data_dir`, never shipped).

A card says where a dataset comes from, how its rows map onto the common layout, how to chunk
it, how to score answers and what counts as evidence. This module owns reading and validating
cards, and loading `corpus.jsonl` / `queries.jsonl` into `Document`s and `Query`s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ragctl.errors import DataFormatError, DataNotFound, InvalidRequest, UnknownDataset
from ragctl.resources import data_folder
from ragctl.types import Query

DATA_DIR_HINT = "set RAGCTL_DATA_DIR or pass --data-dir"


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a card must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    repo: str
    paths: tuple[str, ...]
    commit: str | None
    blob: str | None = None
    sha256: str | None = None
    notes: str = ""


class Fields(_Strict):
    queries: dict[Literal["id", "question", "answers", "gold_doc_ids"], str]
    """Common query field -> key in queries.jsonl."""
    corpus: dict[Literal["id", "title", "text"], str]
    """Common corpus field -> key in corpus.jsonl."""
    query_extra: dict[str, str] = {}
    """Dataset-specific query keys (kept in `Query.extra`) -> what they hold."""
    corpus_extra: dict[str, str] = {}
    """Dataset-specific corpus keys -> what they hold (not loaded into `Document`)."""

    @model_validator(mode="after")
    def _complete(self) -> Fields:
        for part, need in (("queries", 4), ("corpus", 3)):
            if len(getattr(self, part)) != need:
                raise ValueError(f"fields.{part} must map every common field")
        return self


class DocumentChunking(_Strict):
    """One chunk per document; a document longer than `max_tokens` is split."""

    unit: Literal["document"]
    max_tokens: int = Field(gt=0)
    chunk_overlap: int = Field(0, ge=0)
    """Overlap between the pieces of a split document."""
    separators: tuple[str, ...] = ("\n\n", "\n", ". ", " ", "")
    embed_title: bool = False
    """Embed `title + "\\n" + text` (the chunk text itself stays as is)."""

    @property
    def size(self) -> int:
        return self.max_tokens

    @model_validator(mode="after")
    def _overlap(self) -> DocumentChunking:
        if self.chunk_overlap >= self.max_tokens:
            raise ValueError("chunk_overlap must be smaller than max_tokens")
        return self


class WindowChunking(_Strict):
    """Fixed windows of about `chunk_tokens`, built from whole separator-delimited pieces."""

    unit: Literal["window"]
    chunk_tokens: int = Field(gt=0)
    chunk_overlap: int = Field(0, ge=0)
    separators: tuple[str, ...] = ("\n\n", "\n", " ", "")
    embed_title: bool = False

    @property
    def size(self) -> int:
        return self.chunk_tokens

    @model_validator(mode="after")
    def _overlap(self) -> WindowChunking:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        return self


Chunking = Annotated[DocumentChunking | WindowChunking, Field(discriminator="unit")]

Score = Literal["em", "f1", "rouge1", "rouge2", "rougeL"]


class Metric(_Strict):
    scores: tuple[Score, ...] = Field(min_length=1)
    primary: Score
    normalize: Literal["squad", "rouge", "none"]
    """Text normalisation before scoring: SQuAD's (lower-case, no punctuation or articles),
    rouge-score's tokenizer, or none."""
    references: Literal["any", "all"]
    """Several reference answers: take the best (`any`) or the mean (`all`)."""
    strip_reference: str | None = None
    """Regex removed from each reference before scoring."""
    description: str

    @model_validator(mode="after")
    def _primary(self) -> Metric:
        if self.primary not in self.scores:
            raise ValueError(f"metric.primary {self.primary!r} is not among scores {self.scores}")
        return self


class Evidence(_Strict):
    match: Literal["doc_id"]
    """A chunk is evidence when its `doc_id` is one of the query's `gold_doc_ids`."""
    needs: Literal["any", "all"]
    """Whether one gold document suffices or all are needed (multi-hop / multi-document)."""
    description: str


class DatasetCard(_Strict):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    title: str
    source: Source
    license: str
    split: str
    fields: Fields
    metadata: str
    """One line describing the database, for the query profiler."""
    chunking: Chunking
    answer_max_tokens: int = Field(gt=0)
    metric: Metric
    evidence: Evidence
    grid: list[str] | None = None
    """The configurations `ragctl eval grid` answers every query with (`method:chunks[:ilen]`);
    None: the wide default grid."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def cards_dir() -> Path:
    return data_folder("datasets")


def dataset_names() -> list[str]:
    """Names of the datasets that have a card, sorted."""
    return sorted(p.stem for p in cards_dir().glob("*.yaml"))


def list_cards() -> list[DatasetCard]:
    """Every shipped card, sorted by name."""
    return [load_card(name) for name in dataset_names()]


def load_card(name: str) -> DatasetCard:
    """The validated card of dataset `name`; `UnknownDataset` when there is none."""
    if name not in dataset_names():
        known = ", ".join(dataset_names()) or "(none)"
        raise UnknownDataset(f"unknown dataset {name!r}; known datasets: {known}")
    return _load_card_file(cards_dir() / f"{name}.yaml")


@lru_cache(maxsize=32)
def _load_card_file(path: Path) -> DatasetCard:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InvalidRequest(f"dataset card {path.name} cannot be read: {e}") from e
    return parse_card(raw, origin=path.name, expected_name=path.stem)


def parse_card(raw: Any, *, origin: str = "card", expected_name: str | None = None) -> DatasetCard:
    """Validate a card's parsed YAML; errors name the offending keys."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"dataset card {origin} is not a mapping")
    try:
        card = DatasetCard.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise InvalidRequest(f"dataset card {origin} is invalid: {problems}") from None
    if expected_name is not None and card.name != expected_name:
        raise InvalidRequest(f"dataset card {origin} is named {card.name!r}, not {expected_name!r}")
    return card


def dataset_path(data_dir: Path, name: str, file: Literal["corpus", "queries"]) -> Path:
    """`<data_dir>/<name>/<file>.jsonl`, checked to exist (after checking the name is known)."""
    load_card(name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataNotFound(
            f"data folder {data_dir} does not exist ({DATA_DIR_HINT} to the folder holding "
            f"{', '.join(dataset_names())})"
        )
    path = data_dir / name / f"{file}.jsonl"
    if not path.is_file():
        raise DataNotFound(
            f"{path} not found; is {data_dir} the datasets folder? ({DATA_DIR_HINT})"
        )
    return path


def check_dataset(data_dir: Path, name: str) -> DatasetCard:
    """The card of `name`, after checking its data files are where settings say (cheap: nothing
    is read), so a command can fail clearly before it starts anything expensive."""
    card = load_card(name)
    dataset_path(data_dir, name, "corpus")
    dataset_path(data_dir, name, "queries")
    return card


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}, line {lineno}: expected a JSON object")
            yield lineno, row


def _get(row: dict[str, Any], key: str, path: Path, lineno: int, kind: type) -> Any:
    value = row.get(key)
    if not isinstance(value, kind):
        raise DataFormatError(
            f"{path}, line {lineno}: field {key!r} should be a {kind.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def _str_list(row: dict[str, Any], key: str, path: Path, lineno: int) -> tuple[str, ...]:
    value = _get(row, key, path, lineno, list)
    if not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{path}, line {lineno}: field {key!r} should hold strings")
    return tuple(value)


def load_corpus(data_dir: Path, name: str) -> list[Document]:
    """The documents of dataset `name`, in file order."""
    path = dataset_path(data_dir, name, "corpus")
    keys = load_card(name).fields.corpus
    docs: list[Document] = []
    seen: set[str] = set()
    for lineno, row in _rows(path):
        doc = Document(
            id=_get(row, keys["id"], path, lineno, str),
            title=row.get(keys["title"]) or "",
            text=_get(row, keys["text"], path, lineno, str),
        )
        # Chunk ids and evidence matching key on the document id.
        if doc.id in seen:
            raise DataFormatError(f"{path}, line {lineno}: duplicate document id {doc.id!r}")
        seen.add(doc.id)
        docs.append(doc)
    return docs


def load_queries(data_dir: Path, name: str) -> list[Query]:
    """The queries of dataset `name`, in file order; dataset-specific fields go to `extra`."""
    path = dataset_path(data_dir, name, "queries")
    keys = load_card(name).fields.queries
    common = set(keys.values())
    queries: list[Query] = []
    for lineno, row in _rows(path):
        queries.append(
            Query(
                id=str(_get(row, keys["id"], path, lineno, str)),
                question=_get(row, keys["question"], path, lineno, str),
                answers=_str_list(row, keys["answers"], path, lineno),
                gold_doc_ids=_str_list(row, keys["gold_doc_ids"], path, lineno),
                extra={k: v for k, v in row.items() if k not in common},
            )
        )
    return queries
