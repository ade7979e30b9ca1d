"""Shared fixtures for the IR core tests: sample files, a builder-made kernel, big kernels."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vxpu.ir.builder import KernelBuilder
from vxpu.ir.model import Module
from vxpu.ir.types import f32, i32, ptr_global

T = TypeVar("T")

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def sample_files() -> list[Path]:
    """Hand-written samples here plus the example kernels (examples/kernels/*.vxir) when present."""
    return sorted(HERE.glob("samples/*.vxir")) + sorted((REPO / "examples" / "kernels").glob("*.vxir"))


def build_saxpy() -> Module:
    """y[i] = a * x[i] + y[i], built with the builder API."""
    b = KernelBuilder("saxpy", params=[("n", i32), ("a", f32), ("x", ptr_global), ("y", ptr_global)])
    n, a, x, y = b.params
    entry, body, done = b.block("entry"), b.block("body"), b.block("exit")
    b.set_block(entry)
    i = b.add(b.mul(b.block_id("x"), b.block_dim("x")), b.thread_id("x"), name="i")
    b.cbr(b.icmp("slt", i, n, name="inb"), body, done)
    b.set_block(body)
    px, py = b.offset(x, i, f32, name="px"), b.offset(y, i, f32, name="py")
    b.store(b.fadd(b.fmul(a, b.load(px, f32)), b.load(py, f32)), py)
    b.br(done)
    b.set_block(done)
    b.ret()
    return Module("saxpy", [b.finish()])


def big_kernel_text(n_ops: int) -> str:
    """A valid kernel of about ``n_ops`` ops: a long arithmetic chain spread over a loop."""
    lines = ["module @big", "kernel @big(%n: i32, %x: ptr<global>) {", "^entry:", "  %c0 = const 0 : i32",
             "  br ^loop(%c0)", "^loop(%i: i32):", "  %v0 = thread_id.x"]
    for k in range(1, n_ops - 9):
        op = ("add", "mul", "xor", "sub")[k % 4]
        lines.append(f"  %v{k} = {op} %v{k - 1}, %i : i32")
    last = n_ops - 10
    lines += [f"  %p = offset %x, %v{last} : i32", f"  store %v{last}, %p", "  %one = const 1 : i32",
              "  %i1 = add %i, %one : i32", "  %more = icmp slt %i1, %n", "  cbr %more, ^loop(%i1), ^exit",
              "^exit:", "  ret", "}"]
    return "\n".join(lines) + "\n"


def best_time(fn: Callable[[], T], repeat: int = 5) -> tuple[float, T]:
    """The fastest of ``repeat`` runs of ``fn`` (seconds) and its last result.

    Speed bounds in tests are about the code, not about a busy 2-core CI machine: the minimum
    over a few runs filters out scheduler and GC stalls without loosening the bound.
    """
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result
