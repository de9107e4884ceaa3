"""Prompt templates for synthesis, kept as files in `templates/` beside this module.

A template file has an optional comment header (`# name vN: ...`), then a `[system]` and a
`[user]` section; `$name` placeholders are filled with `string.Template` (so braces in chunk text
or JSON need no escaping). The header's `vN` is the template version, recorded with results.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import cache

from ragctl.types import Chunk, Message

_SECTION = re.compile(r"^\[(system|user)\]\s*$", re.MULTILINE)
_VERSION = re.compile(r"^#\s*\S+\s+(v\d+)\b")


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    system: str
    user: str

    def render(self, **values: object) -> tuple[Message, ...]:
        """Messages with every placeholder filled; a missing value is a KeyError, not a silent
        `$name` left in the prompt."""
        text = {k: str(v) for k, v in values.items()}
        msgs = []
        if self.system:
            msgs.append(Message("system", string.Template(self.system).substitute(text)))
        msgs.append(Message("user", string.Template(self.user).substitute(text)))
        return tuple(msgs)


def parse_template(name: str, text: str) -> Template:
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    version = next((m.group(1) for ln in header if (m := _VERSION.match(ln))), "v0")
    parts = _SECTION.split(text)
    # parts = [preamble, "system", body, "user", body]
    sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}
    if "user" not in sections:
        raise ValueError(f"template {name!r} has no [user] section")
    return Template(name, version, sections.get("system", ""), sections["user"])


@cache
def load_template(name: str) -> Template:
    """One of the shipped templates: map_rerank, stuff, map, reduce."""
    from importlib import resources  # here: `import ragctl` imports synthesis, and stays cheap

    text = (resources.files("ragctl.synthesis") / "templates" / f"{name}.txt").read_text("utf-8")
    return parse_template(name, text)


def format_passage(index: int, chunk: Chunk) -> str:
    """How one chunk appears in a prompt: numbered, with its document title when it has one."""
    title = chunk.title.replace("_", " ").strip()
    head = f"[{index}] {title}" if title else f"[{index}]"
    return f"{head}\n{chunk.text.strip()}"


def format_notes(notes: list[str]) -> str:
    return "\n\n".join(f"[{i}] {n.strip()}" for i, n in enumerate(notes, 1))


def is_refusal(text: str, phrase: str) -> bool:
    """Whether a model's output is empty or starts with `phrase` ("unanswerable", ...)."""
    t = text.strip().strip(".!\"'").lower()
    return not t or t.startswith(phrase)
