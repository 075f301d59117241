"""Frozen dataclasses as strict JSON and as flat table rows, and back from JSON: one writer, one reader and one
flattening for every typed result, read off the fields' types, so that a record's fields are its format."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from functools import cache

from pydantic import BaseModel

INLINE = {"inline": True}  # field metadata: a nested record's columns keep their own names, without `<field>_`


def column(heading: str, *views: str) -> dict:
    """Field metadata: the column's short heading in tables, and the named views (narrow tables) that show it."""
    return {"heading": heading, "views": views}


# ---------------------------------------------------------------------------------------------------------------
# JSON


def json_safe(value):
    """A record (or list, dict, number) as plain JSON values: NaN and infinities become null, tuples lists, settings
    their JSON form, so the files stay strict JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(record, version: int) -> bytes:
    """The record as strict JSON, its format version first."""
    return json.dumps({"format_version": version, **json_safe(record)}, indent=2, allow_nan=False).encode()


def loads(kind: type, text: str, version: int, source: str):
    """The record of type `kind` that `dumps` wrote; refuses another format version, naming `source`."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.pop("format_version", None) != version:
        raise ValueError(f"{source}: not a {kind.__name__} of format version {version}: materialize it again")
    try:
        return from_json(kind, data)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def from_json(kind, data):
    """`data` (parsed JSON) as a value of type `kind`: records field by field, null as NaN where a float is
    expected and as None where the type allows None. Raises ValueError naming the field that does not fit."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return from_json(inner, data)
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise ValueError(f"{kind.__name__}: expected an object, got {data!r}")
        hints = _hints(kind)
        if unknown := set(data) - set(hints):
            raise ValueError(f"{kind.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
        values = {}
        for name, value in data.items():
            try:
                values[name] = from_json(hints[name], value)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{kind.__name__}.{name}: {exc}") from None
        return kind(**values)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return kind.model_validate(data)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(args[0], v) for v in data)
        if len(args) != len(data):
            raise ValueError(f"expected {len(args)} values, got {data!r}")
        return tuple(from_json(t, v) for t, v in zip(args, data))
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    if kind is float:
        if data is None:
            return math.nan
        if not isinstance(data, (int, float)) or isinstance(data, bool):
            raise ValueError(f"expected a number, got {data!r}")
        return float(data)
    if kind in (int, str, bool):
        if not isinstance(data, kind) or (kind is int and isinstance(data, bool)):
            raise ValueError(f"expected {kind.__name__}, got {data!r}")
        return data
    return data


@cache
def _hints(kind: type) -> dict[str, object]:
    return typing.get_type_hints(kind)


# ---------------------------------------------------------------------------------------------------------------
# Table rows


def _record_type(kind) -> type | None:
    """The record type of a field (a dataclass, possibly None-able), or None for anything else."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = inner[0] if len(inner) == 1 else None
    return kind if dataclasses.is_dataclass(kind) else None


def _is_cell(kind) -> bool:
    """Numbers, strings, flags (None-able) and tuples of numbers are table cells; lists of records, mappings and
    settings are not, and stay out of tables."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return all(_is_cell(a) for a in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return all(a in (int, float, Ellipsis) for a in typing.get_args(kind))
    return kind in (int, float, str, bool, type(None))


def _cells(kind: type, record, prefix: str):
    """(column, heading, views, value) of every cell of a record of type `kind` (None: every value None)."""
    for f in dataclasses.fields(kind):
        hint = _hints(kind)[f.name]
        value = None if record is None else getattr(record, f.name)
        if (nested := _record_type(hint)) is not None:
            yield from _cells(nested, value, prefix if f.metadata.get("inline") else f"{prefix}{f.name}_")
        elif _is_cell(hint):
            yield (f"{prefix}{f.name}", f.metadata.get("heading", f"{prefix}{f.name}"), f.metadata.get("views", ()),
                   list(value) if isinstance(value, tuple) else value)


def columns(kind: type, view: str | None = None) -> dict[str, str]:
    """Column -> short heading of a record type's table rows, in field order (those of `view` only, if given); a
    column's heading is its name where its field gives none."""
    return {name: heading for name, heading, views, _ in _cells(kind, None, "") if view is None or view in views}


def flat(record, kind: type | None = None, prefix: str = "") -> dict[str, object]:
    """The record as one table row: nested records' fields under `<field>_<name>` (or their own names where the field
    is INLINE), tuples of numbers as lists; `kind` names the type where `record` may be None (then all None)."""
    return {name: value for name, _, _, value in _cells(kind or type(record), record, prefix)}
