"""`Record`: the base of the typed rows `results.json` holds (summaries, ratios)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """A frozen dataclass that is one object of `results.json`: `to_dict` gives its fields in
    order, nested records (also a dict's values) as dicts, leaving out the `OMIT_NONE` fields
    while they are None; `from_dict` reads it back (fields an older file lacks read as None)."""

    OMIT_NONE: ClassVar[tuple[str, ...]] = ()
    NESTED: ClassVar[Mapping[str, type[Record]]] = {}

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self.OMIT_NONE:
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            value = data.get(f.name)
            nested = cls.NESTED.get(f.name)
            values[f.name] = nested.from_dict(value) if nested and value is not None else value
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
