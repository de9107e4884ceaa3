"""The profiler's prompt templates (pure: files and strings, no engine).

The templates live in the shipped `profiler_prompts/` folder as `<name>.<version>.txt`, in the
synthesis templates' format (`ragctl.synthesis.prompts.parse_template`): a `# name vN: ...`
header, a `[system]` and a `[user]` section, `$placeholders`. A change of wording is a new file
with the next version; `TEMPLATE_VERSIONS` says which one this code uses, and the version goes
into every profile outcome (and from there into every Decision).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from ragctl.profiler.schema import profile_to_json
from ragctl.resources import data_folder
from ragctl.synthesis.prompts import Template, format_notes, parse_template
from ragctl.types import Profile

PROFILE = "profile"
FEEDBACK = "feedback"
TEMPLATE_VERSIONS: dict[str, str] = {PROFILE: "v1", FEEDBACK: "v1"}
"""The template version of each profiler prompt this code uses."""


@dataclass(frozen=True)
class FeedbackExample:
    """A question and the profile the golden run said it should have had."""

    question: str
    profile: Profile


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
