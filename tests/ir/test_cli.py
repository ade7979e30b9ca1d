"""``vxpu ir check | opt | compile | run`` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vxpu.ir import samples
from vxpu.ir.binary import encode
from vxpu.ir.text import parse
from vxpu.ir.verify import verify

from tests.ir.lowerhelpers import lld_missing, nvjitlink_missing
from vxpu import cli

KERNELS = samples.kernels_dir()
SAXPY = str(KERNELS / "saxpy.vxir")
BAD = """module @m
kernel @k(%a: i32, %f: f32) {
^entry:
  %x = add %a, %f : i32
  %y = mul %x, %x : i64
  ret
}
"""
REDUNDANT = """module @m
kernel @k(%out: ptr<global>) {
^entry:
  %t = thread_id.x
  %two = const 2 : i32
  %three = const 3 : i32
  %six = mul %two, %three : i32
  %yes = icmp eq %six, %six
  cbr %yes, ^a, ^b
^a:
  %p = offset %out, %t : i32
  store %six, %p
  br ^b
^b:
  ret
}
"""


def vxpu(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_check_ok_text_and_binary(capsys, tmp_path):
    rc, out, _ = vxpu(capsys, "ir", "check", SAXPY)
    assert rc == 0 and "ok" in out and "saxpy" in out
    wire = tmp_path / "saxpy.vxbin"
    wire.write_bytes(encode(parse(Path(SAXPY).read_text())))
    rc, out, _ = vxpu(capsys, "ir", "check", str(wire), "--json")
    assert rc == 0 and json.loads(out) == {"file": str(wire), "ok": True, "module": "saxpy", "kernels": ["saxpy"]}


def test_check_lists_every_problem(capsys, tmp_path):
    bad = tmp_path / "bad.vxir"
    bad.write_text(BAD)
    rc, _, err = vxpu(capsys, "ir", "check", str(bad))
    assert rc == 1 and "3 problems" in err and "4:3" in err and "5:3" in err
    rc, out, _ = vxpu(capsys, "ir", "check", str(bad), "--json")
    result = json.loads(out)
    assert rc == 1 and not result["ok"] and len(result["problems"]) == 3
    rc, _, err = vxpu(capsys, "ir", "check", str(tmp_path / "missing.vxir"))
    assert rc == 2 and "cannot read" in err


def test_opt_prints_valid_optimized_ir(capsys, tmp_path):
    path = tmp_path / "redundant.vxir"
    path.write_text(REDUNDANT)
    rc, o0, _ = vxpu(capsys, "ir", "opt", str(path), "-O", "0")
    rc3, o3, _ = vxpu(capsys, "ir", "opt", str(path), "-O", "3")
    assert rc == rc3 == 0
    m0, m3 = parse(o0), parse(o3)
    verify(m3)
    assert m0 == parse(REDUNDANT)
    assert [op.opcode for op in m3.kernels[0].ops()] == ["thread_id", "const", "offset", "store", "ret"]
    out = tmp_path / "o.vxir"
    rc, _, _ = vxpu(capsys, "ir", "opt", str(path), "--passes", "constfold,dce", "-o", str(out))
    assert rc == 0 and "mul" not in out.read_text()
    rc, _, err = vxpu(capsys, "ir", "opt", str(path), "--passes", "inline")
    assert rc == 2 and "unknown pass" in err


def _skip_without_tool(target: str, emit: str) -> None:
    """Skip with the reason when the native tool an artifact needs is absent (nvJitLink, LLD)."""
    why = nvjitlink_missing() if target == "nvptx" and emit in ("ptx", "cubin") else ""
    why = why or (lld_missing() if emit == "hsaco" else "")
    if why:
        pytest.skip(f"toolchain for {target}/{emit} unavailable: {why}")


@pytest.mark.parametrize("target,emit,check", [
    ("x86", "llvm", lambda d: b"define" in d),
    ("x86", "asm", lambda d: b"vxpu_launch_dot:" in d),
    ("x86", "obj", lambda d: d[:4] == b"\x7fELF"),
    ("nvptx", "ptx", lambda d: b".visible .entry dot" in d),
    ("nvptx", "cubin", lambda d: d[:4] == b"\x7fELF"),
    ("amdgpu", "llvm", lambda d: b"amdgpu_kernel" in d),
    ("amdgpu", "hsaco", lambda d: d[:4] == b"\x7fELF"),
])
def test_compile_emits(capsys, tmp_path, target, emit, check):
    _skip_without_tool(target, emit)
    out = tmp_path / f"dot.{emit}"
    rc, _, err = vxpu(capsys, "ir", "compile", str(KERNELS / "dot.vxir"), "--target", target, "--emit", emit,
                      "-o", str(out))
    assert rc == 0, err
    assert check(out.read_bytes())


def test_compile_rejects_wrong_emit(capsys, tmp_path):
    rc, _, err = vxpu(capsys, "ir", "compile", SAXPY, "--target", "x86", "--emit", "cubin", "-o",
                      str(tmp_path / "x"))
    assert rc == 2 and "not available for --target x86" in err


@pytest.mark.parametrize("backend", [[], ["--interp"]], ids=["x86", "interp"])
def test_run_saxpy(capsys, tmp_path, backend):
    saved = tmp_path / "out.npz"
    rc, out, err = vxpu(capsys, "ir", "run", SAXPY, "--grid", "4", "--block", "256", *backend, "--save", str(saved),
                        "--json", "--args", "n=1000", "a=2.0", "x=arange:f32:1000", "y=fill:f32:1000:0.5")
    assert rc == 0, err
    result = json.loads(out)
    assert result["grid"] == [4, 1, 1] and result["backend"] == ("interp" if backend else "x86")
    y = np.array(result["buffers"]["y"]["data"], np.float32)
    assert np.array_equal(y, np.float32(2.0) * np.arange(1000, dtype=np.float32) + np.float32(0.5))
    assert np.array_equal(np.load(saved)["y"], y)


def test_run_text_output_and_multi_kernel_modules(capsys):
    rc, out, _ = vxpu(capsys, "ir", "run", str(KERNELS / "scan.vxir"), "--kernel", "scan_blocks", "--block", "8",
                      "--args", "n=5", "in=list:i32:1,2,3,4,5", "out=zeros:i32:5", "sums=zeros:i32:1", "--show", "3")
    assert rc == 0
    assert "out: i32[5] = [1, 3, 6, ... (2 more)]" in out and "sums: i32[1] = [15]" in out
    rc, _, err = vxpu(capsys, "ir", "run", str(KERNELS / "scan.vxir"), "--args")
    assert rc == 2 and "choose one with --kernel" in err


@pytest.mark.parametrize("args,message", [
    (["n=4", "a=1.0", "x=zeros:f32:4"], "missing argument(s) y"),
    (["n=4", "a=1.0", "x=zeros:f32:4", "y=zeros:f32:4", "z=1"], "no parameter z"),
    (["n=four", "a=1.0", "x=zeros:f32:4", "y=zeros:f32:4"], "must be an integer"),
    (["n=4", "a=1.0", "x=zeros:f99:4", "y=zeros:f32:4"], "element type"),
    (["n=4", "a=1.0", "x=blah:f32:4", "y=zeros:f32:4"], "unknown buffer kind"),
    (["n=4", "a=1.0", "x=zeros:f32:0", "y=zeros:f32:4"], "positive"),
    (["n=4", "a", "x=zeros:f32:4", "y=zeros:f32:4"], "NAME=VALUE"),
])
def test_run_argument_errors(capsys, args, message):
    rc, _, err = vxpu(capsys, "ir", "run", SAXPY, "--args", *args)
    assert rc == 2 and message in err


def test_run_reports_kernel_faults(capsys):
    # n beyond the 8-element buffers: both the interpreter and the x86 JIT check every access
    # against its own buffer and fault at the first one past x (parameter 2), 32 bytes in.
    for extra in ([], ["--interp"]):
        rc, _, err = vxpu(capsys, "ir", "run", SAXPY, "--grid", "4", "--block", "256", *extra,
                          "--args", "n=1000", "a=1", "x=zeros:f32:8", "y=zeros:f32:8")
        assert rc == 2 and "fault" in err.lower() and "parameter 2" in err and "0x20" in err, err


def test_module_entry_point_runs_check():
    out = subprocess.run([sys.executable, "-m", "vxpu", "ir", "check", SAXPY], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "ok" in out.stdout


def test_run_detects_races_in_the_interpreter(capsys, tmp_path):
    racy = tmp_path / "racy.vxir"
    racy.write_text("""module @m
kernel @k(%out: ptr<global>) {
^entry:
  %t = thread_id.x
  store %t, %out
  ret
}
""")
    rc, _, err = vxpu(capsys, "ir", "run", str(racy), "--block", "4", "--interp", "--detect-races",
                      "--args", "out=zeros:i32:1")
    assert rc == 2 and "data race on global" in err
    rc, _, err = vxpu(capsys, "ir", "run", str(racy), "--block", "4", "--detect-races", "--args", "out=zeros:i32:1")
    assert rc == 2 and "needs --interp" in err


def test_run_with_too_many_threads_is_a_clean_error(capsys):
    for extra in ([], ["--interp"]):
        rc, _, err = vxpu(capsys, "ir", "run", SAXPY, "--block", "99999", *extra,
                          "--args", "n=4", "a=1", "x=zeros:f32:4", "y=zeros:f32:4")
        assert rc == 2 and "99999" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_run_reports_compile_and_kernel_time(capsys):
    args = ["--block", "4", "--args", "n=4", "a=1", "x=zeros:f32:4", "y=zeros:f32:4"]
    rc, out, _ = vxpu(capsys, "ir", "run", SAXPY, *args)
    assert rc == 0 and "compile " in out.splitlines()[0] and "kernel " in out.splitlines()[0]
    rc, out, _ = vxpu(capsys, "ir", "run", SAXPY, "--json", *args)
    result = json.loads(out)
    assert rc == 0 and result["compile_seconds"] > 0 and result["kernel_seconds"] > 0
    assert result["seconds"] >= result["compile_seconds"] + result["kernel_seconds"]


def test_compile_text_goes_to_stdout_without_o(capsys):
    rc, out, _ = vxpu(capsys, "ir", "compile", SAXPY, "--target", "x86", "--emit", "llvm")
    assert rc == 0 and "define" in out
    rc, _, err = vxpu(capsys, "ir", "compile", SAXPY, "--target", "x86", "--emit", "obj")
    assert rc == 2 and "give -o FILE" in err
