"""Shared save/restore of a device's state dataclass, with the checks a restored state deserves."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..errors import StateError

S = TypeVar("S")


def state_to_dict(state: Any) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def state_from_dict(cls: type[S], name: str, data: Any) -> S:
    """Build cls from a saved dict: every field present, none unknown, each of the declared type."""
    if not isinstance(data, dict):
        raise StateError(f"device {name}: state must be a map, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if data.keys() != fields.keys():
        raise StateError(f"device {name}: state fields {sorted(data)} do not match {sorted(fields)}")
    for key, value in data.items():
        expected = fields[key].type
        kinds: dict[str, type | tuple[type, ...]] = {"int": int, "bytes": bytes, "bool": bool, "list": list,
                                                     "int | None": (int, type(None))}
        kind = kinds.get(str(expected).replace("builtins.", ""))
        if kind is not None and not isinstance(value, kind):
            raise StateError(f"device {name}: field {key} should be {expected}, got {type(value).__name__}")
    return cls(**data)
