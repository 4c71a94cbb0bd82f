"""Typed errors. Everything the machine raises on bad input or a guest fault derives from ToyVMError."""
from __future__ import annotations


class ToyVMError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ToyVMError):
    """A bad option: RAM size, command line, port range."""


class LoadError(ToyVMError):
    """A guest binary that cannot be loaded (empty, truncated, wrong architecture, outside RAM)."""


class StateError(ToyVMError):
    """A saved state that cannot be restored (bad magic, version, checksum, truncation, bad content)."""


class GuestFault(ToyVMError):
    """The guest did something the machine cannot execute; the VM stops, the host carries on."""

    def __init__(self, message: str, rip: int | None = None) -> None:
        self.rip = rip
        super().__init__(message if rip is None else f"{message} (RIP={rip:#x})")


class HookError(ToyVMError):
    """A host-side bug inside a Unicorn hook: re-raised after emu_start so it never vanishes."""
