"""Bad input of every kind gives a clear error naming the problem; the host process never crashes or hangs."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conftest import asm, guest, toyvm_cli
from toyvm import GuestFault, HookError, LoadError, Machine, StateError
from toyvm import state as state_file
from toyvm.devices.net import DATA

RAM = 4 << 20


def elf_header(machine: int = 62, klass: int = 2, etype: int = 2, filesz: int = 0x1000) -> bytes:
    """An ELF header and one PT_LOAD program header, and nothing else: the segment's bytes are missing."""
    ident = b"\x7fELF" + bytes([klass, 1, 1]) + bytes(9)
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, 0x100000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    return hdr + struct.pack("<IIQQQQQQ", 1, 5, 0, 0x100000, 0x100000, filesz, filesz, 0x1000)


def cli_error(tmp_path: Path, image: bytes, *extra: str) -> str:
    path = tmp_path / "guest.bin"
    path.write_bytes(image)
    r = toyvm_cli("run", str(path), "--max-seconds", "10", *extra, timeout=30)
    assert r.returncode == 125, (r.returncode, r.stderr)
    return r.stderr.decode()


@pytest.mark.parametrize("image, message", [
    (b"", "empty"),
    (b"\x7fELF\x02\x01", "truncated ELF header"),
    (elf_header(machine=183), "ELF for AArch64"),
    (elf_header(machine=40), "ELF for ARM"),
    (elf_header(klass=1), "not ELF64"),
    (elf_header(etype=3), "not an executable"),
    (elf_header()[:100], "truncated ELF: program headers"),
    (elf_header(), "truncated ELF: segment 0"),
], ids=["empty", "short-elf", "aarch64", "arm", "elf32", "dyn", "cut-phdr", "cut-segment"])
def test_bad_binaries_are_refused_by_name(tmp_path: Path, image: bytes, message: str) -> None:
    assert message in cli_error(tmp_path, image)


def test_garbage_binary_faults_with_a_clear_message(tmp_path: Path) -> None:
    err = cli_error(tmp_path, b"\xff\xff" * 64)
    assert "VM fault: guest executed an invalid instruction" in err and "RIP=0x100000" in err


def test_missing_file(tmp_path: Path) -> None:
    r = toyvm_cli("run", str(tmp_path / "nope.bin"))
    assert r.returncode == 125 and b"cannot read guest" in r.stderr


@pytest.mark.parametrize("src, message", [
    ("mov rax, [0x40000000]", "read of 8 byte(s) at unmapped address 0x40000000"),
    ("mov qword ptr [0x7fff0000], 1", "write of 8 byte(s) at unmapped address 0x7fff0000"),
    ("mov rax, 0x50000000\njmp rax", "instruction fetch"),
    ("in al, 0x80", "IN of 1 byte(s) at port 0x80: no device claims this port"),
    ("mov dx, 0x3f8\nout dx, eax", "its registers are 1 byte(s) wide"),
    ("int 0x80", "interrupt 128"),
    ("xor ecx, ecx\ndiv ecx", "CPU exception"),
], ids=["read", "write", "fetch", "port", "width", "int", "div0"])
def test_guest_faults_name_the_problem(tmp_path: Path, src: str, message: str) -> None:
    err = cli_error(tmp_path, asm(src), "--ram", "4M")
    assert message in err and "RIP=0x" in err


def test_net_dma_outside_ram_is_a_fault_and_loses_nothing(hooks: str) -> None:
    vm = Machine(RAM, hooks=hooks)
    vm.boot(asm("mov eax, 0x1000\nmov dx, 0x544\nout dx, eax\nhlt"))
    vm.ram.write(0x1008, struct.pack("<QI", RAM - 16, 4096))  # the buffer runs off the end of RAM
    vm.net.deliver(DATA, 3, b"x" * 100)
    with pytest.raises(GuestFault, match=r"net RECV buffer \[0x3ffff0, \+0x64\) lies outside guest RAM"):
        vm.run_slice()
    assert vm.net.state.rx == [[1, DATA, 3, b"x" * 100]]
    with pytest.raises(GuestFault):  # a faulted VM stays faulted; it does not run on
        vm.run_slice()


def test_exceptions_inside_hooks_never_vanish(monkeypatch: pytest.MonkeyPatch, hooks: str) -> None:
    vm = Machine(RAM, hooks=hooks)
    vm.boot(asm("mov dx, 0x530\nin eax, dx\nhlt"))

    def broken(port: int) -> int:
        raise RuntimeError("device bug")

    monkeypatch.setattr(vm.rng, "read", broken)
    with pytest.raises(HookError, match="device bug"):
        vm.run_slice()


def test_bad_ram_sizes() -> None:
    for text, message in (("1M", "outside the supported"), ("lots", "bad size"), ("4097", "not a multiple")):
        r = toyvm_cli("run", "guests/hello.bin", "--ram", text)
        assert r.returncode == 125 and message.encode() in r.stderr, r.stderr


# -- state files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("state") / "good.state"
    vm = Machine(RAM)
    vm.boot(guest("hello"))
    vm.run_slice(max_instructions=500)
    state_file.write_file(path, vm.save_state())
    return path


def resume_error(path: Path) -> str:
    r = toyvm_cli("resume", str(path), timeout=30)
    assert r.returncode == 125, (r.returncode, r.stderr)
    return r.stderr.decode()


def test_corrupt_state_file(good_state: Path, tmp_path: Path) -> None:
    data = bytearray(good_state.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "corrupt.state"
    bad.write_bytes(bytes(data))
    assert "checksum mismatch" in resume_error(bad)


def test_wrong_version_state_file(good_state: Path, tmp_path: Path) -> None:
    data = bytearray(good_state.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    bad = tmp_path / "v99.state"
    bad.write_bytes(bytes(data))
    assert "version 99 is not supported" in resume_error(bad)


def test_truncated_and_foreign_state_files(good_state: Path, tmp_path: Path) -> None:
    data = good_state.read_bytes()
    (tmp_path / "cut.state").write_bytes(data[: len(data) // 2])
    assert "truncated state file" in resume_error(tmp_path / "cut.state")
    (tmp_path / "head.state").write_bytes(data[:10])
    assert "truncated state file" in resume_error(tmp_path / "head.state")
    (tmp_path / "elf.state").write_bytes(elf_header())
    assert "bad magic" in resume_error(tmp_path / "elf.state")


def rewrite(good: Path, out: Path, change: object) -> Path:
    payload = state_file.read_file(good)
    change(payload)  # type: ignore[operator]
    state_file.write_file(out, payload)
    return out


def test_state_with_content_errors(good_state: Path, tmp_path: Path) -> None:
    def page_outside(p: dict[str, Any]) -> None:
        p["ram"]["pages"] = struct.pack("<I", 10**6) + p["ram"]["pages"][4:]

    def inner_version(p: dict[str, Any]) -> None:
        p["version"] = 2

    def missing_register(p: dict[str, Any]) -> None:
        del p["cpu"]["regs"]["rip"]

    def bad_device(p: dict[str, Any]) -> None:
        p["devices"]["serial"]["ier"] = "high"

    for fn, message in ((page_outside, "page index 1000000 is outside guest RAM"),
                        (inner_version, "state format version 2 is not supported"),
                        (missing_register, "missing registers ['rip']"),
                        (bad_device, "field ier should be int")):
        assert message in resume_error(rewrite(good_state, tmp_path / f"{fn.__name__}.state", fn))


def test_rejected_state_leaves_the_vm_untouched(good_state: Path) -> None:
    vm = Machine(RAM)
    vm.boot(guest("hello"))
    before = vm.save_state()
    payload = state_file.read_file(good_state)
    payload["devices"]["net"]["rx"] = [["not", "an", "event", 1]]
    with pytest.raises(StateError):
        vm.restore_state(payload)
    assert vm.save_state() == before


def test_garbage_payload_with_valid_header(tmp_path: Path) -> None:
    body = b"\xc1" * 64  # 0xc1 is never valid msgpack
    (tmp_path / "g.state").write_bytes(struct.pack("<8sIIQ", b"TOYVMST\0", 1, zlib.crc32(body), len(body)) + body)
    assert "not valid msgpack" in resume_error(tmp_path / "g.state")
    body = msgpack.packb([1, 2, 3])
    (tmp_path / "l.state").write_bytes(struct.pack("<8sIIQ", b"TOYVMST\0", 1, zlib.crc32(body), len(body)) + body)
    assert "expected a map" in resume_error(tmp_path / "l.state")


def test_load_error_type() -> None:
    with pytest.raises(LoadError, match="does not fit"):
        Machine(2 << 20).boot(b"\x90" * (2 << 20))
