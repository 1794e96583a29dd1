"""Typed configs: dataclasses loaded from YAML, then ``key=value`` overrides on top.

Each field's ``metadata["help"]`` is its documentation; the CLI turns the same fields
into ``--flags`` so a YAML recipe, a flag and a Python call can never disagree.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

from medvl import storage

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check (and gently convert) a value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{name}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(item, v, name) for v in value]
    if origin is dict or tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # YAML reads `run: 2024` or `output=2024` as a number
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ValueError(f"{name}: expected int, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a (nested) dataclass from a mapping; unknown keys are an error, not ignored."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(prefix + k for k in unknown)}")
    kwargs = {k: _coerce(types_[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML scalars) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return data


def expand(value: Any, run: str) -> Any:
    """Replace ``${run}`` in every string of a nested YAML value."""
    if isinstance(value, str):
        return value.replace("${run}", run)
    if isinstance(value, dict):
        return {k: expand(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, run) for v in value]
    return value


def read_recipe(path: str, run: str | None = None) -> dict[str, Any]:
    """A YAML recipe with ``${run}`` expanded to its top-level ``run`` URI (or ``run`` given here),
    so one line moves a whole run, e.g. from ``runs/demo`` to ``s3://bucket/run``."""
    if not storage.exists(path):
        raise ValueError(f"{path}: no such recipe file (the recipes are in workflows/configs/)")
    try:
        doc = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    run = storage.absolute(str(run or doc.get("run", "")))  # jobs run in another working dir
    return expand({**doc, "run": run}, run)


def load(cls: type[T], path: str | None = None, overrides: list[str] | None = None,
         section: str | None = None, values: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optionally one top-level ``section`` of it), then
    ``key=value`` overrides, then already-typed ``values`` (the CLI's flags)."""
    data: dict[str, Any] = {}
    if path:
        doc = read_recipe(path)
        data = doc.get(section, {}) if section else doc
    return from_dict(cls, {**apply_overrides(dict(data), overrides or []), **(values or {})})
