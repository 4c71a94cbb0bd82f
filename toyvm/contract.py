"""The machine contract as Python constants (docs/machine.md is the prose version)."""
from __future__ import annotations

CONTRACT_VERSION = 1
PAGE_SIZE = 4096
PAGE_SHIFT = 12

MIN_RAM = 2 << 20
MAX_RAM = 4 << 30
DEFAULT_RAM = 64 << 20

BOOT_INFO_ADDR = 0x8000
BOOT_INFO_MAGIC = 0x42564D54
CMDLINE_ADDR = 0x8040
CMDLINE_MAX = 4000
FLAT_LOAD_ADDR = 0x100000

# Port map: each device's first port and number of ports.
COM1_BASE, COM1_PORTS = 0x3F8, 8
POWER_PORT = 0x500
CLOCK_BASE, CLOCK_PORTS = 0x510, 0x20
RNG_PORT = 0x530
NET_BASE, NET_PORTS = 0x540, 0x10

# Virtual time advances this much at every guest port access (docs/machine.md, "Clock").
IO_COST_NS = 1000
