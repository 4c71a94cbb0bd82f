"""The package version. pyproject.toml reads VERSION at build time, so this constant is the one source."""
from __future__ import annotations

from importlib import metadata

VERSION = "0.1.0"
DISTRIBUTION = "toyvm-colo"  # the name pip knows; the toyvm and colo packages both belong to it


def version() -> str:
    """The installed distribution's version; the constant when running from a checkout that is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return VERSION


def version_line(prog: str) -> str:
    """What `PROG --version` prints: ours, and the emulator's and Python's, which bug reports need."""
    import platform

    import unicorn

    return f"{prog} {version()} (unicorn {unicorn.__version__}, Python {platform.python_version()})"
