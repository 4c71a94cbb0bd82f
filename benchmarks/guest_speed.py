#!/usr/bin/env python3
"""Guest speed: raw Unicorn against the toyvm run loop, measured side by side in one process.

Workloads (each runs to power-off; the same image, command line and amount of work in every configuration):
  compute        a 6-instruction arithmetic loop with one store to the (hot) stack page, assembled at run time
  memtouch-256   guests/memtouch.bin pages=256: one 8-byte store per page, 1 MiB working set (fits the TLB)
  memtouch-1024  guests/memtouch.bin pages=1024: 4 MiB working set, nearly every store misses the softmmu TLB

Configurations:
  raw            a plain Uc, RAM mapped with mem_map_ptr over an mmap, only the IN/OUT hooks the guest needs
                 (serial out, clock, power), one emu_start to completion
  toyvm-native   toyvm.Machine(hooks="native") + toyvm.runner.run(slice_seconds=0.01)
  toyvm-python   toyvm.Machine(hooks="python") + toyvm.runner.run(slice_seconds=0.01)
and a breakdown: raw plus one ingredient of toyvm at a time (virtual TLB with a native or a Python fill hook,
the native block hook, the count= hook that counted slices use).

Rounds are interleaved (every round runs every configuration of every workload, in a rotated order) and the
table shows medians. Ratios are the median of per-round ratios (toyvm and raw measured seconds apart).
Instruction counts: the compute loop's count follows from its structure (checked against toyvm's exact
count); memtouch's is the sum of SliceResult.instructions over the pure-Python run (exact on that path).

Also measures redis-benchmark against guests/kvstore.bin under `python -m toyvm run --net-listen`.

Usage: benchmarks/guest_speed.py [--quick] [--rounds N] [--json FILE] [--no-breakdown] [--no-redis]
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import unicorn  # noqa: E402
from unicorn import (  # noqa: E402
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_INSN,
    UC_HOOK_TLB_FILL,
    UC_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
)
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT, UC_X86_REG_RDI, UC_X86_REG_RFLAGS, UC_X86_REG_RSP  # noqa: E402

import toyvm  # noqa: E402
import toyvm.native  # noqa: E402
import toyvm.runner  # noqa: E402
from toyvm.loader import load_image, write_boot_info  # noqa: E402
from toyvm.ram import GuestRAM  # noqa: E402

RAM_SIZE = 64 << 20
NEVER = 0xFFFF_FFFF_FFFF_F000  # an emu_start `until` address that is never reached
MEMTOUCH = ROOT / "guests" / "memtouch.bin"
KVSTORE = ROOT / "guests" / "kvstore.bin"
INSNS_PER_PAGE = 5  # memtouch's inner loop, used only to size iters= (the measured count is exact)

# Our compute loop. {iters} is substituted; 3 instructions before the loop, 6 per iteration, 3 to power off
# (the final `out` stops the VM; the hlt after it never runs).
COMPUTE_SRC = """
.intel_syntax noprefix
.globl _start
.text
_start:
    mov rcx, {iters}
    mov rax, 0x9E3779B9
    xor ebx, ebx
spin:
    imul rax, rax, 0x2545F491
    add rbx, rax
    ror rbx, 7
    mov [rsp - 8], rbx
    dec rcx
    jnz spin
    mov edx, 0x500
    xor eax, eax
    out dx, eax
    hlt
"""
COMPUTE_PER_ITER, COMPUTE_FIXED = 6, 6


# ---------------------------------------------------------------------------------------------------------------
# workloads

@dataclass
class Workload:
    name: str
    description: str
    image: bytes
    cmdline: str = ""
    expected: int | None = None  # instruction count known from the code's structure
    counted: list[int] = field(default_factory=list)  # exact counts from toyvm's pure-Python runs
    serial: bytes | None = None  # the serial output of the first toyvm run: every other run must match

    @property
    def instructions(self) -> int:
        if self.expected is not None:
            return self.expected
        if not self.counted:
            raise RuntimeError(f"{self.name}: no instruction count yet")
        return self.counted[0]


def assemble(src: str, org: int = 0x100000) -> bytes:
    """Intel-syntax source -> flat binary linked at `org`, with binutils (as, ld, objcopy)."""
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"guest_speed: `{tool}` not found: install binutils")
    with tempfile.TemporaryDirectory(prefix="toyvm-bench-") as d:
        p = Path(d)
        (p / "loop.s").write_text(src)
        steps = [["as", "--64", "-o", "loop.o", "loop.s"],
                 ["ld", "-m", "elf_x86_64", f"-Ttext={org:#x}", "-e", "_start", "--build-id=none", "-static",
                  "-nostdlib", "-o", "loop.elf", "loop.o"],
                 ["objcopy", "-O", "binary", "-j", ".text", "loop.elf", "loop.bin"]]
        for cmd in steps:
            subprocess.run(cmd, cwd=p, check=True, capture_output=True)
        return (p / "loop.bin").read_bytes()


def compute_workload(instructions: int) -> Workload:
    iters = max(1, (instructions - COMPUTE_FIXED) // COMPUTE_PER_ITER)
    return Workload("compute", "6-insn arithmetic loop, 1 store to the stack page",
                    assemble(COMPUTE_SRC.format(iters=iters)), expected=COMPUTE_PER_ITER * iters + COMPUTE_FIXED)


def memtouch_workload(pages: int, instructions: int) -> Workload:
    iters = max(1, instructions // (INSNS_PER_PAGE * pages))
    what = "fits the TLB" if pages <= 256 else "overflows the TLB"
    return Workload(f"memtouch-{pages}", f"memtouch pages={pages} iters={iters} ({pages * 4} KiB, {what})",
                    MEMTOUCH.read_bytes(), cmdline=f"pages={pages} iters={iters}")


# ---------------------------------------------------------------------------------------------------------------
# raw Unicorn, and raw Unicorn plus one toyvm ingredient

class RawPorts:
    """The least a guest needs to run start to finish: serial out, the virtual and host clock, power.
    Virtual time advances 1 us per port access as toyvm's does, so the guest runs the same instructions."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self.serial = bytearray()
        self.exit_code: int | None = None
        self.error: str | None = None
        self.vclock = 0
        self.latch = 0
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)

    def _unexpected(self, what: str) -> None:
        if self.error is None:
            self.error = what
        self.uc.emu_stop()

    def _in(self, uc: Uc, port: int, size: int, _ud: Any) -> int:
        self.vclock += 1000
        if port == 0x3FD:  # LSR: transmitter empty
            return 0x60
        if port == 0x510:
            self.latch = self.vclock
            return self.latch & 0xFFFFFFFF
        if port == 0x518:
            self.latch = time.time_ns()
            return self.latch & 0xFFFFFFFF
        if port in (0x514, 0x51C):
            return self.latch >> 32
        self._unexpected(f"IN from port {port:#x}")
        return 0

    def _out(self, uc: Uc, port: int, size: int, value: int, _ud: Any) -> None:
        self.vclock += 1000
        if port == 0x3F8:
            self.serial.append(value & 0xFF)
        elif port == 0x500:
            self.exit_code = value & 0xFF
            uc.emu_stop()
        else:
            self._unexpected(f"OUT to port {port:#x}")


def _native_hook(uc: Uc, htype: int, fn: Any, state: Any) -> Any:
    from unicorn.unicorn_py3.arch.types import uc_hook_h
    from unicorn.unicorn_py3.unicorn import uclib
    h = uc_hook_h()
    err = uclib.uc_hook_add(uc._uch, ctypes.byref(h), htype, ctypes.cast(fn, ctypes.c_void_p),
                            ctypes.cast(ctypes.pointer(state), ctypes.c_void_p), ctypes.c_uint64(1),
                            ctypes.c_uint64(0))
    if err:
        raise RuntimeError(f"uc_hook_add failed: {err}")
    return h


def run_raw(w: Workload, extra: str | None = None) -> float:
    """One emu_start to power-off on a plain Uc; `extra` adds one ingredient of toyvm. Returns seconds."""
    ram = GuestRAM(RAM_SIZE)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, RAM_SIZE, UC_PROT_ALL, ram.address)
    info = load_image(ram, w.image, w.name)
    uc.reg_write(UC_X86_REG_RDI, write_boot_info(ram, w.cmdline))
    uc.reg_write(UC_X86_REG_RSP, RAM_SIZE)
    uc.reg_write(UC_X86_REG_RFLAGS, 0x2)
    ports = RawPorts(uc)
    keep: list[Any] = []  # native hook state must outlive the run
    count = 0
    if extra in ("vtlb-native", "block-native"):
        lib = toyvm.native.load()
        if lib is None:
            raise RuntimeError(f"native hooks unavailable: {toyvm.native.error()}")
        from unicorn.unicorn_py3.unicorn import uclib
        st = toyvm.native.NativeState(ram.dirty_address, ram.npages,
                                      ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value, 0, 0, 0, 0)
        if extra == "vtlb-native":
            uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
            keep += [st, _native_hook(uc, UC_HOOK_TLB_FILL, lib.toyvm_tlb_fill, st)]
        else:  # a deadline an hour away: the hook reads the clock every 64 blocks as in a slice, never stops
            st.deadline_ns = time.monotonic_ns() + 3600 * 10**9
            keep += [st, _native_hook(uc, UC_HOOK_BLOCK, lib.toyvm_block, st)]
    elif extra == "vtlb-python":
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        dirty, npages = ram.dirty_bitmap, ram.npages
        rx, rwx = UC_PROT_READ | UC_PROT_EXEC, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC

        def fill(_uc: Uc, vaddr: int, access: int, entry: Any, _ud: Any) -> bool:
            entry.paddr = vaddr
            if access == UC_MEM_WRITE:
                if vaddr >> 12 < npages:
                    dirty[vaddr >> 12] = 1
                entry.perms = rwx
            else:
                entry.perms = rx
            return True
        uc.hook_add(UC_HOOK_TLB_FILL, fill)
    elif extra == "count":
        count = 1 << 62  # installs unicorn's per-instruction counting hook; never reached
    elif extra is not None:
        raise ValueError(extra)
    gc.collect()
    t0 = time.perf_counter()
    uc.emu_start(info.entry, NEVER, count=count)
    dt = time.perf_counter() - t0
    if ports.error is not None:
        raise RuntimeError(f"{w.name} on raw Unicorn: the guest needs more than the minimal ports: {ports.error}")
    if ports.exit_code != 0:
        raise RuntimeError(f"{w.name} on raw Unicorn stopped without powering off (exit code {ports.exit_code})")
    check_serial(w, bytes(ports.serial), f"raw{'+' + extra if extra else ''}")
    return dt


def check_serial(w: Workload, out: bytes, who: str) -> None:
    """Every configuration must have run the same program to the same end (memtouch prints a checksum)."""
    if w.serial is None:
        w.serial = out
    elif out != w.serial:
        raise RuntimeError(f"{w.name}: {who} printed {out!r}, expected {w.serial!r}")


# ---------------------------------------------------------------------------------------------------------------
# toyvm

def run_toyvm(w: Workload, hooks: str) -> float:
    vm = toyvm.Machine(RAM_SIZE, hooks=hooks)
    vm.boot(w.image, w.cmdline, name=w.name)
    counted: list[int] = []
    if hooks == "python":  # every counted slice reports its exact instruction count: add them up
        run_slice = vm.run_slice

        def counting_slice(*args: Any, **kw: Any) -> Any:
            r = run_slice(*args, **kw)
            assert r.instructions is not None  # counted slices always know
            counted.append(r.instructions)
            return r
        vm.run_slice = counting_slice  # type: ignore[method-assign]
    serial = io.BytesIO()
    gc.collect()
    t0 = time.perf_counter()
    end = toyvm.runner.run(vm, serial_out=serial, slice_seconds=0.01)
    dt = time.perf_counter() - t0
    if end is not toyvm.runner.RunEnd.POWER_OFF or vm.exit_code != 0:
        raise RuntimeError(f"{w.name} on toyvm ({hooks}): ended {end.value}, exit code {vm.exit_code}")
    check_serial(w, serial.getvalue(), f"toyvm-{hooks}")
    if counted:
        if None in counted:
            raise RuntimeError("a pure-Python slice did not report its instruction count")
        w.counted.append(sum(counted))
    del vm
    return dt


# ---------------------------------------------------------------------------------------------------------------
# the MIPS rounds

MAIN = ["raw", "toyvm-native", "toyvm-python"]
BREAKDOWN = ["raw+vtlb-native", "raw+block-native", "raw+count", "raw+vtlb-python"]
LABELS = {
    "raw": "raw Unicorn",
    "toyvm-native": "toyvm, native hooks",
    "toyvm-python": "toyvm, Python hooks",
    "raw+vtlb-native": "raw + virtual TLB, C fill hook",
    "raw+block-native": "raw + C block hook (slice clock)",
    "raw+count": "raw + count= (per-insn counter)",
    "raw+vtlb-python": "raw + virtual TLB, Python fill hook",
}
RUNNERS: dict[str, Callable[[Workload], float]] = {
    "raw": lambda w: run_raw(w),
    "toyvm-native": lambda w: run_toyvm(w, "native"),
    "toyvm-python": lambda w: run_toyvm(w, "python"),
    "raw+vtlb-native": lambda w: run_raw(w, "vtlb-native"),
    "raw+block-native": lambda w: run_raw(w, "block-native"),
    "raw+count": lambda w: run_raw(w, "count"),
    "raw+vtlb-python": lambda w: run_raw(w, "vtlb-python"),
}


def measure(workloads: list[Workload], configs: list[str], rounds: int, log: Callable[[str], None]
            ) -> dict[str, dict[str, list[float]]]:
    """seconds[workload][config] = one wall time per round. Rounds interleave everything, order rotated."""
    seconds: dict[str, dict[str, list[float]]] = {w.name: {c: [] for c in configs} for w in workloads}
    # toyvm-python first in round 0: it records the count and the expected serial output of memtouch
    order = ["toyvm-python"] + [c for c in configs if c != "toyvm-python"]
    for r in range(rounds):
        k = r % len(order)
        rot = order[k:] + order[:k]
        for w in workloads:
            for c in rot:
                dt = RUNNERS[c](w)
                seconds[w.name][c].append(dt)
                log(f"round {r + 1}/{rounds}  {w.name:<14} {c:<17} {dt:7.3f} s")
    return seconds


def summarize(workloads: list[Workload], seconds: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in workloads:
        n = w.instructions
        per = seconds[w.name]
        raw = per["raw"]
        res: dict[str, Any] = {"instructions": n, "configs": {}}
        for c, ts in per.items():
            # MIPS ratio toyvm/raw = raw time / toyvm time, per round
            ratios = [r / t for r, t in zip(raw, ts, strict=True)]
            res["configs"][c] = {"seconds": ts, "mips": statistics.median(n / t / 1e6 for t in ts),
                                 "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                                 "ratio_max": max(ratios)}
        out[w.name] = res
    return out


# ---------------------------------------------------------------------------------------------------------------
# redis-benchmark against the kvstore guest

RPS = re.compile(r"^\s*([A-Z]+): ([0-9.]+) requests per second", re.M)


def start_kvstore(hooks: str, errfile: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with errfile.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "toyvm", "run", str(KVSTORE), "--net-listen",
                                 "127.0.0.1:0", "--hooks", hooks], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(rb"listening on [0-9.]+:(\d+)", errfile.read_bytes())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_vm(proc)
    raise RuntimeError(f"kvstore ({hooks}) did not start: {errfile.read_text(errors='replace').strip()}")


def stop_vm(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_round(hooks: str, variants: list[tuple[int, int]], requests: int, workdir: Path
                ) -> dict[tuple[int, int], dict[str, float]]:
    proc, port = start_kvstore(hooks, workdir / f"kvstore-{hooks}.err")
    try:
        results = {}
        for clients, pipeline in variants:
            cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-n", str(requests),
                   "-c", str(clients), "-P", str(pipeline), "-q"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
            rps = {name: float(v) for name, v in RPS.findall(done.stdout)}
            if set(rps) != {"SET", "GET"}:
                raise RuntimeError(f"could not parse redis-benchmark output: {done.stdout[-500:]!r}")
            results[(clients, pipeline)] = rps
        if proc.poll() is not None:
            raise RuntimeError(f"kvstore ({hooks}) exited early with status {proc.returncode}")
        return results
    finally:
        stop_vm(proc)


def measure_redis(hooks_modes: list[str], variants: list[tuple[int, int]], requests: int, rounds: int,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    runs: dict[tuple[str, int, int], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="toyvm-bench-") as d:
        for r in range(rounds):
            for hooks in (hooks_modes if r % 2 == 0 else hooks_modes[::-1]):
                for (c, p), rps in redis_round(hooks, variants, requests, Path(d)).items():
                    slot = runs.setdefault((hooks, c, p), {"SET": [], "GET": []})
                    for k in slot:
                        slot[k].append(rps[k])
                    log(f"round {r + 1}/{rounds}  redis {hooks:<6} -c {c:<3} -P {p:<3} "
                        f"SET {rps['SET']:9.0f}/s  GET {rps['GET']:9.0f}/s")
    return [{"hooks": h, "clients": c, "pipeline": p, "requests": requests,
             "set": statistics.median(v["SET"]), "get": statistics.median(v["GET"]),
             "set_runs": v["SET"], "get_runs": v["GET"]} for (h, c, p), v in runs.items()]


# ---------------------------------------------------------------------------------------------------------------
# report

def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "unicorn": unicorn.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def fmt_ratio(c: dict[str, Any]) -> str:
    return f"{c['ratio']:.2f} ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})"


def markdown(info: dict[str, Any], args: argparse.Namespace, workloads: list[Workload], speed: dict[str, Any],
             redis: list[dict[str, Any]] | None, notes: list[str]) -> str:
    lines = [f"Guest speed, {info['date']}: {info['cpu']}, {info['nproc']} CPUs, Python {info['python']}, "
             f"unicorn {info['unicorn']}; median of {args.rounds} interleaved round(s)"
             f"{' (--quick)' if args.quick else ''}.", ""]
    lines += ["| workload | instructions | raw MIPS | toyvm native MIPS | native/raw | toyvm Python MIPS | "
              "Python/raw |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w in workloads:
        s = speed[w.name]
        c = s["configs"]
        lines.append(f"| {w.name} | {s['instructions'] / 1e6:.1f} M | {c['raw']['mips']:.1f} | "
                     f"{c['toyvm-native']['mips']:.1f} | {fmt_ratio(c['toyvm-native'])} | "
                     f"{c['toyvm-python']['mips']:.1f} | {fmt_ratio(c['toyvm-python'])} |")
    lines += ["", "Ratios: median of per-round ratios (min-max over rounds). Target: toyvm/raw >= 0.9.", ""]
    bd = [c for c in BREAKDOWN if c in speed[workloads[0].name]["configs"]]
    if bd:
        lines += ["Breakdown: raw Unicorn plus one ingredient of toyvm; MIPS (ratio to raw).", "",
                  "| workload | " + " | ".join(LABELS[c] for c in bd) + " |", "|---|" + "---:|" * len(bd)]
        for w in workloads:
            c = speed[w.name]["configs"]
            lines.append(f"| {w.name} | " + " | ".join(f"{c[k]['mips']:.1f} ({c[k]['ratio']:.2f})" for k in bd)
                         + " |")
        lines.append("")
    if redis:
        lines += [f"redis-benchmark against guests/kvstore.bin (`-t set,get -n {redis[0]['requests']}`), "
                  "requests per second, median over rounds:", "",
                  "| hooks | clients (-c) | pipeline (-P) | SET ops/s | GET ops/s |", "|---|---:|---:|---:|---:|"]
        for r in sorted(redis, key=lambda r: (r["pipeline"], r["clients"], r["hooks"])):
            lines.append(f"| {r['hooks']} | {r['clients']} | {r['pipeline']} | {r['set']:,.0f} | {r['get']:,.0f} |")
        lines.append("")
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += ["Workloads: " + "; ".join(f"{w.name}: {w.description}" for w in workloads) + "."]
    return "\n".join(lines)


def wait_for(path: Path, seconds: float, log: Callable[[str], None]) -> bool:
    deadline = time.monotonic() + seconds
    if not path.exists() and seconds > 0:
        log(f"waiting up to {seconds:.0f} s for {path} ...")
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(2)
    return path.exists()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Guest MIPS: raw Unicorn vs the toyvm run loop, plus "
                                             "redis-benchmark against the kvstore guest. Prints Markdown.")
    ap.add_argument("--quick", action="store_true", help="a short run (smoke test): small workloads, 1 round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--json", metavar="FILE", help="also write every raw measurement to FILE")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the raw+ingredient configurations")
    ap.add_argument("--no-redis", action="store_true", help="skip redis-benchmark")
    ap.add_argument("--wait-guests", type=float, default=0, metavar="S",
                    help="wait up to S seconds for guests/*.bin to be built (default: do not wait)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if toyvm.native.load() is None:
        print(f"guest_speed: native hooks unavailable: {toyvm.native.error()}", file=sys.stderr)
        return 2
    notes: list[str] = []
    scale = 0.05 if args.quick else 1.0
    workloads = [compute_workload(int(120e6 * scale))]
    if wait_for(MEMTOUCH, args.wait_guests, log):
        workloads += [memtouch_workload(256, int(100e6 * scale)), memtouch_workload(1024, int(24e6 * scale))]
    else:
        notes.append(f"{MEMTOUCH.relative_to(ROOT)} is not built (make guests): memtouch skipped")
        log(notes[-1])
    configs = MAIN + ([] if args.no_breakdown else BREAKDOWN)

    info = machine_info()
    t0 = time.monotonic()
    seconds = measure(workloads, configs, args.rounds, log)
    for w in workloads:
        if len(set(w.counted)) > 1:
            raise RuntimeError(f"{w.name}: instruction counts differ between runs: {w.counted}")
        if w.expected is not None and w.counted and w.counted[0] != w.expected:
            raise RuntimeError(f"{w.name}: toyvm counted {w.counted[0]} instructions, the loop has {w.expected}")
    speed = summarize(workloads, seconds)

    redis, redis_note = None, None
    if args.no_redis:
        redis_note = "skipped (--no-redis)"
    elif shutil.which("redis-benchmark") is None:
        redis_note = "skipped: redis-benchmark not installed (Debian: redis-tools)"
    elif not wait_for(KVSTORE, args.wait_guests, log):
        redis_note = f"skipped: {KVSTORE.relative_to(ROOT)} is not built (make guests)"
    else:
        variants = [(50, 1)] if args.quick else [(50, 1), (50, 16)]
        redis = measure_redis(["native", "python"], variants, 1000 if args.quick else 10000, args.rounds, log)
    log(f"total {time.monotonic() - t0:.0f} s")

    if redis_note:
        notes.append(f"redis-benchmark {redis_note}")
    print(markdown(info, args, workloads, speed, redis, notes))
    if args.json:
        doc = {"machine": info, "rounds": args.rounds, "quick": args.quick, "ram_size": RAM_SIZE,
               "workloads": {w.name: {"description": w.description, "cmdline": w.cmdline,
                                      "instructions": w.instructions, "expected": w.expected,
                                      "toyvm_python_counts": w.counted} for w in workloads},
               "speed": speed, "redis": redis, "redis_note": redis_note}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
