"""Operator mistakes on the ``vxpu attach/detach/ls/passthrough/libvirt-xml`` command line: each
is one line on stderr naming the fix (exit 2), never a traceback; ``--json`` gives a JSON error."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the commands' runtime directory (locks) out of the real /run/vxpu."""
    monkeypatch.setenv("VXPU_RUNTIME_DIR", str(tmp_path / "rt"))
    return tmp_path / "rt"


def _vxpu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vxpu", *args], capture_output=True, text=True, timeout=30,
                          check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("args", "says"), [
    (["attach"], "required: --qmp"),
    (["attach", "--qmp", "/x", "--backend", "gpu"], "cpu, cuda[:N], hip[:N], npu"),
    (["detach", "--qmp", "/x"], "required: --id"),
    (["detach", "--qmp", "/x", "--id", "a", "--timeout", "-1"], "between 0 and 3600"),
    (["ls"], "required: --qmp"),
    (["passthrough"], "give an action: bind, unbind, attach or detach"),
    (["passthrough", "bind"], "required: bdf"),
    (["passthrough", "bind", "zz:zz"], "not a PCI address"),
    (["attach", "--qmp", "/nonexistent/vm.qmp"], "no QMP socket at /nonexistent/vm.qmp: is the VM running?"),
    (["attach", "--qmp", "/tmp", "--id", "x"], "is not a Unix socket"),
    (["attach", "--qmp", "/nonexistent", "--id", "no good"], "device id 'no good' is not valid"),
    (["libvirt-xml", "--socket", "relative.sock"], "must be absolute"),
])
def test_one_line_error_naming_the_fix(args: list[str], says: str) -> None:
    res = _vxpu(*args)
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert says in res.stderr


def test_dead_qmp_socket_as_json(tmp_path: Path) -> None:
    path = tmp_path / "dead.qmp"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    res = _vxpu("ls", "--qmp", str(path), "--json")
    assert res.returncode == 2 and res.stderr == ""
    doc = json.loads(res.stdout)
    assert doc["kind"] == "QmpUnreachable" and "nothing listens" in doc["error"] and doc["exit"] == 2
