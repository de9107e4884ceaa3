"""Dataset conversion from the original public formats into the common layout (tiny
hand-written upstream files, read back with the collection loaders; round trips against the
shared bundle where it is present), and downloads failing clearly without network."""

from __future__ import annotations

import csv
import json
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragctl.errors import DataFormatError, DataNotFound, MissingDependency, RuntimeFailure
from ragctl.evaluation import download as dl
from ragctl.evaluation.download import (
    clean_layout_text,
    convert_finsec,
    convert_musique,
    convert_qmsum,
    convert_squad,
    download,
    fetch,
    musique_doc_id,
)
from ragctl.evaluation.metrics import score
from ragctl.retrieval.collection import load_card, load_corpus, load_queries


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- SQuAD -------------------------------------------------------------------------------------


def squad_raw(n_questions_per_paragraph: int = 1) -> dict[str, Any]:
    def qas(prefix: str) -> list[dict[str, Any]]:
        return [
            {
                "id": f"{prefix}{k}",
                "question": f"Question {prefix}{k}?",
                "answers": [
                    {"text": "Denver Broncos", "answer_start": 177},
                    {"text": "Denver Broncos", "answer_start": 177},
                    {"text": "Broncos", "answer_start": 184},
                ],
            }
            for k in range(n_questions_per_paragraph)
        ]

    return {
        "version": "1.1",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {"context": "Super Bowl 50 was an American football game…", "qas": qas("a")},
                    {"context": "The Panthers finished the regular season 15–1.", "qas": qas("b")},
                ],
            },
            {
                "title": "Warsaw",
                "paragraphs": [{"context": "Warsaw is the capital.", "qas": qas("c")}],
            },
        ],
    }


def test_squad_converts_into_the_common_layout(tmp_path: Path) -> None:
    raw = tmp_path / "dev-v1.1.json"
    raw.write_text(json.dumps(squad_raw(2)), encoding="utf-8")
    out = tmp_path / "data"
    result = convert_squad(raw, out)
    # 6 questions, all sampled (fewer than 500), rows 2 and 5 held out
    assert (result.queries, result.documents) == (4, 3)
    docs = load_corpus(out, "squad")
    assert [d.id for d in docs] == ["Super_Bowl_50#0", "Super_Bowl_50#1", "Warsaw#0"]
    assert docs[1].text == "The Panthers finished the regular season 15–1."
    assert rows(out / "squad" / "corpus.jsonl")[2] == {
        "id": "Warsaw#0",
        "title": "Warsaw",
        "text": "Warsaw is the capital.",
        "para_index": 0,
    }
    queries = load_queries(out, "squad")
    assert [q.id for q in queries] == ["a0", "a1", "b1", "c0"]
    q = queries[2]
    assert q.answers == ("Denver Broncos", "Denver Broncos", "Broncos")
    assert q.gold_doc_ids == ("Super_Bowl_50#1",)
    assert dict(q.extra) == {"answer_starts": [177, 177, 184], "title": "Super_Bowl_50"}
    assert set(q.extra) == set(load_card("squad").fields.query_extra)
    assert score("squad", "the Broncos", q) == {"em": 1.0, "f1": 1.0}
    # the parsed object works too; the held-out third can be kept; limit cuts the queries
    assert convert_squad(squad_raw(2), out, keep_heldout=True).queries == 6
    assert convert_squad(squad_raw(2), out, limit=1).queries == 1
    assert len(load_queries(out, "squad")) == 1


def test_squad_samples_500_questions_with_seed_0(tmp_path: Path) -> None:
    raw = squad_raw(1)
    raw["data"][0]["paragraphs"][0]["qas"] = [
        {"id": f"q{i:03d}", "question": "?", "answers": [{"text": "x", "answer_start": 0}]}
        for i in range(600)
    ]
    convert_squad(raw, tmp_path)
    picked = sorted(random.Random(0).sample(range(602), 500))
    expected = [f"q{i:03d}" if i < 600 else ("b0", "c0")[i - 600] for i in picked]
    expected = [e for i, e in enumerate(expected) if i % 3 != 2]
    assert [q.id for q in load_queries(tmp_path, "squad")] == expected
    assert len(expected) == 334  # the bundle's count


# -- MuSiQue -----------------------------------------------------------------------------------


def musique_record(rid: str, paragraphs: list[tuple[str, str, bool]], **kw: Any) -> dict:
    return {
        "id": rid,
        "paragraphs": [
            {"idx": i, "title": t, "paragraph_text": text, "is_supporting": s}
            for i, (t, text, s) in enumerate(paragraphs)
        ],
        "question": kw.get("question", "What is the seat of the county?"),
        "question_decomposition": kw["decomposition"],
        "answer": kw["answer"],
        "answer_aliases": kw.get("aliases", []),
        "answerable": True,
    }


def test_musique_converts_into_the_common_layout(tmp_path: Path) -> None:
    shared = ("Mountrail County Courthouse", "The courthouse in Stanley, North Dakota.", True)
    records = [
        musique_record(
            "2hop__574419_270105",
            [
                ("Port Blair", "Port Blair is a capital.", False),
                shared,
                ("Van Hook Township", "Van Hook Township is in Mountrail County.", True),
            ],
            decomposition=[
                {
                    "id": 574419,
                    "question": "Van Hook >> county",
                    "answer": "Mountrail County",
                    "paragraph_support_idx": 2,
                },
                {
                    "id": 270105,
                    "question": "#1 >> capital",
                    "answer": "Stanley",
                    "paragraph_support_idx": 1,
                },
            ],
            answer="Stanley",
        ),
        musique_record(
            "3hop1__1_2_3",
            [("Kalam", "Kalam was a president of India.", True), (shared[0], shared[1], False)],
            decomposition=[{"id": 1, "question": "x", "answer": "y", "paragraph_support_idx": 0}],
            answer="A.P.J. Abdul Kalam",
            aliases=["Abdul Kalam", "Kalam"],
        ),
    ]
    records[1]["paragraphs"].reverse()  # listed out of idx order: idx order wins
    raw = tmp_path / "musique.json"  # JSON Lines, as upstream
    raw.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "data"
    result = convert_musique(raw, out)
    assert (result.queries, result.documents) == (2, 4)  # the shared paragraph pooled once
    ids = [musique_doc_id(p["title"], p["paragraph_text"]) for p in records[0]["paragraphs"]]
    docs = load_corpus(out, "musique")
    assert [d.id for d in docs][:3] == ids
    assert docs[3].title == "Kalam" and docs[3].id.startswith("mq-") and len(docs[3].id) == 19
    first, second = load_queries(out, "musique")
    assert first.gold_doc_ids == (ids[1], ids[2])  # the is_supporting paragraphs, idx order
    assert first.extra["paragraph_ids"] == ids
    assert [s["support_doc_id"] for s in first.extra["question_decomposition"]] == [ids[2], ids[1]]
    assert first.extra["hops"] == 2 and second.extra["hops"] == 3
    assert second.answers == ("A.P.J. Abdul Kalam", "Abdul Kalam", "Kalam")
    assert second.extra["paragraph_ids"] == [docs[3].id, ids[1]]
    assert set(second.extra) == set(load_card("musique").fields.query_extra)
    assert score("musique", "Kalam", second) == {"em": 1.0, "f1": 1.0}
    # the parsed list and a JSON array work too
    assert convert_musique(records, tmp_path / "b").documents == 4
    (tmp_path / "arr.json").write_text(json.dumps(records), encoding="utf-8")
    assert convert_musique(tmp_path / "arr.json", tmp_path / "c").queries == 2


def test_musique_missing_field_is_located(tmp_path: Path) -> None:
    raw = tmp_path / "musique.json"
    raw.write_text(json.dumps({"id": "2hop__1", "paragraphs": []}) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"record 0: missing upstream field 'question'"):
        convert_musique(raw, tmp_path / "out")


# -- QMSum -------------------------------------------------------------------------------------


def meeting(tag: str, n_specific: int) -> dict[str, Any]:
    return {
        "topic_list": [{"topic": f"Topic {tag}", "relevant_text_span": [["0", "1"]]}],
        "general_query_list": [{"query": "Summarize the whole meeting.", "answer": f"All {tag}."}],
        "specific_query_list": [
            {
                "query": f"What about {tag}{k}?",
                "answer": f"Answer {tag}{k}.",
                "relevant_text_span": [[str(k), str(k + 1)]],
            }
            for k in range(n_specific)
        ],
        "meeting_transcripts": [
            {"speaker": "Professor E", "content": f"So . OK . Meeting {tag} ."},
            {"speaker": "Grad G", "content": "Mm-hmm ."},
        ],
    }


def write_qmsum(root: Path, named: dict[tuple[str, str], dict[str, Any]]) -> None:
    (root / "data/ALL/jsonl").mkdir(parents=True)
    with open(root / "data/ALL/jsonl/val.jsonl", "w", encoding="utf-8") as f:
        for m in named.values():
            f.write(json.dumps(m) + "\n")
    for (domain, name), m in named.items():
        for folder in ("ALL", domain):
            path = root / "data" / folder / "val" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(m, indent=4), encoding="utf-8")


def test_qmsum_converts_into_the_common_layout(tmp_path: Path) -> None:
    write_qmsum(
        tmp_path / "QMSum",
        {("Academic", "Bmr005"): meeting("a", 2), ("Committee", "covid_2"): meeting("b", 1)},
    )
    out = tmp_path / "data"
    result = convert_qmsum(tmp_path / "QMSum", out)
    assert (result.queries, result.documents) == (4, 2)  # 5 queries, row 2 held out
    docs = load_corpus(out, "qmsum")
    assert [d.id for d in docs] == ["Bmr005", "covid_2"]
    assert docs[1].title == "covid_2 (Committee meeting transcript)"
    assert docs[0].text == "Professor E: So . OK . Meeting a .\nGrad G: Mm-hmm ."
    corpus = rows(out / "qmsum" / "corpus.jsonl")
    assert corpus[0]["n_turns"] == 2 and corpus[0]["domain"] == "Academic"
    assert corpus[0]["topic_list"] == meeting("a", 0)["topic_list"]
    queries = load_queries(out, "qmsum")
    assert [q.id for q in queries] == [
        "Bmr005#general0",
        "Bmr005#specific0",
        "covid_2#general0",
        "covid_2#specific0",
    ]
    general, specific = queries[0], queries[1]
    assert general.extra["relevant_text_span"] is None and general.extra["query_type"] == "general"
    assert specific.extra["relevant_text_span"] == [["0", "1"]]
    assert specific.gold_doc_ids == ("Bmr005",) and specific.answers == ("Answer a0.",)
    assert set(specific.extra) == set(load_card("qmsum").fields.query_extra)
    assert queries[2].extra["domain"] == "Committee"


def test_qmsum_without_meeting_names_fails_clearly(tmp_path: Path) -> None:
    write_qmsum(tmp_path, {("Product", "ES2009c"): meeting("a", 1)})
    shutil.rmtree(tmp_path / "data/ALL/val")
    shutil.rmtree(tmp_path / "data/Product")
    with pytest.raises(DataFormatError, match="line 1: no per-meeting file"):
        convert_qmsum(tmp_path / "data", tmp_path / "out")


# -- FinSec ------------------------------------------------------------------------------------

FINSEC_DOCS = ("2023 Q2 AAPL", "2023 Q3 AAPL", "2023 Q3 MSFT")


def write_finsec(
    root: Path, qna: list[dict[str, str]], docs: tuple[str, ...] = FINSEC_DOCS
) -> Path:
    folder = root / "sec-10-q/data/v1"
    (folder / "docs").mkdir(parents=True)
    for stem in docs:
        (folder / "docs" / f"{stem}.pdf").write_bytes(b"%PDF-1.4 stub")
    with open(folder / "qna_data.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(
            f, ["Question", "Source Docs", "Question Type", "Source Chunk Type", "Answer"]
        )
        writer.writeheader()
        writer.writerows(qna)
    return folder


def fake_pdf(path: Path) -> tuple[str, int]:
    date = {"2023 Q2 AAPL": "April 1, 2023"}.get(path.stem, "July 1, 2023")
    return f"   FORM 10-Q\n   For the quarterly period ended {date}\n\fPage two   $ 81,797", 2


def qna(question: str, glob: str, answer: str = "It rose.\n\nSOURCE(S): x.pdf") -> dict:
    return {
        "Question": question,
        "Source Docs": glob,
        "Question Type": "Multi-Doc RAG",
        "Source Chunk Type": "Table",
        "Answer": answer,
    }


def test_finsec_converts_into_the_common_layout(tmp_path: Path) -> None:
    answer = 'Sales were "$81,797" million.\n\nSOURCE(S): 2023 Q3 AAPL.pdf'
    write_finsec(
        tmp_path,
        [
            qna("How did Apple's sales change?", "*AAPL*"),
            qna("MSFT revenue?", "*2023 Q3 MSFT*", answer),
            qna("held out", "*MSFT*"),
            qna("Apple Q3?", "*2023 Q3 AAPL*"),
        ],
    )
    out = tmp_path / "data"
    result = convert_finsec(tmp_path, out, extract=fake_pdf)
    assert (result.queries, result.documents) == (3, 3)
    docs = load_corpus(out, "finsec")
    assert [d.id for d in docs] == list(FINSEC_DOCS)
    assert docs[2].title == "Microsoft Corporation Form 10-Q (2023 Q3 MSFT)"
    first = rows(out / "finsec" / "corpus.jsonl")[0]
    assert {k: v for k, v in first.items() if k != "text"} == {
        "id": "2023 Q2 AAPL",
        "title": "Apple Inc. Form 10-Q (2023 Q2 AAPL)",
        "ticker": "AAPL",
        "company": "Apple Inc.",
        "period_label": "2023 Q2",
        "period_ended": "April 1, 2023",
        "pages": 2,
        "source_file": "sec-10-q/data/v1/docs/2023 Q2 AAPL.pdf",
    }
    queries = load_queries(out, "finsec")
    assert [q.id for q in queries] == ["finsec-000", "finsec-001", "finsec-003"]
    assert queries[0].gold_doc_ids == ("2023 Q2 AAPL", "2023 Q3 AAPL")
    assert queries[1].gold_doc_ids == ("2023 Q3 MSFT",) and queries[1].answers == (answer,)
    assert set(queries[1].extra) == set(load_card("finsec").fields.query_extra)
    assert score("finsec", 'Sales were "$81,797" million.', queries[1])["rougeL"] == 1.0


def test_finsec_unmatched_glob_and_missing_poppler(tmp_path: Path, monkeypatch) -> None:
    write_finsec(tmp_path, [qna("?", "*2024 Q1 AAPL*")])
    with pytest.raises(DataFormatError, match=r"row 1: Source Docs '\*2024 Q1 AAPL\*' names no"):
        convert_finsec(tmp_path, tmp_path / "out", extract=fake_pdf)
    monkeypatch.setattr(dl.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependency, match="poppler-utils"):
        convert_finsec(tmp_path, tmp_path / "out")


def test_clean_layout_text() -> None:
    raw = "   UNITED STATES      \n\n   Net sales     $   81,797\t\n\fTable of Contents\n\n\f\f"
    assert clean_layout_text(raw) == (
        "   UNITED STATES\n\n   Net sales   $   81,797\n\fTable of Contents"
    )


# -- round trips against the shared bundle -----------------------------------------------------


def test_squad_round_trip(data_dir: Path, tmp_path: Path) -> None:
    corpus = rows(data_dir / "squad/corpus.jsonl")
    queries = rows(data_dir / "squad/queries.jsonl")
    by_doc: dict[str, list[dict]] = {}
    for q in queries:
        by_doc.setdefault(q["gold_doc_ids"][0], []).append(q)
    articles: dict[str, list[dict]] = {}
    for doc in corpus:
        qas = [
            {
                "id": q["id"],
                "question": q["question"],
                "answers": [
                    {"text": t, "answer_start": s}
                    for t, s in zip(q["answers"], q["answer_starts"], strict=True)
                ],
            }
            for q in by_doc.get(doc["id"], [])
        ]
        articles.setdefault(doc["title"], []).append({"context": doc["text"], "qas": qas})
    raw = {"data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}
    convert_squad(raw, tmp_path, keep_heldout=True)  # 334 < 500: every question is sampled
    assert rows(tmp_path / "squad/corpus.jsonl") == corpus
    assert rows(tmp_path / "squad/queries.jsonl") == queries


def test_musique_round_trip(data_dir: Path, tmp_path: Path) -> None:
    corpus = {d["id"]: d for d in rows(data_dir / "musique/corpus.jsonl")}
    queries = rows(data_dir / "musique/queries.jsonl")
    records = []
    for q in queries:
        records.append(
            {
                "id": q["id"],
                "paragraphs": [
                    {
                        "idx": i,
                        "title": corpus[p]["title"],
                        "paragraph_text": corpus[p]["text"],
                        "is_supporting": p in q["gold_doc_ids"],
                    }
                    for i, p in enumerate(q["paragraph_ids"])
                ],
                "question": q["question"],
                "question_decomposition": [
                    {k: v for k, v in s.items() if k != "support_doc_id"}
                    for s in q["question_decomposition"]
                ],
                "answer": q["answer"],
                "answer_aliases": q["answer_aliases"],
                "answerable": q["answerable"],
            }
        )
    convert_musique(records, tmp_path, keep_heldout=True)
    assert rows(tmp_path / "musique/queries.jsonl") == queries
    for doc in rows(tmp_path / "musique/corpus.jsonl"):
        assert corpus[doc["id"]] == doc


def test_qmsum_round_trip(data_dir: Path, tmp_path: Path) -> None:
    corpus = rows(data_dir / "qmsum/corpus.jsonl")
    queries = rows(data_dir / "qmsum/queries.jsonl")
    named = {}
    for doc in corpus:
        m: dict[str, Any] = {"topic_list": doc["topic_list"]}
        for kind in ("general", "specific"):
            mine = {
                int(q["id"].split(f"#{kind}")[1]): q
                for q in queries
                if q["meeting_id"] == doc["id"] and q["query_type"] == kind
            }
            slots: list[dict] = []
            for i in range(max(mine, default=-1) + 1):  # held-out slots get a stand-in
                q = mine.get(
                    i,
                    {"question": "HELD-OUT", "answers": ["-"], "relevant_text_span": [["0", "0"]]},
                )
                entry = {"query": q["question"], "answer": q["answers"][0]}
                if kind == "specific":
                    entry["relevant_text_span"] = q["relevant_text_span"]
                slots.append(entry)
            m[f"{kind}_query_list"] = slots
        turns = [line.split(": ", 1) for line in doc["text"].split("\n")]
        m["meeting_transcripts"] = [{"speaker": s, "content": c} for s, c in turns]
        named[(doc["domain"], doc["id"])] = m
    write_qmsum(tmp_path / "raw", named)
    convert_qmsum(tmp_path / "raw", tmp_path, keep_heldout=True)
    assert rows(tmp_path / "qmsum/corpus.jsonl") == corpus
    got = [q for q in rows(tmp_path / "qmsum/queries.jsonl") if q["question"] != "HELD-OUT"]
    assert got == queries


def test_finsec_round_trip(data_dir: Path, tmp_path: Path) -> None:
    corpus = rows(data_dir / "finsec/corpus.jsonl")
    queries = {int(q["id"].split("-")[1]): q for q in rows(data_dir / "finsec/queries.jsonl")}
    table = []
    for i in range(max(queries) + 1):
        q = queries.get(i)
        table.append(
            qna("HELD-OUT", "*AAPL*")
            if q is None
            else {
                "Question": q["question"],
                "Source Docs": q["source_docs"],
                "Question Type": q["question_type"],
                "Source Chunk Type": q["source_chunk_type"],
                "Answer": q["answers"][0],
            }
        )
    write_finsec(tmp_path / "raw", table, tuple(d["id"] for d in corpus))
    by_stem = {d["id"]: (d["text"], d["pages"]) for d in corpus}
    convert_finsec(
        tmp_path / "raw", tmp_path, keep_heldout=True, extract=lambda pdf: by_stem[pdf.stem]
    )
    assert rows(tmp_path / "finsec/corpus.jsonl") == corpus
    got = [q for q in rows(tmp_path / "finsec/queries.jsonl") if q["question"] != "HELD-OUT"]
    assert got == list(queries.values())


# -- download ----------------------------------------------------------------------------------


def offline_client(seen: list[str]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_download_offline_fails_with_the_url(tmp_path: Path) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeFailure) as e:
        download(
            "squad", tmp_path / "out", cache_dir=tmp_path / "cache", client=offline_client(seen)
        )
    message = str(e.value)
    assert seen == [dl.SQUAD_URL]
    assert "\n" not in message
    assert message.startswith(f"cannot download {dl.SQUAD_URL} (ConnectError:")
    assert str(tmp_path / "cache" / "squad" / "dev-v1.1.json") in message  # where to put it
    assert not (tmp_path / "out").exists()


def test_fetch_from_a_closed_port_fails_with_the_url(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/dev-v1.1.json"
    with pytest.raises(RuntimeFailure, match=f"cannot download {url} "):
        fetch(url, tmp_path / "x.json", timeout=5)
    assert not (tmp_path / "x.json").exists()


def test_download_http_error_and_hash_mismatch(tmp_path: Path) -> None:
    not_found = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    commit = load_card("musique").source.commit
    url = f"https://raw.githubusercontent.com/AdelWang/MIGRES/{commit}/data/musique.json"
    with pytest.raises(DataNotFound, match=f"{url} answered HTTP 404"):
        download("musique", tmp_path / "out", cache_dir=tmp_path / "c", client=not_found)
    limited = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(403)))
    with pytest.raises(RuntimeFailure, match=f"{url} answered HTTP 403; retry later"):
        download("musique", tmp_path / "out", cache_dir=tmp_path / "c", client=limited)
    tiny = httpx.Client(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json=squad_raw()))
    )
    with pytest.raises(DataFormatError, match=f"{dl.SQUAD_URL}: SHA-256 differs from the card's"):
        download("squad", tmp_path / "out", cache_dir=tmp_path / "c", client=tiny)
    assert not (tmp_path / "c" / "squad" / "dev-v1.1.json").exists()


def test_download_qmsum_fetches_the_cards_commit_then_works_offline(tmp_path: Path) -> None:
    commit = load_card("qmsum").source.commit
    upstream = tmp_path / "upstream"
    write_qmsum(
        upstream, {("Academic", "Bmr005"): meeting("a", 2), ("Product", "ES2009c"): meeting("b", 0)}
    )
    files = sorted(p.relative_to(upstream).as_posix() for p in upstream.rglob("*") if p.is_file())
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        seen.append(url)
        if url == dl.TREE_URL.format(repo="Yale-LILY/QMSum", commit=commit):
            tree = [{"path": p, "type": "blob"} for p in files] + [{"path": "data", "type": "tree"}]
            return httpx.Response(200, json={"tree": tree, "truncated": False})
        prefix = f"https://raw.githubusercontent.com/Yale-LILY/QMSum/{commit}/"
        assert url.startswith(prefix), url
        return httpx.Response(200, content=(upstream / url.removeprefix(prefix)).read_bytes())

    client = httpx.Client(transport=httpx.MockTransport(handler))
    result = download("qmsum", tmp_path / "out", cache_dir=tmp_path / "cache", client=client)
    assert (result.queries, result.documents) == (3, 2)
    # val.jsonl, the listing, and the per-domain meeting files (not the ALL/val copies)
    assert len(seen) == 4 and not any("/ALL/val/" in u for u in seen)
    assert [q.id for q in load_queries(tmp_path / "out", "qmsum")] == [
        "Bmr005#general0",
        "Bmr005#specific0",
        "ES2009c#general0",
    ]
    # Everything is cached now: no request is made.
    seen.clear()
    again = download(
        "qmsum", tmp_path / "out2", cache_dir=tmp_path / "cache", client=offline_client(seen)
    )
    assert again == dl.Converted(tmp_path / "out2" / "qmsum", 3, 2) and seen == []


def test_download_finsec_quotes_paths_and_uses_files_put_by_hand(
    tmp_path: Path, monkeypatch
) -> None:
    card = load_card("finsec")
    cache = tmp_path / "cache" / "finsec"
    write_finsec(cache, [qna("Apple?", "*AAPL*")])  # as if copied in by hand; no listing
    monkeypatch.setattr(dl, "pdftotext_layout", fake_pdf)
    seen: list[str] = []
    result = download(
        "finsec", tmp_path / "out", cache_dir=tmp_path / "cache", client=offline_client(seen)
    )
    assert (result.queries, result.documents) == (1, 3)
    assert seen == [dl.TREE_URL.format(repo=card.source.repo, commit=card.source.commit)]
    assert dl._raw_url(card, "sec-10-q/data/v1/docs/2023 Q3 AAPL.pdf").endswith(
        "/sec-10-q/data/v1/docs/2023%20Q3%20AAPL.pdf"
    )
