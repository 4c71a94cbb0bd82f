"""Build and load the optional native hooks (toyvm/native/hooks.c) with the system C compiler.

The shared object is cached per source hash under $TOYVM_CACHE (default ~/.cache/toyvm). With no compiler,
or TOYVM_HOOKS=python, toyvm uses its pure-Python hooks: same behaviour, slower guest.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "native" / "hooks.c"


class NativeState(ctypes.Structure):
    _fields_ = [("dirty", ctypes.c_void_p), ("npages", ctypes.c_uint64), ("stop", ctypes.c_void_p),
                ("stop_request", ctypes.c_int32), ("stopped", ctypes.c_int32),
                ("deadline_ns", ctypes.c_uint64), ("blocks", ctypes.c_uint64)]


_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cache_dir() -> Path:
    base = os.environ.get("TOYVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "toyvm")
    return Path(base)


def build() -> Path:
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    out = _cache_dir() / f"hooks-{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler found (cc or gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
    except subprocess.CalledProcessError as e:
        raise OSError(f"building native hooks failed: {e.stderr.strip()}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The native hook library, or None (and `error()` says why) when it cannot be had."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            _lib = ctypes.CDLL(str(build()))
        except OSError as e:
            _error = str(e)
    return _lib


def error() -> str | None:
    return _error
