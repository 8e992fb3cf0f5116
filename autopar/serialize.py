"""JSON for frozen dataclass trees, validated field by field (no pickle, nothing executed).

Takes a dataclass instance and gives plain JSON data; takes data and a dataclass type and gives
the instance back, or a `ValueError` naming the path of the first bad field and what it required:

    plan.stages[0].nodes['linear'].inputs[1]: found 'S(x)', required one of S(<dim>), R, P, P(avg)

Supported field types: bool, int, float, str, None unions, tuples (`tuple[T, ...]` and fixed),
`dict[str, T]`, nested dataclasses, torch placements (short form, `autopar.vocab`), `Cluster`.
Floats that JSON cannot write are the strings "inf", "-inf" and "nan". Unknown fields are refused,
not skipped (a file from a newer autopar fails loudly instead of losing what it said), and so are
missing ones without a default. A dataclass's own `__post_init__` checks run as the file is read;
their "ClassName.field: …" messages come out at the field's path in the file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from torch.distributed.tensor.placement_types import Placement

from autopar.cluster import Cluster
from autopar.vocab import parse, short


def to_data(obj: Any) -> Any:
    if isinstance(obj, Cluster):
        return obj.to_dict()
    if isinstance(obj, Placement):
        return short(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_data(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_data(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")  # JSON has no NaN or Infinity
    return obj


def from_data(kind: Any, data: Any, path: str) -> Any:
    """An instance of type `kind` from JSON data; `path` names it in errors."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return from_data(option, data, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: found {data!r}, required one of "
                         f"{[getattr(o, '__name__', str(o)) for o in options]}")
    if kind is Placement or (isinstance(kind, type) and issubclass(kind, Placement)):
        try:
            return parse(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if kind is Cluster:
        try:
            return Cluster.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, data, path)
    if origin is tuple:
        return _tuple(kind, data, path)
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{path}: found {type(data).__name__}, required a JSON object")
        _, value_kind = typing.get_args(kind)
        return {k: from_data(value_kind, v, f"{path}[{k!r}]") for k, v in data.items()}
    return _scalar(kind, data, path)


def _dataclass(kind: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: found {type(data).__name__}, required a JSON object")
    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{path}: found unknown field(s) {unknown}, required only {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{path}.{name}: missing, required ({_describe(hints[name])})")
            continue
        values[name] = from_data(hints[name], data[name], f"{path}.{name}")
    try:
        return kind(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(_at(path, kind, str(e))) from None


def _at(path: str, kind: type, message: str) -> str:
    """A dataclass's own check, placed in the file: "Stage.params['w'].level: …" at plan.stages[0]
    reads "plan.stages[0].params['w'].level: …"; other messages get the path in front."""
    own = f"{kind.__name__}."
    return path + message[len(own) - 1:] if message.startswith(own) else f"{path}: {message}"


def _tuple(kind: Any, data: Any, path: str) -> tuple:
    if not isinstance(data, list):
        raise ValueError(f"{path}: found {type(data).__name__}, required a JSON array")
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(from_data(args[0], x, f"{path}[{i}]") for i, x in enumerate(data))
    if len(data) != len(args):
        raise ValueError(f"{path}: found {len(data)} items, required {len(args)}")
    return tuple(from_data(a, x, f"{path}[{i}]") for i, (a, x) in enumerate(zip(args, data)))


def _scalar(kind: Any, data: Any, path: str) -> Any:
    if kind is float:
        if data in ("inf", "-inf", "nan"):
            return float(data)
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
    elif kind is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
    elif kind is bool or kind is str:
        if isinstance(data, kind):
            return data
    else:
        raise TypeError(f"{path}: unsupported field type {kind!r}")
    raise ValueError(f"{path}: found {data!r} ({type(data).__name__}), required {_describe(kind)}")


def _describe(kind: Any) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind)))
