"""``vxpu demo`` without a VM: option checks, one-line mistakes, and the result table."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from vxpu.images.demo import DemoError, check_backend, check_memory, print_result


@pytest.mark.parametrize("spec", ["cpu", "cuda", "cuda:1", "hip:0", "npu"])
def test_backends_accepted(spec: str) -> None:
    assert check_backend(spec) == spec


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "", "cpu:"])
def test_bad_backend_names_the_choices(spec: str) -> None:
    with pytest.raises(DemoError, match="one of cpu, cuda, hip, npu"):
        check_backend(spec)


@pytest.mark.parametrize(("spec", "want"), [("1G", "1G"), ("768m", "768M"), ("256M", "256M")])
def test_memory_accepted(spec: str, want: str) -> None:
    assert check_memory(spec) == want


@pytest.mark.parametrize("spec", ["10", "128M", "1T", "lots", "0G"])
def test_bad_memory_says_what_to_write(spec: str) -> None:
    with pytest.raises(DemoError, match="--memory 1G"):
        check_memory(spec)


def test_cli_mistakes_are_one_line_naming_the_fix() -> None:
    for argv, fix in ((["demo", "--backend", "tpu"], "one of cpu, cuda, hip, npu"),
                      (["demo", "--frobnicate"], "--help"),
                      (["demo", "--memory", "64M"], "--memory 1G"),
                      (["vm", "run", "--demo"], "vxpu demo"),
                      (["vm", "run", "--file", "/nonexistent/x.py", "--cmd", "true"], "no such file")):
        res = subprocess.run([sys.executable, "-m", "vxpu", *argv], capture_output=True, check=False, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 2, (argv, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and fix in res.stderr, (argv, res.stderr)


def _result(ok: bool, **kernel: object) -> dict[str, object]:
    k = {"name": "saxpy", "shape": "1048576 floats", "guest_ms": 1.5, "max_rel_err": 0.0, "ok": ok, **kernel}
    return {"ok": ok, "backend": "cpu", "qemu": "11.1.3 (debian)", "accel": "tcg", "kvm_note": "", "device": "X",
            "guest_s": 9.0, "wall_s": 11.0, "kernels": [k], "bandwidth_h2d_gbps": 4.0, "bandwidth_d2h_gbps": 5.0,
            "bandwidth_bytes": 16 << 20, "noop_roundtrip_us": 30.0, "trapped_read_us": 25.0}


def test_table_pass_and_fail() -> None:
    out = io.StringIO()
    print_result(_result(True), out)
    text = out.getvalue()
    assert "ok    saxpy" in text and "PASS: 1/1 kernels correct" in text and "16 MiB" in text
    out = io.StringIO()
    print_result(_result(False, error="DeviceError: MODULE_LOAD: UNSUPPORTED (x)", guest_ms=None, max_rel_err=None),
                 out)
    text = out.getvalue()
    assert "FAIL  saxpy" in text and "FAIL: 0/1" in text and "note     UNSUPPORTED" in text
