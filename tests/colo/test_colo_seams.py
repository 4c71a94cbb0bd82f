"""The seams between the parts: what imports what (checked in fresh interpreters, so nothing is preloaded)."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       check=True)
    return set(r.stdout.split())


def test_the_gateway_imports_nothing_from_toyvm() -> None:
    """A gateway host needs no emulator: the witness, the gateway shell and the control client stand alone."""
    loaded = modules_after("import colo.gateway, colo.witness, colo.cluster")
    assert not {m for m in loaded if m == "toyvm" or m.startswith("toyvm.")}, sorted(loaded)
    assert "unicorn" not in loaded


def test_toyvm_never_imports_colo() -> None:
    loaded = modules_after("import toyvm, toyvm.cli, toyvm.netbridge, toyvm.runner")
    assert not {m for m in loaded if m == "colo" or m.startswith("colo.")}


def test_the_harness_and_the_demo_do_not_import_the_command_line() -> None:
    """LocalCluster lives in colo/cluster.py: `colo up`, the demo, the tests and the benchmarks share it without
    an import circle through colo/cli.py."""
    assert "colo.cli" not in modules_after("import colo.cluster, colo.demo")
