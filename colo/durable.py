"""The little the gateway must remember across its own restart: a file written atomically and durably.

The witness decides what (colo.witness.Persist: the copies it voided); this module only writes it so that a
crash at any instant leaves either the old file or the new one (write a temporary file, fsync it, rename it over
the old, fsync the directory), and reads it back with errors that name the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from colo.errors import ColoError


def load(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What was saved at `path`, or None when there is no such file (a first start)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ColoError(f"cannot read the gateway state {p}: {e.strerror or e}") from e
    try:
        state = json.loads(text)
    except ValueError as e:
        raise ColoError(f"the gateway state {p} is not valid JSON ({e}): restore it, or remove it if no "
                        "gateway of this cluster ever voided a copy") from e
    if not isinstance(state, dict):
        raise ColoError(f"the gateway state {p} is not a JSON object")
    return state


def save(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Replace the file at `path` with `state`, durably (OSError if the disk refuses)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    data = (json.dumps(state, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dirfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
