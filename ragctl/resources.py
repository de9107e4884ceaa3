"""Access to the data folders that ship with ragctl (prompt templates, rules, dataset cards).

In a wheel they live under `ragctl/_data/`; in a source checkout (and an editable install) they
are the top-level folders of the repository.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_folder(name: str) -> Path:
    """Path of a shipped data folder: `profiler_prompts`, `rules` or `datasets`."""
    packaged = Path(str(resources.files("ragctl"))) / "_data" / name
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    raise FileNotFoundError(f"ragctl data folder {name!r} is missing from this installation")
