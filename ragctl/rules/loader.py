"""Load a rules file into a RuleSet; any problem becomes one RulesError line,
`FILE:LINE:COL: field.path: what is wrong`, pointing into the YAML."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ragctl.errors import RulesError
from ragctl.resources import data_folder
from ragctl.rules.schema import UNION_TAGS, RuleProblem, RuleSet, format_loc

Loc = tuple[str | int, ...]


def default_rules_path() -> Path:
    """The packaged `rules/default.yaml`."""
    return data_folder("rules") / "default.yaml"


def load_rules(path: Path | str | None = None) -> RuleSet:
    """Read and validate a rules file (None: the packaged default). Raises RulesError naming the
    file, line, column and field of the first problem."""
    path = default_rules_path() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(f"{path}: no such rules file") from None
    except IsADirectoryError:
        raise RulesError(f"{path}: is a directory, not a rules file") from None
    except UnicodeDecodeError as e:
        raise RulesError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RulesError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_rules(text, str(path))


def parse_rules(text: str, name: str = "<rules>") -> RuleSet:
    """Validate rules given as YAML text; `name` stands for the file in messages."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise RulesError(f"{name}: empty file; a rules file needs version and default_space")
        _check_duplicate_keys(root, name)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or "invalid YAML"
        if e.context:
            what += f" ({e.context})"
        raise RulesError(f"{_at(name, mark)}: YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise RulesError(f"{name}: YAML error: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the scalar {root.value!r}"
        raise RulesError(
            f"{_at(name, root.start_mark)}: the top level must be a mapping, not {kind}"
        )
    try:
        return RuleSet.model_validate(data)
    except ValidationError as e:
        first = _first(e.errors(include_url=False))
        loc = tuple(first["loc"])
        if first["type"] == "invalid_key":  # its loc names the bad key itself, not a field
            loc = loc[:-1]
        raise RulesError(_locate(name, root, loc, _message(first, loc))) from None
    except RuleProblem as e:
        raise RulesError(_locate(name, root, e.loc, e.msg)) from None


def _first(errors: list[Any]) -> Any:
    """The first error, except that a misspelt key (`methds:`) is reported as the unknown key it
    is rather than as the missing field pydantic lists before it."""
    first = errors[0]
    if first["type"] == "missing":
        parent = _clean(tuple(first["loc"]))[:-1]
        for other in errors:
            if other["type"] == "extra_forbidden" and _clean(tuple(other["loc"]))[:-1] == parent:
                return other
    return first


def _message(error: Any, loc: Loc) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(_clean(loc)[:-1])
        key = str(loc[-1])
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(allowed)}"
        return f"extra field not permitted ({hint})"
    if kind == "invalid_key":
        return (
            f"a key reads as {error['input']!r}, not a string: quote it (YAML reads yes/on as true)"
        )
    if kind == "value_error":
        return str(error["ctx"]["error"])
    msg = error["msg"]
    msg = msg[:1].lower() + msg[1:]
    if kind == "missing":
        return "field required"
    if kind.startswith(("literal_", "enum")) or kind.endswith(("_type", "_parsing", "_form")):
        return f"{msg}, got {error['input']!r}"
    return msg


def _clean(loc: Loc) -> Loc:
    return tuple(p for p in loc if p not in UNION_TAGS)


def _fields_at(loc: Loc) -> list[str]:
    """Field names of the model found at `loc` (for "did you mean")."""
    tp: Any = RuleSet
    for part in loc:
        if isinstance(part, int):
            continue
        model = _model_in(tp)
        if model is None or part not in model.model_fields:
            return []
        tp = model.model_fields[part].annotation
    model = _model_in(tp)
    return list(model.model_fields) if model is not None else []


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (through Optional, list, Annotated, unions)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(tp):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _locate(name: str, root: yaml.Node, loc: Loc, msg: str) -> str:
    """Walk the composed YAML along `loc`: a mapping key marks where its field is written, a list
    item where it starts; a part the file lacks (a missing field) keeps its parent's mark."""
    node: yaml.Node | None = root
    mark = root.start_mark
    for part in _clean(loc):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            pair = next(((k, v) for k, v in node.value if str(k.value) == part), None)
            node = pair[1] if pair else None
            if pair:
                mark = pair[0].start_mark
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            mark = node.start_mark
        else:
            node = None
    return f"{_at(name, mark)}: {format_loc(loc) or '(top level)'}: {msg}"


def _check_duplicate_keys(node: yaml.Node, name: str, seen_nodes: set[int] | None = None) -> None:
    """YAML keeps the last of two equal keys without a word; in a rules file that hides a typo."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: checked already (and may be recursive)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise RulesError(f"{_at(name, key.start_mark)}: duplicate key {key.value!r}")
                seen.add(key.value)
            _check_duplicate_keys(value, name, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, name, seen_nodes)


def _at(name: str, mark: yaml.Mark | None) -> str:
    return f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
