"""Random numbers from the host: deliberately nondeterministic (replicas read different values)."""
from __future__ import annotations

import os
from typing import Any

from ..contract import RNG_PORT


class Rng:
    name = "rng"
    base = RNG_PORT
    nports = 1
    width = 4

    def read(self, port: int) -> int:
        return int.from_bytes(os.urandom(4), "little")

    def write(self, port: int, value: int) -> None:
        pass  # writes are ignored: there is nothing to configure

    def save(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        from ..errors import StateError
        if state != {}:
            raise StateError(f"device rng: expected an empty state, got {state!r}")
