"""`colo keygen`: write a fresh shared key to a file only its owner can read."""
from __future__ import annotations

import os
from pathlib import Path

from colo.auth import generate_key
from colo.durable import replace_file
from colo.errors import ColoError

KEY_MODE = 0o600


def write_new_key(path: str | Path, *, force: bool = False) -> Path:
    """Write a fresh key to `path` with mode 0600 and return its absolute path.

    Without `force` an existing file (or symlink) is never touched: O_EXCL makes the check and the creation
    one step. With `force` the key goes to a temporary file beside it that is renamed over the old one, so the
    old key is replaced whole or not at all, and the mode is 0600 whatever the old file's was.
    """
    target = Path(path).absolute()
    key = generate_key() + b"\n"
    if not force:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, KEY_MODE)
        except FileExistsError:
            raise ColoError(f"{target} already exists: not overwriting it (use --force to replace it)") from None
        _write(fd, key)
        return target
    if target.is_dir():
        raise ColoError(f"{target} is a directory")
    replace_file(target, key, KEY_MODE)
    return target


def _write(fd: int, key: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), KEY_MODE)  # exactly 0600, whatever the umask
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
