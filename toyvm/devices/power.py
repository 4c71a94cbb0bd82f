"""The power port: the guest writes an exit code and the VM stops."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..contract import POWER_PORT
from .base import state_from_dict, state_to_dict


@dataclass
class PowerState:
    exit_code: int | None = None  # set once the guest powered off


class Power:
    name = "power"
    base = POWER_PORT
    nports = 1
    width = 4

    def __init__(self, on_power_off: Callable[[int], None]) -> None:
        self.state = PowerState()
        self._on_power_off = on_power_off

    def read(self, port: int) -> int:
        return 0

    def write(self, port: int, value: int) -> None:
        self.state.exit_code = value & 0xFF
        self._on_power_off(self.state.exit_code)

    def save(self) -> dict[str, Any]:
        return state_to_dict(self.state)

    def restore(self, state: dict[str, Any]) -> None:
        self.state = state_from_dict(PowerState, self.name, state)
