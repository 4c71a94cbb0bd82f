"""The little the gateway must remember across its own restart: a file written atomically and durably.

The witness decides what (colo.witness.Persist: the copies it voided); this module only writes it so that a
crash at any instant leaves either the old file or the new one (`replace_file`, which `colo keygen --force` uses
too), and reads it back with errors that name the file.
"""
from __future__ import annotations

import json
import os
import tempfile
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
    replace_file(path, (json.dumps(state, sort_keys=True) + "\n").encode())


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace the file at `path` with `data`, whole or not at all, and durably: a temporary file beside it
    (exactly `mode`, whatever the umask), synced, renamed over the old one, then the directory synced. On any
    error the temporary file is removed and the old file stays as it was."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
