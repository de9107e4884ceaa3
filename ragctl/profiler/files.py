"""Versioned JSON files of the profiler's state (`calibration.json`, `learned.json`): written
atomically, read back with one-line `ProfilerStateError`s naming the file and what is wrong."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ragctl.errors import ProfilerStateError

T = TypeVar("T")


def write_json(path: str | Path, fmt: str, version: int, payload: Mapping[str, Any]) -> Path:
    """Write `{"format": fmt, "version": version, **payload}` to `path` atomically (a temporary
    file in the same folder, then a rename): a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": fmt, "version": version, **payload}, indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, fmt: str, version: int) -> dict[str, Any]:
    """The object in `path`, checked to be of `fmt` at `version`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfilerStateError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfilerStateError(f"{path}: cannot be read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfilerStateError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "a truncated or corrupt file: delete it or fit it again"
        ) from None
    if not isinstance(data, dict):
        raise ProfilerStateError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != fmt:
        raise ProfilerStateError(f"{path}: format is {data.get('format')!r}, expected {fmt!r}")
    if data.get("version") != version:
        raise ProfilerStateError(
            f"{path}: {fmt} version {data.get('version')!r}, this ragctl reads version {version}"
        )
    return data


def field(
    path: Path, data: Mapping[str, Any], key: str, kind: Callable[[Any], T], where: str = ""
) -> T:
    """`kind(data[key])`, or a ProfilerStateError naming the missing or malformed key."""
    name = f"{where}.{key}" if where else key
    if key not in data:
        raise ProfilerStateError(f"{path}: missing key {name!r}")
    try:
        return kind(data[key])
    except (TypeError, ValueError, KeyError) as e:
        raise ProfilerStateError(f"{path}: bad value for {name!r} ({e})") from None


def floats(value: Any) -> tuple[float, ...]:
    """A list of finite numbers, as a tuple of floats."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise ValueError("not every value is finite")
    return out


def optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
