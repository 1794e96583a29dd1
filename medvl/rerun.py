"""Running again into an output that already holds a run: never silently resume a run of
another config, never silently delete one.

A step's resolved config is saved beside its output (``config.yaml``). When a new run's
config differs from it in a field that changes the result (fields marked
``metadata={"result": False}``, like ``log_every``, do not), the run stops with one line
naming the differing fields and the two ways on: ``--resume`` (continue the saved run with
its saved config) or ``--overwrite`` (delete it, start over).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from medvl import storage

CONFIG_FILE = "config.yaml"


def plain(obj: Any, results_only: bool = False) -> Any:
    """A (nested) config as plain data; ``results_only``: without the fields that do not
    change what a step produces."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name), results_only) for f in dataclasses.fields(obj)
                if not results_only or f.metadata.get("result", True)}
    if isinstance(obj, dict):
        return {k: plain(v, results_only) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v, results_only) for v in obj]
    return obj


def differences(saved: Any, new: Any, prefix: str = "") -> list[str]:
    """``["lr: 0.001 -> 0.01", ...]``: where two plain-data configs differ, by dotted key."""
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(saved) | set(new), key=str):
            out += differences(saved.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if saved == new else [f"{prefix.rstrip('.')}: {saved!r} -> {new!r}"]


def conflict(where: str, diffs: list[str]) -> ValueError:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    return ValueError(f"{where} holds a run with a different config ({shown}): pass --resume to continue "
                      "it as saved, or --overwrite to delete it and start over")


def save_config(output: str, cfg: Any) -> None:
    """The resolved config, beside the step's output, readable as a recipe section."""
    storage.write_text(storage.join(output, CONFIG_FILE),
                       yaml.safe_dump(plain(cfg), allow_unicode=True, sort_keys=False, default_flow_style=False))


def saved_config(output: str) -> dict | None:
    uri = storage.join(output, CONFIG_FILE)
    return yaml.safe_load(storage.read_text(uri)) if storage.exists(uri) else None
