"""Rebuild the evaluation datasets in the common JSONL layout from their original public
releases.

`convert_<name>(raw, out_dir, limit=None)` is pure: it reads a local copy of the upstream files
and writes `<out_dir>/<name>/corpus.jsonl` and `queries.jsonl` with the fields, ids, order and
subset of the shared datasets bundle (its README and the cards in `datasets/` describe them),
held-out queries included only on request; `limit` keeps the first queries, the corpus stays
complete. `download(name, out_dir, cache_dir=...)` fetches the upstream files named by the
card's `source` into `cache_dir`, once, then converts them. A file already in the cache is used
as is, so a machine without network can be given them by hand.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ragctl.errors import (
    DataFormatError,
    DataNotFound,
    InvalidRequest,
    MissingDependency,
    RuntimeFailure,
)
from ragctl.retrieval.collection import DatasetCard, load_card

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
TREE_URL = "https://api.github.com/repos/{repo}/git/trees/{commit}?recursive=1"

SQUAD_SAMPLE = 500
SQUAD_SEED = 0
HELDOUT_EVERY = 3
"""Row i of a dataset's query list (0-based) is held out of the bundle when i % 3 == 2."""

QMSUM_DOMAINS = ("Academic", "Product", "Committee")
FINSEC_DIR = "sec-10-q/data/v1"
FINSEC_COMPANIES = {
    "AAPL": "Apple Inc.",
    "AMZN": "Amazon.com, Inc.",
    "INTC": "Intel Corporation",
    "MSFT": "Microsoft Corporation",
    "NVDA": "NVIDIA Corporation",
}

Row = dict[str, Any]
PdfExtractor = Callable[[Path], tuple[str, int]]
"""A PDF path -> (text, page count)."""


@dataclass(frozen=True)
class Converted:
    """Where a converter wrote a dataset, and how many rows."""

    folder: Path
    queries: int
    documents: int


# -- converters --------------------------------------------------------------------------------


def convert_squad(
    raw: Path | str | dict[str, Any],
    out_dir: Path | str,
    limit: int | None = None,
    *,
    keep_heldout: bool = False,
) -> Converted:
    """SQuAD v1.1 (`dev-v1.1.json`, or its parsed object): every paragraph of every article is
    a document `<title>#<paragraph index>`; the queries are `random.Random(0).sample` of 500 of
    all questions (article, paragraph, question order), kept in file order."""
    origin = str(raw) if not isinstance(raw, dict) else "SQuAD data"
    data = raw if isinstance(raw, dict) else _read_json(Path(raw))
    corpus: list[Row] = []
    questions: list[Row] = []
    with _upstream(origin):
        for article in data["data"]:
            title = article["title"]
            for index, paragraph in enumerate(article["paragraphs"]):
                doc_id = f"{title}#{index}"
                corpus.append(
                    {
                        "id": doc_id,
                        "title": title,
                        "text": paragraph["context"],
                        "para_index": index,
                    }
                )
                for qa in paragraph["qas"]:
                    questions.append(
                        {
                            "id": qa["id"],
                            "question": qa["question"],
                            "answers": [a["text"] for a in qa["answers"]],
                            "answer_starts": [a["answer_start"] for a in qa["answers"]],
                            "title": title,
                            "gold_doc_ids": [doc_id],
                        }
                    )
    picked = random.Random(SQUAD_SEED).sample(
        range(len(questions)), min(SQUAD_SAMPLE, len(questions))
    )
    queries = [questions[i] for i in sorted(picked)]
    return _write(out_dir, "squad", corpus, _select(queries, limit, keep_heldout))


def musique_doc_id(title: str, text: str) -> str:
    """`mq-` + the first 16 hex digits of SHA-1 of `title + "\\n" + text` (UTF-8)."""
    return "mq-" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:16]


def convert_musique(
    raw: Path | str | list[dict[str, Any]],
    out_dir: Path | str,
    limit: int | None = None,
    *,
    keep_heldout: bool = False,
) -> Converted:
    """MuSiQue records (JSONL as released, a JSON list, or the parsed list), all in file
    order: each record's 20 paragraphs are pooled into the corpus, de-duplicated on exact
    (title, text), in order of first appearance."""
    origin = str(raw) if not isinstance(raw, list) else "MuSiQue records"
    records = raw if isinstance(raw, list) else _read_json_records(Path(raw))
    corpus: dict[str, Row] = {}
    queries: list[Row] = []
    for n, record in enumerate(records):
        with _upstream(f"{origin}, record {n}"):
            paragraphs = sorted(record["paragraphs"], key=lambda p: p["idx"])
            by_idx: dict[int, str] = {}
            for p in paragraphs:
                doc_id = musique_doc_id(p["title"], p["paragraph_text"])
                corpus.setdefault(
                    doc_id, {"id": doc_id, "title": p["title"], "text": p["paragraph_text"]}
                )
                by_idx[p["idx"]] = doc_id
            hops = re.match(r"(\d+)hop", record["id"])
            queries.append(
                {
                    "id": record["id"],
                    "question": record["question"],
                    "answers": [record["answer"], *record.get("answer_aliases", [])],
                    "answer": record["answer"],
                    "answer_aliases": record.get("answer_aliases", []),
                    "answerable": record.get("answerable", True),
                    "hops": int(hops.group(1)) if hops else len(record["question_decomposition"]),
                    "question_decomposition": [
                        {**step, "support_doc_id": by_idx.get(step.get("paragraph_support_idx"))}
                        for step in record["question_decomposition"]
                    ],
                    "paragraph_ids": [by_idx[p["idx"]] for p in paragraphs],
                    "gold_doc_ids": list(
                        dict.fromkeys(by_idx[p["idx"]] for p in paragraphs if p["is_supporting"])
                    ),
                }
            )
    return _write(out_dir, "musique", list(corpus.values()), _select(queries, limit, keep_heldout))


def convert_qmsum(
    raw_dir: Path | str,
    out_dir: Path | str,
    limit: int | None = None,
    *,
    keep_heldout: bool = False,
    split: str = "val",
) -> Converted:
    """QMSum from a copy of its repository's `data/` folder (or the repository root): meetings
    in `ALL/jsonl/<split>.jsonl` order. That file carries no meeting names: a meeting's name is
    the stem of the per-meeting file `*/<split>/<name>.json` holding the same transcript, and
    its domain the folder (`Academic`, `Product`, `Committee`) that has that file."""
    root = Path(raw_dir)
    if (root / "data").is_dir():
        root = root / "data"
    jsonl = root / "ALL" / "jsonl" / f"{split}.jsonl"
    meetings = _read_json_records(jsonl)
    names: dict[str, str] = {}
    domains: dict[str, str] = {}
    for path in sorted(root.glob(f"*/{split}/*.json")):
        meeting = _read_json(path)
        with _upstream(str(path)):
            names.setdefault(_transcript_key(meeting), path.stem)
        if path.parent.parent.name in QMSUM_DOMAINS:
            domains[path.stem] = path.parent.parent.name

    corpus: list[Row] = []
    queries: list[Row] = []
    for line, meeting in enumerate(meetings, 1):
        where = f"{jsonl}, line {line}"
        with _upstream(where):
            name = names.get(_transcript_key(meeting))
            if name is None:
                raise DataFormatError(
                    f"{where}: no per-meeting file {root}/*/{split}/<name>.json has this "
                    "meeting's transcript, so it has no name"
                )
            domain = domains.get(name)
            if domain is None:
                folders = ", ".join(f"{root}/{d}/{split}/" for d in QMSUM_DOMAINS)
                raise DataFormatError(
                    f"{where}: meeting {name} is in none of {folders}, so it has no domain"
                )
            turns = meeting["meeting_transcripts"]
            corpus.append(
                {
                    "id": name,
                    "title": f"{name} ({domain} meeting transcript)",
                    # Line i is turn i (relevant_text_span indexes turns), so a turn stays on
                    # one line.
                    "text": "\n".join(
                        f"{t['speaker']}: {t['content']}".replace("\n", " ") for t in turns
                    ),
                    "domain": domain,
                    "n_turns": len(turns),
                    "topic_list": meeting["topic_list"],
                }
            )
            for kind in ("general", "specific"):
                for i, q in enumerate(meeting[f"{kind}_query_list"]):
                    queries.append(
                        {
                            "id": f"{name}#{kind}{i}",
                            "question": q["query"],
                            "answers": [q["answer"]],
                            "query_type": kind,
                            "meeting_id": name,
                            "domain": domain,
                            "relevant_text_span": q["relevant_text_span"]
                            if kind == "specific"
                            else None,
                            "gold_doc_ids": [name],
                        }
                    )
    return _write(out_dir, "qmsum", corpus, _select(queries, limit, keep_heldout))


def convert_finsec(
    raw_dir: Path | str,
    out_dir: Path | str,
    limit: int | None = None,
    *,
    keep_heldout: bool = False,
    extract: PdfExtractor | None = None,
) -> Converted:
    """Docugami's SEC 10-Q set from a copy of `sec-10-q/data/v1` (or the repository root):
    `qna_data.csv` rows in order become `finsec-NNN`; every `docs/*.pdf` (sorted by name)
    becomes a document named by its file stem, its text from `extract` (default
    `pdftotext_layout`). A question's `Source Docs` glob is resolved against the file names."""
    root = Path(raw_dir)
    if (root / FINSEC_DIR).is_dir():
        root = root / FINSEC_DIR
    csv_path = root / "qna_data.csv"
    pdfs = sorted((root / "docs").glob("*.pdf"))
    if not csv_path.is_file():
        raise DataNotFound(f"{csv_path} not found (FinSec's qna_data.csv)")
    if not pdfs:
        raise DataNotFound(f"no PDF in {root / 'docs'} (FinSec's 10-Q reports)")
    extract = extract or pdftotext_layout
    stems = [p.stem for p in pdfs]

    corpus: list[Row] = []
    for pdf in pdfs:
        text, pages = extract(pdf)
        period, _, ticker = pdf.stem.rpartition(" ")
        company = FINSEC_COMPANIES.get(ticker, ticker)
        ended = re.search(r"(?im)for the quarterly period ended\s+(.+?)\s*$", text)
        corpus.append(
            {
                "id": pdf.stem,
                "title": f"{company} Form 10-Q ({pdf.stem})",
                "text": text,
                "ticker": ticker,
                "company": company,
                "period_label": period,
                "period_ended": ended.group(1) if ended else None,
                "pages": pages,
                "source_file": f"{FINSEC_DIR}/docs/{pdf.name}",
            }
        )

    queries: list[Row] = []
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            where = f"{csv_path}, row {i + 1}"
            with _upstream(where):
                glob = row["Source Docs"]
                gold = [
                    s
                    for s in stems
                    if fnmatch.fnmatchcase(f"{s}.pdf", glob) or fnmatch.fnmatchcase(s, glob)
                ]
                if not gold:
                    raise DataFormatError(f"{where}: Source Docs {glob!r} names no PDF in docs/")
                queries.append(
                    {
                        "id": f"finsec-{i:03d}",
                        "question": row["Question"],
                        "answers": [row["Answer"]],
                        "source_docs": glob,
                        "question_type": row["Question Type"],
                        "source_chunk_type": row["Source Chunk Type"],
                        "gold_doc_ids": gold,
                    }
                )
    return _write(out_dir, "finsec", corpus, _select(queries, limit, keep_heldout))


def pdftotext_layout(pdf: Path) -> tuple[str, int]:
    """The bundle's FinSec extraction: poppler's `pdftotext -layout`, cleaned by
    `clean_layout_text`; the page count from `pdfinfo`."""
    pdftotext, pdfinfo = shutil.which("pdftotext"), shutil.which("pdfinfo")
    if pdftotext is None or pdfinfo is None:
        raise MissingDependency(
            "FinSec text extraction needs pdftotext and pdfinfo from poppler-utils "
            "(apt-get install poppler-utils)"
        )
    text = _run([pdftotext, "-layout", "-enc", "UTF-8", str(pdf), "-"], pdf)
    info = _run([pdfinfo, str(pdf)], pdf)
    pages = re.search(r"(?m)^Pages:\s+(\d+)", info)
    if pages is None:
        raise DataFormatError(f"{pdf}: pdfinfo reports no page count")
    return clean_layout_text(text), int(pages.group(1))


def clean_layout_text(raw: str) -> str:
    """`pdftotext -layout` output as the bundle stores it: form feeds (and blank lines) after
    the last page dropped, each line right-stripped, runs of 3+ spaces collapsed to exactly 3;
    pages stay separated by a form feed."""
    lines = (re.sub(" {3,}", "   ", line.rstrip(" \t")) for line in raw.split("\n"))
    return "\n".join(lines).rstrip("\f\n")


def _run(cmd: list[str], pdf: Path) -> str:
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        err = " ".join(result.stderr.decode("utf-8", "replace").split())
        raise DataFormatError(f"{pdf}: {Path(cmd[0]).name} failed: {err or result.returncode}")
    return result.stdout.decode("utf-8")


CONVERTERS: dict[str, Callable[..., Converted]] = {
    "squad": convert_squad,
    "musique": convert_musique,
    "qmsum": convert_qmsum,
    "finsec": convert_finsec,
}


# -- download ----------------------------------------------------------------------------------


def download(
    name: str,
    out_dir: Path | str,
    *,
    cache_dir: Path | str,
    client: Any = httpx,
    limit: int | None = None,
    keep_heldout: bool = False,
    timeout: float = 60.0,
) -> Converted:
    """Fetch dataset `name`'s upstream files (as its card's `source` names them) into
    `<cache_dir>/<name>/`, unless already there, and convert them into `<out_dir>/<name>/`.

    `client` is anything with httpx's `get` (the module, an `httpx.Client`). An unreachable
    host, a rate limit or a server error raises `RuntimeFailure`; another HTTP error
    `DataNotFound`; a file whose hash differs from the card's `DataFormatError`. Each message
    is one line naming the URL and where the file could be put by hand."""
    card = load_card(name)
    if name not in _FETCHERS:
        raise InvalidRequest(f"no download is known for dataset {name!r}")
    cache = Path(cache_dir) / name
    raw = _FETCHERS[name](card, cache, _Http(client, timeout))
    return CONVERTERS[name](raw, out_dir, limit, keep_heldout=keep_heldout)


def fetch(
    url: str,
    dest: Path | str,
    *,
    client: Any = httpx,
    sha256: str | None = None,
    blob: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` (atomically), unless `dest` exists; check the SHA-256 and git
    blob hash when given."""
    return _Http(client, timeout).file(url, Path(dest), sha256=sha256, blob=blob)


class _Http:
    def __init__(self, client: Any, timeout: float) -> None:
        self.client = client
        self.timeout = timeout

    def get(self, url: str, dest: Path) -> bytes:
        try:
            response = self.client.get(url, follow_redirects=True, timeout=self.timeout)
        except httpx.HTTPError as e:
            detail = " ".join(str(e).split()) or "no detail"
            raise RuntimeFailure(
                f"cannot download {url} ({type(e).__name__}: {detail}); check the network, "
                f"or put the file at {dest} by hand"
            ) from None
        status = response.status_code
        if status in (403, 429) or status >= 500:
            # Rate limits (GitHub's API answers 403) and server trouble pass; retry later.
            raise RuntimeFailure(
                f"{url} answered HTTP {status}; retry later, or put the file at {dest} by hand"
            )
        if status >= 400:
            raise DataNotFound(
                f"{url} answered HTTP {status}; the upstream file may have moved "
                f"(put it at {dest} by hand)"
            )
        return response.content

    def file(
        self, url: str, dest: Path, *, sha256: str | None = None, blob: str | None = None
    ) -> Path:
        if dest.is_file():
            origin = f"{dest} (cached; delete it to download again)"
            _check_hashes(dest.read_bytes(), origin, sha256, blob)
            return dest
        data = self.get(url, dest)
        if data.startswith(b"version https://git-lfs"):
            raise DataFormatError(f"{url} is a Git LFS pointer, not the file")
        _check_hashes(data, url, sha256, blob)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        return dest

    def github_files(
        self, card: DatasetCard, cache: Path, wanted: Callable[[str], bool]
    ) -> list[str]:
        """The paths of the card's source repository at its commit that `wanted` accepts. The
        GitHub listing is cached beside the files; without network and without a cached
        listing, the files already in the cache (put there by hand) are taken instead."""
        url = TREE_URL.format(repo=card.source.repo, commit=card.source.commit)
        try:
            tree = _read_json(self.file(url, cache / f"tree-{card.source.commit}.json"))
        except RuntimeFailure:
            local = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
            if any(wanted(p) for p in local):
                return [p for p in local if wanted(p)]
            raise
        if tree.get("truncated"):
            raise DataFormatError(f"{url}: GitHub truncated the file listing")
        paths = [e["path"] for e in tree.get("tree", []) if e.get("type") == "blob"]
        return [p for p in paths if wanted(p)]


def _check_hashes(data: bytes, origin: str, sha256: str | None, blob: str | None) -> None:
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise DataFormatError(f"{origin}: SHA-256 differs from the card's {sha256}")
    if blob:
        got = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if got != blob:
            raise DataFormatError(f"{origin}: git blob hash {got} differs from the card's {blob}")


def _raw_url(card: DatasetCard, path: str) -> str:
    if not card.source.commit:
        raise InvalidRequest(f"dataset card {card.name} names no source commit to download from")
    return RAW_URL.format(repo=card.source.repo, commit=card.source.commit, path=quote(path))


def _fetch_squad(card: DatasetCard, cache: Path, http: _Http) -> Path:
    return http.file(
        SQUAD_URL, cache / "dev-v1.1.json", sha256=card.source.sha256, blob=card.source.blob
    )


def _fetch_musique(card: DatasetCard, cache: Path, http: _Http) -> Path:
    path = card.source.paths[0]
    return http.file(_raw_url(card, path), cache / Path(path).name, blob=card.source.blob)


def _fetch_qmsum(card: DatasetCard, cache: Path, http: _Http) -> Path:
    jsonl = card.source.paths[0]  # data/ALL/jsonl/val.jsonl
    split = Path(jsonl).stem
    http.file(_raw_url(card, jsonl), cache / jsonl)
    per_meeting = re.compile(rf"data/({'|'.join(QMSUM_DOMAINS)})/{re.escape(split)}/[^/]+\.json")
    paths = http.github_files(card, cache, lambda p: per_meeting.fullmatch(p) is not None)
    if not paths:
        raise DataNotFound(f"{card.source.repo}@{card.source.commit} has no data/*/{split}/*.json")
    for path in paths:
        http.file(_raw_url(card, path), cache / path)
    return cache / "data"


def _fetch_finsec(card: DatasetCard, cache: Path, http: _Http) -> Path:
    qna, docs = card.source.paths  # qna_data.csv, docs/*.pdf
    http.file(_raw_url(card, qna), cache / qna)
    pdfs = http.github_files(card, cache, lambda p: fnmatch.fnmatchcase(p, docs))
    if not pdfs:
        raise DataNotFound(f"{card.source.repo}@{card.source.commit} has no {docs}")
    for path in pdfs:
        http.file(_raw_url(card, path), cache / path)
    return cache / Path(qna).parent


_FETCHERS: dict[str, Callable[[DatasetCard, Path, _Http], Path]] = {
    "squad": _fetch_squad,
    "musique": _fetch_musique,
    "qmsum": _fetch_qmsum,
    "finsec": _fetch_finsec,
}


# -- helpers -----------------------------------------------------------------------------------


def _select(queries: list[Row], limit: int | None, keep_heldout: bool) -> list[Row]:
    """The bundle's part of the query list (held-out rows dropped unless kept), then the
    first `limit`."""
    if not keep_heldout:
        queries = [q for i, q in enumerate(queries) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    if limit is not None:
        if limit < 0:
            raise InvalidRequest(f"limit must be >= 0, got {limit}")
        queries = queries[:limit]
    return queries


def _write(out_dir: Path | str, name: str, corpus: list[Row], queries: list[Row]) -> Converted:
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file, rows in (("corpus", corpus), ("queries", queries)):
        path = folder / f"{file}.jsonl"
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return Converted(folder=folder, queries=len(queries), documents=len(corpus))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataNotFound(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None


def _read_json_records(path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (MuSiQue's `.json` files are JSON Lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataNotFound(f"{path} not found") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return whole
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
    return records


def _transcript_key(meeting: dict[str, Any]) -> str:
    return json.dumps(meeting["meeting_transcripts"], sort_keys=True)


@contextmanager
def _upstream(where: str) -> Iterator[None]:
    """Turn a record that lacks an upstream field into a located `DataFormatError`."""
    try:
        yield
    except KeyError as e:
        raise DataFormatError(f"{where}: missing upstream field {e}") from None
    except (TypeError, AttributeError) as e:
        raise DataFormatError(f"{where}: not in the upstream format ({e})") from None
