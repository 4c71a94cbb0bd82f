"""toyvm: an x86-64 machine on the Unicorn emulator, with exact stops, dirty-page tracking and a complete,
versioned state. See docs/machine.md for the contract guests are written against."""
from .errors import ConfigError, GuestFault, HookError, LoadError, StateError, ToyVMError
from .machine import Machine, SliceResult, StopReason

__all__ = ["ConfigError", "GuestFault", "HookError", "LoadError", "Machine", "SliceResult", "StateError",
           "StopReason", "ToyVMError"]
