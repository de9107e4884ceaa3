"""The profiler's prompt templates (pure: files and strings, no engine).

The templates live in the shipped `profiler_prompts/` folder as `<name>.<version>.txt`, in the
synthesis templates' format (`ragctl.synthesis.prompts.parse_template`): a `# name vN: ...`
header, a `[system]` and a `[user]` section, `$placeholders`. A change of wording is a new file
with the next version; `TEMPLATE_VERSIONS` says which one this code uses, and the version goes
into every profile outcome (and from there into every Decision).

The field profiler's template (`fields`) adds one `[field NAME: value=label ...]` section per
profile field after `[user]`: that field's question, which fills the user section's `$field`
(the last thing in the prompt, so the four prompts share everything before it), and the one-token
answer (label) that stands for each of the field's values (`beliefs.FIELD_VALUES`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from ragctl.profiler.beliefs import FIELD_VALUES
from ragctl.profiler.schema import profile_to_json
from ragctl.resources import data_folder
from ragctl.synthesis.prompts import Template, format_notes, parse_template
from ragctl.types import Profile

PROFILE = "profile"
FEEDBACK = "feedback"
FIELDS = "fields"
TEMPLATE_VERSIONS: dict[str, str] = {PROFILE: "v1", FEEDBACK: "v1", FIELDS: "v1"}
"""The template version of each profiler prompt this code uses."""
LEGACY_FIELDS_TEMPLATE = "v1"
"""The fields template of profiler state written before state recorded its template (v1 was
the only one then)."""


@dataclass(frozen=True)
class FeedbackExample:
    """A question and the profile the golden run said it should have had."""

    question: str
    profile: Profile


@dataclass(frozen=True)
class FieldQuestion:
    """One field's question and the answer label of each of its values."""

    field: str
    text: str
    labels: Mapping[str, str]
    """Field value (`beliefs.FIELD_VALUES`) -> the answer that stands for it."""


@dataclass(frozen=True)
class FieldTemplate:
    """The field profiler's template: the shared prompt (its user section ends with `$field`)
    and one question per field."""

    template: Template
    questions: Mapping[str, FieldQuestion]

    @property
    def version(self) -> str:
        return self.template.version


@cache
def load_profiler_template(name: str, version: str | None = None) -> Template:
    """`profiler_prompts/<name>.<version>.txt` (the version in use when not given). The file's
    header must carry the same version as its name, so a copied file cannot record a stale one."""
    version = version or TEMPLATE_VERSIONS[name]
    path = data_folder("profiler_prompts") / f"{name}.{version}.txt"
    template = parse_template(name, path.read_text("utf-8"))
    if template.version != version:
        raise ValueError(
            f"{path.name}: the header says {template.version}, the file name {version}"
        )
    return template


_FIELD_SECTION = re.compile(r"^\[field\s+(\w+)\s*:([^\]]*)\]\s*$", re.MULTILINE)


@cache
def load_field_template(version: str | None = None) -> FieldTemplate:
    """`profiler_prompts/fields.<version>.txt` (the version in use when not given)."""
    version = version or TEMPLATE_VERSIONS[FIELDS]
    path = data_folder("profiler_prompts") / f"{FIELDS}.{version}.txt"
    parsed = parse_field_template(path.read_text("utf-8"))
    if parsed.version != version:
        raise ValueError(f"{path.name}: the header says {parsed.version}, the file name {version}")
    return parsed


def parse_field_template(text: str) -> FieldTemplate:
    """The shared prompt and the `[field NAME: value=label ...]` sections; ValueError unless
    every field of `FIELD_VALUES` has one question, every value one label, and the labels of a
    field differ once normalised (`normalise_label`)."""
    parts = _FIELD_SECTION.split(text)
    # parts = [shared prompt, name, labels, question, name, labels, question, ...]
    template = parse_template(FIELDS, parts[0])
    if "$field" not in template.user or not template.user.rstrip().endswith("$field"):
        raise ValueError("the fields template's [user] section must end with $field")
    questions: dict[str, FieldQuestion] = {}
    for i in range(1, len(parts) - 2, 3):
        name, spec, body = parts[i], parts[i + 1], parts[i + 2].strip()
        if name not in FIELD_VALUES:
            raise ValueError(f"[field {name}]: unknown field (known: {', '.join(FIELD_VALUES)})")
        if name in questions:
            raise ValueError(f"[field {name}] appears twice")
        if not body:
            raise ValueError(f"[field {name}] has no question")
        labels: dict[str, str] = {}
        for item in spec.split():
            value, sep, label = item.partition("=")
            if not sep or not label or value in labels:
                raise ValueError(f"[field {name}]: {item!r} is not a new value=label pair")
            labels[value] = label
        if set(labels) != set(FIELD_VALUES[name]):
            raise ValueError(
                f"[field {name}] must give a label to each of {', '.join(FIELD_VALUES[name])}"
            )
        keys = [normalise_label(labels[v]) for v in FIELD_VALUES[name]]
        if not all(keys) or len(set(keys)) != len(keys):
            raise ValueError(f"[field {name}]: labels must be non-empty and distinct")
        ordered = {v: labels[v] for v in FIELD_VALUES[name]}
        questions[name] = FieldQuestion(name, body, ordered)
    missing = [f for f in FIELD_VALUES if f not in questions]
    if missing:
        raise ValueError(f"the fields template has no question for {', '.join(missing)}")
    return FieldTemplate(template, {f: questions[f] for f in FIELD_VALUES})


_STRIP = string.whitespace + string.punctuation


def normalise_label(text: str) -> str:
    """How a generated token is matched with an answer label: whitespace and punctuation
    stripped from both ends, lower case (`Yes`, ` yes` and `yes.` are all `yes`)."""
    return text.strip(_STRIP).lower()


def format_examples(examples: Sequence[FeedbackExample]) -> str:
    """The `$examples` block of the profile prompt: empty without examples, else a heading and
    one question/profile pair each (oldest first), set off by blank lines."""
    if not examples:
        return ""
    pairs = "\n".join(
        f"Question: {_one_line(e.question)}\nProfile: {profile_to_json(e.profile)}"
        for e in examples
    )
    return "\nProfiles that were right for earlier questions of this collection:\n" + pairs + "\n"


_NOTHING = re.compile(r"^\W*nothing relevant\W*$", re.IGNORECASE)


def useful_notes(notes: Sequence[str]) -> list[str]:
    """The golden run's notes without the empty ones and the map stage's `nothing relevant`."""
    return [n.strip() for n in notes if n.strip() and not _NOTHING.match(n.strip())]


def format_golden_notes(notes: Sequence[str]) -> str:
    return format_notes(list(notes)) if notes else "(no chunk held anything relevant)"


def _one_line(text: str) -> str:
    return " ".join(text.split())
