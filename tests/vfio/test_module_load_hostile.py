"""MODULE_LOAD of hostile IR through the whole stack (issue 7): the accelerator device served by
``vxpu serve`` (a process of its own), driven through the SDK's raw descriptor interface so the
guest-side verifier is bypassed, as a hostile guest would.

The shapes of the issue are refused with BAD_MODULE in milliseconds; a valid but slow module
fails with COMPILE_LIMIT within the compile worker's deadline while the server keeps
answering trapped register reads (REGION_READ); a compile worker killed mid-compile fails that
load only; the next valid MODULE_LOAD succeeds each time.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vxpu.ir.binary import encode
from vxpu.ir.samples import load_module

from vxpu.abi import xpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ir"))
import hostile_shapes as hs  # the shapes live beside the IR tests

DEADLINE_S = 2.0


def slow() -> bytes:
    """Seconds of LLVM, within every limit; a new module name each time, so never a cache hit."""
    return encode(hs.many_kernels(4, 8192, name=f"slow{time.monotonic_ns()}"), names=False)


@pytest.fixture(scope="module")
def device() -> Iterator[object]:
    from vxpu.guest import Device

    # The server process reads these: a short compile deadline and a cache of its own.
    env = {"VXPU_COMPILE_WALL_S": str(DEADLINE_S), "VXPU_CACHE": tempfile.mkdtemp(prefix="vxpu-cache-")}
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        dev = Device.local(backend="cpu", ram_size=64 << 20)
    finally:
        for name, value in old.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    yield dev
    dev.close()
    shutil.rmtree(env["VXPU_CACHE"], ignore_errors=True)


def submit_load(dev, image: bytes) -> tuple[int, object]:
    mem = dev.raw.dma(len(image))
    mem.view[:len(image)] = image
    return dev.raw.submit(xpu.Opcode.MODULE_LOAD, int(xpu.ModuleKind.IR), sg=mem.segments(0, len(image))), mem


def load(dev, image: bytes) -> tuple[int, int]:
    """``(status, result)`` of a MODULE_LOAD of ``image``."""
    seq, mem = submit_load(dev, image)
    try:
        status, result, _ = dev.raw.wait(seq)
    finally:
        dev.raw.free_dma(mem)
    return status, result


def valid_load_works(dev) -> None:
    status, handle = load(dev, encode(load_module("saxpy.vxir")))
    assert status == xpu.Status.OK and handle


@pytest.mark.parametrize("shape", [lambda: hs.loop_nest(2000), lambda: hs.straight_line(65000),
                                   lambda: hs.branch_chain(16000), lambda: hs.many_kernels(256, 1000)],
                         ids=["nest2000", "line65000", "chain16000", "many256x1000"])
def test_hostile_shapes_are_refused(device, shape):
    image = encode(shape(), names=False)
    start = time.monotonic()
    status, _ = load(device, image)
    assert status == xpu.Status.BAD_MODULE
    assert time.monotonic() - start < 2.0
    valid_load_works(device)


def test_a_slow_compile_ends_with_compile_limit_while_registers_are_answered(device):
    warm = encode(hs.many_kernels(1, 16, name=f"warm{time.monotonic_ns()}"), names=False)
    assert load(device, warm)[0] == xpu.Status.OK       # a compile worker is up: its start is not timed
    image = slow()
    front = hs.front_end_seconds(image)
    seq, mem = submit_load(device, image)
    start = time.monotonic()
    reads, slowest = 0, 0.0
    try:
        while time.monotonic() - start < DEADLINE_S - 0.5:       # the compile runs meanwhile
            t0 = time.monotonic()
            assert device.raw.read_reg(xpu.REG_MAGIC) == xpu.MAGIC_VALUE
            slowest = max(slowest, time.monotonic() - t0)
            reads += 1
        status, _, _ = device.raw.wait(seq)
    finally:
        device.raw.free_dma(mem)
    took = time.monotonic() - start
    assert status == xpu.Status.COMPILE_LIMIT
    assert took < 2 * front + DEADLINE_S + 1.5, (took, front)    # not the several seconds LLVM would take
    assert reads > 20 and slowest < 0.25, (reads, slowest)
    valid_load_works(device)


def test_a_worker_killed_mid_compile_fails_that_load_only(device):
    server = device.transport.proc.pid
    seq, mem = submit_load(device, slow())
    try:
        worker = _busy_worker(server)
        os.kill(worker, signal.SIGKILL)
        status, _, _ = device.raw.wait(seq)
    finally:
        device.raw.free_dma(mem)
    assert status == xpu.Status.COMPILE_LIMIT
    valid_load_works(device)


def _busy_worker(server_pid: int) -> int:
    """A compile worker of the server that is using CPU (the one compiling)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in _children(server_pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"vxpu.ir.workers" in cmdline and state == "R":
                return pid
        time.sleep(0.02)
    raise AssertionError("no compile worker is compiling")


def _children(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(parent):
                out.append(int(entry))
    return out
