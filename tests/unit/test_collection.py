"""Dataset cards validate, and the shared data loads with the counts its README documents; bad
names, folders and rows fail with messages that say what to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ragctl.errors import DataFormatError, DataNotFound, InvalidRequest, UnknownDataset
from ragctl.retrieval.collection import (
    DatasetCard,
    DocumentChunking,
    WindowChunking,
    cards_dir,
    check_dataset,
    dataset_names,
    list_cards,
    load_card,
    load_corpus,
    load_queries,
    parse_card,
)

DATASETS = ("finsec", "musique", "qmsum", "squad")
# Counts as documented in the shared datasets README (queries kept here / corpus documents).
DOCUMENTED = {
    "squad": (334, 2067),
    "musique": (134, 3141),
    "qmsum": (182, 35),
    "finsec": (130, 20),
}


def raw_card(name: str) -> dict:
    return yaml.safe_load((cards_dir() / f"{name}.yaml").read_text(encoding="utf-8"))


def test_every_dataset_has_a_valid_card() -> None:
    assert dataset_names() == list(DATASETS)
    cards = list_cards()
    assert [c.name for c in cards] == list(DATASETS)
    for card in cards:
        assert isinstance(card, DatasetCard)
        assert card == load_card(card.name)
        assert card.metadata and "\n" not in card.metadata
        assert card.answer_max_tokens > 0
        assert card.source.repo and card.source.paths and card.license
        assert card.metric.primary in card.metric.scores
        assert card.evidence.match == "doc_id"


def test_chunking_units_match_the_natural_unit_of_each_dataset() -> None:
    # Paragraph corpora keep paragraphs whole; meetings and reports are cut into windows.
    for name in ("squad", "musique"):
        chunking = load_card(name).chunking
        assert isinstance(chunking, DocumentChunking)
    for name in ("qmsum", "finsec"):
        chunking = load_card(name).chunking
        assert isinstance(chunking, WindowChunking)
        assert 0 < chunking.chunk_overlap < chunking.chunk_tokens
    assert "\f" in load_card("finsec").chunking.separators
    assert load_card("qmsum").chunking.separators[0] == "\n"


def test_finsec_reference_strip_pattern_removes_only_the_sources_lines(data_dir: Path) -> None:
    import re

    pattern = re.compile(load_card("finsec").metric.strip_reference or "")
    answers = [q.answers[0] for q in load_queries(data_dir, "finsec")]
    assert any("SOURCE(S):" in a for a in answers)
    for a in answers:
        kept = [line for line in a.splitlines() if not line.lstrip().startswith("SOURCE(S):")]
        stripped = pattern.sub("", a)
        assert "SOURCE(S):" not in stripped
        assert [line for line in stripped.splitlines() if line.strip()] == [
            line for line in kept if line.strip()
        ]


def test_metadata_lines_match_the_shared_db_metadata(data_dir: Path) -> None:
    shared = json.loads((data_dir / "db_metadata.json").read_text(encoding="utf-8"))
    assert {name: load_card(name).metadata for name in DATASETS} == shared


@pytest.mark.parametrize(
    "edit, bad_key",
    [
        (lambda c: c.update(answer_max_token=c.pop("answer_max_tokens")), "answer_max_token"),
        (lambda c: c["chunking"].update(max_tokns=c["chunking"].pop("max_tokens")), "max_tokns"),
        (lambda c: c["fields"]["queries"].update(questoin="question"), "questoin"),
        (lambda c: c["metric"].update(primery="f1"), "primery"),
    ],
)
def test_a_typo_in_a_card_is_an_error_naming_the_key(edit, bad_key: str) -> None:
    raw = raw_card("squad")
    parse_card(raw)  # the unedited card is valid
    edit(raw)
    with pytest.raises(InvalidRequest, match=bad_key):
        parse_card(raw, origin="squad.yaml")


def test_card_rules_beyond_key_names() -> None:
    raw = raw_card("qmsum")
    raw["chunking"]["chunk_overlap"] = raw["chunking"]["chunk_tokens"]
    with pytest.raises(InvalidRequest, match="chunk_overlap"):
        parse_card(raw)
    raw = raw_card("squad")
    raw["chunking"]["chunk_tokens"] = 512  # a window setting on a document-unit card
    with pytest.raises(InvalidRequest, match="chunk_tokens"):
        parse_card(raw)
    raw = raw_card("squad")
    raw["metric"]["primary"] = "rougeL"
    with pytest.raises(InvalidRequest, match="primary"):
        parse_card(raw)
    with pytest.raises(InvalidRequest, match="named 'squad', not 'other'"):
        parse_card(raw_card("squad"), expected_name="other")


def test_unknown_dataset_lists_the_known_ones(data_dir: Path) -> None:
    for call in (
        lambda: load_card("sqaud"),
        lambda: load_corpus(data_dir, "sqaud"),
        lambda: load_queries(data_dir, "sqaud"),
    ):
        with pytest.raises(UnknownDataset) as info:
            call()
        message = str(info.value)
        assert "sqaud" in message
        assert all(name in message for name in DATASETS)


def test_missing_data_dir_names_the_path_and_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataNotFound) as info:
        load_queries(missing, "squad")
    message = str(info.value)
    assert str(missing) in message
    assert "RAGCTL_DATA_DIR" in message and "--data-dir" in message


def test_missing_dataset_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "queries.jsonl").write_text("")
    with pytest.raises(DataNotFound) as info:
        load_corpus(tmp_path, "squad")
    assert str(tmp_path / "squad" / "corpus.jsonl") in str(info.value)
    assert "RAGCTL_DATA_DIR" in str(info.value)
    with pytest.raises(DataNotFound):
        check_dataset(tmp_path, "squad")


def _write_queries(folder: Path, lines: list[str]) -> Path:
    (folder / "squad").mkdir(parents=True, exist_ok=True)
    path = folder / "squad" / "queries.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_QUERY = json.dumps(
    {"id": "q1", "question": "Who?", "answers": ["A"], "gold_doc_ids": ["d#0"], "title": "T"}
)


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write_queries(tmp_path, [GOOD_QUERY, "", '{"id": "q2", "question": '])
    with pytest.raises(DataFormatError) as info:
        load_queries(tmp_path, "squad")
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_wrongly_typed_field_names_file_line_and_field(tmp_path: Path) -> None:
    bad = json.dumps({"id": "q2", "question": "Why?", "answers": "B", "gold_doc_ids": []})
    path = _write_queries(tmp_path, [GOOD_QUERY, bad])
    with pytest.raises(DataFormatError) as info:
        load_queries(tmp_path, "squad")
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "'answers'" in message


def test_duplicate_document_ids_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "squad").mkdir()
    row = json.dumps({"id": "d#0", "title": "T", "text": "x"})
    (tmp_path / "squad" / "corpus.jsonl").write_text(f"{row}\n{row}\n")
    with pytest.raises(DataFormatError, match="line 2: duplicate document id"):
        load_corpus(tmp_path, "squad")


@pytest.mark.parametrize("name", DATASETS)
def test_data_loads_with_the_documented_counts(data_dir: Path, name: str) -> None:
    card = check_dataset(data_dir, name)
    queries = load_queries(data_dir, name)
    docs = load_corpus(data_dir, name)
    assert (len(queries), len(docs)) == DOCUMENTED[name]

    doc_ids = {d.id for d in docs}
    assert len(doc_ids) == len(docs)
    assert all(d.text.strip() and d.title for d in docs)
    assert len({q.id for q in queries}) == len(queries)
    for q in queries:
        assert q.question.strip()
        assert isinstance(q.answers, tuple) and q.answers
        assert isinstance(q.gold_doc_ids, tuple) and q.gold_doc_ids
        assert set(q.gold_doc_ids) <= doc_ids
        # The card documents exactly the dataset-specific fields the rows carry.
        assert set(q.extra) == set(card.fields.query_extra)


def test_query_extra_keeps_dataset_specific_fields(data_dir: Path) -> None:
    q = load_queries(data_dir, "musique")[0]
    assert q.extra["hops"] == len(q.extra["question_decomposition"])
    assert set(q.answers) == {q.extra["answer"], *q.extra["answer_aliases"]}
    assert {s["support_doc_id"] for s in q.extra["question_decomposition"]} == set(q.gold_doc_ids)
