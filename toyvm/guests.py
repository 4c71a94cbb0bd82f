"""The bundled guests: a guest is given by path or by the name of one that ships with toyvm (`hello`, `kvstore`).

The committed binaries in the repository's guests/ are the package's data: the wheel installs that folder as
toyvm/guest_images/ (pyproject.toml maps it), so there is one copy in git and `make -C guests check` covers
what ships. Running from a checkout (no wheel), the repository's guests/ is used directly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import LoadError

_HERE = Path(__file__).resolve().parent
SUFFIX = ".bin"  # a bare name means the flat image; NAME.elf names the same program as ELF64
SUFFIXES = (".bin", ".elf")


def bundled_dir() -> Path:
    """Where the bundled images are: inside the installed package, else the checkout's guests/."""
    installed = _HERE / "guest_images"
    return installed if installed.is_dir() else _HERE.parent / "guests"


def bundled_names() -> list[str]:
    return sorted(p.stem for p in bundled_dir().glob(f"*{SUFFIX}"))


def _listing() -> str:
    return f"bundled guests: {', '.join(bundled_names()) or 'none'}"


def _find_bundled(name: str) -> Path | None:
    if not name or "/" in name or name.startswith("."):
        return None
    folder = bundled_dir()
    for candidate in (folder / f"{name}{SUFFIX}", folder / name):
        # In a checkout the folder also holds sources and a Makefile: only images count.
        if candidate.suffix in SUFFIXES and candidate.is_file():
            return candidate
    return None


def bundled(name: str) -> Path:
    """The image of the bundled guest `name` ("kvstore", or "kvstore.elf"); LoadError listing them if none."""
    path = _find_bundled(name)
    if path is None:
        raise LoadError(f"no bundled guest {name!r} ({_listing()})")
    return path


def resolve(name_or_path: str | Path) -> Path:
    """A guest image path from what a user typed.

    An existing file wins (the user named it); otherwise a bundled guest's name; otherwise an existing path
    that is not a file (a directory) is returned for the loader to refuse with its own message; anything else
    is a LoadError that lists the bundled names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    found = _find_bundled(text)
    if found is not None:
        return found
    if path.exists():
        return path
    raise LoadError(f"cannot read guest {text}: no such file, and no bundled guest has that name ({_listing()})")


def argument(text: str) -> str:
    """An argparse `type=` for a GUEST argument: the resolved path, or a usage error."""
    try:
        return str(resolve(text))
    except LoadError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
