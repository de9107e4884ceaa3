"""The profiler's state on disk, per (model, collection): outcome labels, calibrations and the
learned profiler, under `<cache_dir>/profiler/<model-slug>/<collection-slug>/`:

- `labels.jsonl`: one row per labelled query (`LabelRecord`: the label's fields, the question,
  the learned profiler's features and the LLM profiler's beliefs when known), appended and
  flushed row by row; a torn last line (an interrupted append) is skipped on reading and ended
  before the next append, as the evaluation's `samples.jsonl` (the evaluation's reader sits
  above the profiler in the layers, so this module keeps its own small copy);
- `calibration.json`: the LLM profiler's `Calibration`;
- `calibration-learned.json`: the learned profiler's `Calibration`, fitted on its K-fold
  held-out beliefs (so its ECE is on queries it was not fitted on);
- `learned.json`: the `LearnedProfiler`.

The cache folder is a parameter (the settings' `cache_dir`); nothing here reads settings.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ragctl.errors import ProfilerStateError
from ragctl.profiler.beliefs import FieldBeliefs
from ragctl.profiler.calibration import FIELDS, MIN_SAMPLES, Calibration
from ragctl.profiler.labels import OutcomeLabel
from ragctl.profiler.learned import LearnedProfiler
from ragctl.profiler.prompts import FIELDS as FIELDS_TEMPLATE
from ragctl.profiler.prompts import LEGACY_FIELDS_TEMPLATE, TEMPLATE_VERSIONS

PROFILER_DIR = "profiler"
LABELS_FILE = "labels.jsonl"
CALIBRATION_FILE = "calibration.json"
LEARNED_CALIBRATION_FILE = "calibration-learned.json"
LEARNED_FILE = "learned.json"
DECISIVE_FIELD = "joint"
"""The field `choose_profiler` compares: joint reasoning picks the method family."""

ProfilerName = Literal["llm", "learned"]
ProfilerSetting = Literal["auto", "llm", "learned"]


def slug(name: str) -> str:
    """A folder name for a model or collection name: runs of characters other than letters,
    digits, `.`, `_` and `-` become one `-` (`HuggingFaceTB/SmolLM2-135M` ->
    `HuggingFaceTB-SmolLM2-135M`)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return out or "default"


# -- labelled queries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRecord:
    """One labelled query as `labels.jsonl` keeps it."""

    label: OutcomeLabel
    question: str = ""
    features: tuple[float, ...] | None = None
    """`learned.query_features` of the query, when known."""
    beliefs: FieldBeliefs | None = None
    """The LLM profiler's beliefs for the query, when known."""
    template: str = LEGACY_FIELDS_TEMPLATE
    """The fields template version the beliefs were asked with (beliefs asked with one wording
    say nothing about another's)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.label.to_dict(),
            "question": self.question,
            "features": None if self.features is None else list(self.features),
            "beliefs": None if self.beliefs is None else self.beliefs.to_dict(),
            "template": self.template,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelRecord:
        features = d.get("features")
        beliefs = d.get("beliefs")
        return cls(
            label=OutcomeLabel.from_dict(d),
            question=str(d.get("question", "")),
            features=None if features is None else tuple(float(v) for v in features),
            beliefs=None if beliefs is None else FieldBeliefs.from_dict(beliefs),
            template=str(d.get("template") or LEGACY_FIELDS_TEMPLATE),
        )


def llm_beliefs(outcome: Any) -> FieldBeliefs | None:
    """What a label keeps of an LLM profile: its raw (uncalibrated) beliefs; none when the
    call failed, or a field was read as uniform or taken from the learned profiler (not an
    LLM reading to fit)."""
    if outcome.profiler != "llm" or outcome.uniform_fields or outcome.learned_fields:
        return None
    return outcome.raw_beliefs or outcome.beliefs


def read_jsonl(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[int]]:
    """(line number, row) of every JSON object line, and the numbers of the lines that are
    not one (a torn last line)."""
    rows: list[tuple[int, dict[str, Any]]] = []
    torn: list[int] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append((number, row))
            else:
                torn.append(number)
    return rows, torn


def append_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append rows, one flushed line each; a torn last line is ended first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
    written = 0
    with path.open("a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            written += 1
    return written


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


# -- which profiler -------------------------------------------------------------------------------


def choose_profiler(
    llm_accuracy: float | None,
    learned_accuracy: float | None,
    setting: ProfilerSetting = "auto",
    *,
    learned_samples: int = 0,
    min_samples: int = MIN_SAMPLES,
) -> ProfilerName:
    """The profiler to use. `llm` / `learned` force one (`learned` only where a learned model
    exists: `learned_accuracy` known). `auto`: the learned one when it was fitted on
    >= `min_samples` labels and its held-out accuracy on the decisive field (`joint`) is at
    least the LLM's on the same labels; the LLM otherwise, and whenever either accuracy is
    unknown (no evidence to switch on)."""
    if setting == "llm":
        return "llm"
    if setting == "learned":
        return "learned" if learned_accuracy is not None else "llm"
    if setting != "auto":
        raise ValueError(f"profiler setting must be auto, llm or learned, got {setting!r}")
    if llm_accuracy is None or learned_accuracy is None or learned_samples < min_samples:
        return "llm"
    return "learned" if learned_accuracy >= llm_accuracy else "llm"


def llm_fields(
    fields: Sequence[FieldStatus], *, learned_samples: int, min_samples: int = MIN_SAMPLES
) -> tuple[str, ...]:
    """`auto` beside a learned profiler: the fields worth an LLM call, i.e. those whose LLM
    held-out accuracy, measured on >= `min_samples` labels, beats the learned profiler's (or
    the learned profiler has none). Every field while the learned profiler is fitted on fewer
    than `min_samples` labels. Each field asked costs the engine one sequence, so a field the
    free learned profiler answers as well, or that no one has measured, is not asked."""
    if learned_samples < min_samples:
        return tuple(f.name for f in fields)
    return tuple(
        f.name
        for f in fields
        if f.n >= min_samples
        and f.llm_accuracy is not None
        and (f.learned_accuracy is None or f.llm_accuracy > f.learned_accuracy)
    )


@dataclass(frozen=True)
class FieldStatus:
    """One field's numbers for both profilers (None: not measured)."""

    name: str
    n: int
    """Labelled samples of the field that carried LLM beliefs."""
    llm_ece_before: float | None
    llm_ece_after: float | None
    llm_accuracy: float | None
    learned_n: int
    learned_ece_before: float | None
    learned_ece_after: float | None
    learned_accuracy: float | None
    """Held-out (K-fold) accuracy."""


@dataclass(frozen=True)
class ProfilerStatus:
    """What the state of one (model, collection) says."""

    folder: Path
    samples: int
    """Labelled queries in labels.jsonl."""
    with_beliefs: int
    with_features: int
    fields: tuple[FieldStatus, ...]
    in_use: ProfilerName
    llm_calibrated: tuple[str, ...]
    """The fields calibration.json calibrates."""
    learned_samples: int
    """Samples learned.json was fitted on (0: none)."""


def summarize(
    folder: Path,
    records: Sequence[LabelRecord],
    calibration: Calibration,
    learned: LearnedProfiler | None,
    learned_calibration: Calibration | None,
    *,
    setting: ProfilerSetting = "auto",
    min_samples: int = MIN_SAMPLES,
    template: str | None = None,
) -> ProfilerStatus:
    """The status of loaded state (pure); `with_beliefs` counts the beliefs asked with
    `template` (all when None)."""
    fields = []
    for name in FIELDS:
        llm = calibration.fields.get(name)
        lc = learned_calibration.fields.get(name) if learned_calibration else None
        fields.append(
            FieldStatus(
                name=name,
                n=llm.n if llm else 0,
                llm_ece_before=llm.ece_before if llm else None,
                llm_ece_after=llm.ece_after if llm else None,
                llm_accuracy=llm.accuracy if llm else None,
                learned_n=lc.n if lc else 0,
                learned_ece_before=lc.ece_before if lc else None,
                learned_ece_after=lc.ece_after if lc else None,
                learned_accuracy=learned.heldout_accuracy.get(name) if learned else None,
            )
        )
    decisive = next(f for f in fields if f.name == DECISIVE_FIELD)
    learned_n = learned.n_samples if learned else 0
    return ProfilerStatus(
        folder=folder,
        samples=len(records),
        with_beliefs=sum(
            r.beliefs is not None and template in (None, r.template) for r in records
        ),
        with_features=sum(r.features is not None for r in records),
        fields=tuple(fields),
        in_use=choose_profiler(
            decisive.llm_accuracy if decisive.n else None,
            decisive.learned_accuracy,
            setting,
            learned_samples=learned_n,
            min_samples=min_samples,
        ),
        llm_calibrated=calibration.calibrated_fields,
        learned_samples=learned_n,
    )


# -- the state folder ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfilerState:
    """The state folder of one (model, collection)."""

    folder: Path
    model: str = ""
    collection: str = ""
    template: str = TEMPLATE_VERSIONS[FIELDS_TEMPLATE]
    """The fields template the LLM profiler asks with: only beliefs and calibrations of that
    wording are fitted and applied."""

    @classmethod
    def at(
        cls, cache_dir: str | Path, model: str, collection: str, template: str | None = None
    ) -> ProfilerState:
        folder = Path(cache_dir) / PROFILER_DIR / slug(model) / slug(collection)
        return cls(folder, model, collection, template or TEMPLATE_VERSIONS[FIELDS_TEMPLATE])

    @property
    def labels_path(self) -> Path:
        return self.folder / LABELS_FILE

    @property
    def calibration_path(self) -> Path:
        return self.folder / CALIBRATION_FILE

    @property
    def learned_calibration_path(self) -> Path:
        return self.folder / LEARNED_CALIBRATION_FILE

    @property
    def learned_path(self) -> Path:
        return self.folder / LEARNED_FILE

    def fingerprint(self) -> str:
        """A digest of the fitted files (calibrations, learned profiler): what the profiles
        this state gives depend on; the same until the next refit."""
        digest = hashlib.sha256()
        for path in (self.calibration_path, self.learned_calibration_path, self.learned_path):
            digest.update(path.name.encode())
            digest.update(path.read_bytes() if path.exists() else b"-")
        return digest.hexdigest()[:16]

    def append(self, records: Iterable[LabelRecord]) -> int:
        """Append labelled queries to labels.jsonl; returns how many."""
        return append_jsonl(self.labels_path, (r.to_dict() for r in records))

    def records(self) -> list[LabelRecord]:
        """Every labelled query, the last row of a query id winning (a query labelled again
        replaces its label); torn lines are skipped, a well-formed JSON row that is not a
        label is a ProfilerStateError naming the file and line."""
        if not self.labels_path.exists():
            return []
        rows, _ = read_jsonl(self.labels_path)
        out: dict[str, LabelRecord] = {}
        for number, row in rows:
            try:
                record = LabelRecord.from_dict(row)
            except (KeyError, TypeError, ValueError) as e:
                what = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
                raise ProfilerStateError(
                    f"{self.labels_path}: line {number} is not a label ({what})"
                ) from None
            out.pop(record.label.query_id, None)
            out[record.label.query_id] = record
        return list(out.values())

    def load_calibration(self, profiler: ProfilerName = "llm") -> Calibration:
        """The saved calibration, or the identity when there is none yet, or when the LLM's
        was fitted on another fields template than `template` (until a refit)."""
        path = self.calibration_path if profiler == "llm" else self.learned_calibration_path
        if not path.exists():
            return Calibration.identity(profiler, self.model, self.collection)
        calibration = Calibration.load(path)
        if profiler == "llm" and calibration.template != self.template:
            return Calibration.identity(
                profiler, self.model, self.collection,
                note=f"fitted on fields {calibration.template}, asked with {self.template}: "
                "refit (`ragctl profiler train`) to calibrate",
            )  # fmt: skip
        return calibration

    def load_learned(self) -> LearnedProfiler | None:
        return LearnedProfiler.load(self.learned_path) if self.learned_path.exists() else None

    def refit(
        self,
        *,
        embedder: str = "",
        min_samples: int = MIN_SAMPLES,
        folds: int = 5,
        seed: int = 0,
    ) -> tuple[Calibration, LearnedProfiler | None, Calibration | None]:
        """Fit and save, from the labels: the LLM calibration (records with beliefs), the
        learned profiler (records with features, when there are >= 2 of them) and its
        calibration on its held-out beliefs."""
        records = self.records()
        with_beliefs = [r for r in records if r.beliefs is not None and r.template == self.template]
        calibration = Calibration.fit(
            [r.beliefs for r in with_beliefs],  # type: ignore[misc]
            [r.label for r in with_beliefs],
            profiler="llm", model=self.model, collection=self.collection,
            min_samples=min_samples, folds=folds, seed=seed, template=self.template,
        )  # fmt: skip
        calibration.save(self.calibration_path)
        with_features = [r for r in records if r.features is not None]
        dims = {len(r.features) for r in with_features}  # type: ignore[arg-type]
        if len(with_features) < 2 or len(dims) != 1:
            return calibration, None, None
        labels = [r.label for r in with_features]
        learned = LearnedProfiler.fit(
            np.array([r.features for r in with_features]), labels, folds=folds, seed=seed,
            embedder=embedder,
        )  # fmt: skip
        learned.save(self.learned_path)
        learned_calibration = Calibration.fit(
            learned.heldout_beliefs, labels, profiler="learned", model=self.model,
            collection=self.collection, min_samples=min_samples, folds=folds, seed=seed,
        )  # fmt: skip
        learned_calibration.save(self.learned_calibration_path)
        return calibration, learned, learned_calibration

    def status(
        self, *, setting: ProfilerSetting = "auto", min_samples: int = MIN_SAMPLES
    ) -> ProfilerStatus:
        learned_cal = (
            self.load_calibration("learned") if self.learned_calibration_path.exists() else None
        )
        return summarize(
            self.folder,
            self.records(),
            self.load_calibration("llm"),
            self.load_learned(),
            learned_cal,
            setting=setting,
            min_samples=min_samples,
            template=self.template,
        )
