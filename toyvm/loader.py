"""Loading a guest image: a flat binary at 0x100000, or an ELF64 x86-64 executable by its PT_LOAD segments."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .contract import (
    BOOT_INFO_ADDR,
    BOOT_INFO_MAGIC,
    CMDLINE_ADDR,
    CMDLINE_MAX,
    CONTRACT_VERSION,
    FLAT_LOAD_ADDR,
    PAGE_SIZE,
)
from .errors import ConfigError, LoadError
from .ram import GuestRAM

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
_MACHINES = {3: "i386", 40: "ARM", 183: "AArch64", 243: "RISC-V", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64"}
_BOOT_PAGE = (BOOT_INFO_ADDR, BOOT_INFO_ADDR + PAGE_SIZE)


@dataclass(frozen=True)
class LoadInfo:
    kind: str  # "flat" or "elf"
    entry: int
    segments: list[tuple[int, int]]  # (address, size in memory)


def load_image(ram: GuestRAM, image: bytes, name: str = "guest") -> LoadInfo:
    if not image:
        raise LoadError(f"{name}: the guest image is empty")
    if image[:4] == ELF_MAGIC:
        return _load_elf(ram, image, name)
    return _load_flat(ram, image, name)


def load_file(ram: GuestRAM, path: str | Path) -> LoadInfo:
    try:
        image = Path(path).read_bytes()
    except OSError as e:
        raise LoadError(f"cannot read guest {path}: {e.strerror}") from None
    return load_image(ram, image, str(path))


def _load_flat(ram: GuestRAM, image: bytes, name: str) -> LoadInfo:
    end = FLAT_LOAD_ADDR + len(image)
    if end > ram.size:
        raise LoadError(f"{name}: flat image of {len(image)} bytes does not fit in {ram.size >> 20} MiB of RAM "
                        f"at {FLAT_LOAD_ADDR:#x}")
    ram.write(FLAT_LOAD_ADDR, image)
    return LoadInfo("flat", FLAT_LOAD_ADDR, [(FLAT_LOAD_ADDR, len(image))])


def _load_elf(ram: GuestRAM, image: bytes, name: str) -> LoadInfo:
    if len(image) < 64:
        raise LoadError(f"{name}: truncated ELF header ({len(image)} bytes, need 64)")
    ei_class, ei_data = image[4], image[5]
    if ei_class != 2:
        raise LoadError(f"{name}: ELF class {ei_class} is not ELF64 (toyvm runs x86-64 guests)")
    if ei_data != 1:
        raise LoadError(f"{name}: ELF is not little-endian")
    (e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize, e_phnum,
     *_rest) = struct.unpack_from("<HHIQQQIHHHHHH", image, 16)
    if e_machine != EM_X86_64:
        arch = _MACHINES.get(e_machine, f"machine {e_machine}")
        raise LoadError(f"{name}: ELF for {arch}, toyvm runs x86-64 guests (EM_X86_64)")
    if e_type != ET_EXEC:
        raise LoadError(f"{name}: ELF type {e_type} is not an executable (ET_EXEC): link it -static -no-pie")
    if e_phentsize != 56 or e_phnum == 0:
        raise LoadError(f"{name}: ELF has no usable program headers (phentsize {e_phentsize}, phnum {e_phnum})")
    if e_phoff + e_phnum * 56 > len(image):
        raise LoadError(f"{name}: truncated ELF: program headers end at {e_phoff + e_phnum * 56}, "
                        f"file has {len(image)} bytes")
    segments: list[tuple[int, int, int, int]] = []
    for i in range(e_phnum):
        p_type, _pflags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", image, e_phoff + i * 56)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise LoadError(f"{name}: segment {i} has filesz {p_filesz:#x} > memsz {p_memsz:#x}")
        if p_offset + p_filesz > len(image):
            raise LoadError(f"{name}: truncated ELF: segment {i} needs bytes up to {p_offset + p_filesz}, "
                            f"file has {len(image)}")
        if not ram.contains(p_vaddr, p_memsz):
            raise LoadError(f"{name}: segment {i} at [{p_vaddr:#x}, {p_vaddr + p_memsz:#x}) lies outside "
                            f"{ram.size >> 20} MiB of RAM")
        if p_vaddr < _BOOT_PAGE[1] and _BOOT_PAGE[0] < p_vaddr + p_memsz:
            raise LoadError(f"{name}: segment {i} at {p_vaddr:#x} overlaps the boot-info page {BOOT_INFO_ADDR:#x}")
        segments.append((p_vaddr, p_memsz, p_offset, p_filesz))
    if not segments:
        raise LoadError(f"{name}: ELF has no PT_LOAD segment")
    if not any(v <= e_entry < v + m for v, m, _, _ in segments):
        raise LoadError(f"{name}: entry point {e_entry:#x} is not inside any loaded segment")
    for vaddr, _memsz, offset, filesz in segments:
        ram.write(vaddr, image[offset:offset + filesz])  # the rest of memsz (bss) is already zero
    return LoadInfo("elf", e_entry, [(v, m) for v, m, _, _ in segments])


def write_boot_info(ram: GuestRAM, cmdline: str) -> int:
    raw = cmdline.encode()
    if len(raw) > CMDLINE_MAX:
        raise ConfigError(f"command line is {len(raw)} bytes; the limit is {CMDLINE_MAX}")
    if b"\0" in raw:
        raise ConfigError("command line contains a NUL byte")
    info = struct.pack("<IIQQII", BOOT_INFO_MAGIC, CONTRACT_VERSION, ram.size, CMDLINE_ADDR, len(raw), 0)
    ram.write(BOOT_INFO_ADDR, info)
    ram.write(CMDLINE_ADDR, raw + b"\0")
    return BOOT_INFO_ADDR
