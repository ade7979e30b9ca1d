"""Valid-looking IR modules whose shape makes LLVM slow or crash (issue 7).

Each builder returns a :class:`~vxpu.ir.model.Module` made with the builder API but *not*
verified, so a shape past the complexity limits can still be built, encoded and sent. The
verifier (and the decoder, for counts) must refuse them in milliseconds; below the limits the
same builders give realistic worst cases to time the compiler with.

* :func:`loop_nest` — ``depth`` loops, each inside the previous one (2000 levels encode to
  about 60 KB; such a module crashed LLVM's optimiser with SIGSEGV after about 280 s);
* :func:`straight_line` — one block of ``n_ops`` dependent integer ops (65,000 took 2.7 s);
* :func:`branch_chain` — ``n_blocks`` blocks, each branching to the next or to the exit
  (16,000 took 6.2 s);
* :func:`many_kernels` — ``count`` straight-line kernels of ``ops_each`` ops (256 × 1,000 took
  15.8 s and 683 MiB);
* :func:`phi_fan_in` — one block with a parameter reached from ``n_preds`` branches.

:func:`front_end_seconds` times what a server spends on an encoded shape before its compile
worker's deadline starts, so a deadline test can allow for it on a slow machine.
"""

from __future__ import annotations

import time

from vxpu.ir.binary import decode
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.hashing import module_hash
from vxpu.ir.model import Kernel, Module
from vxpu.ir.types import i32, ptr_global

__all__ = ["branch_chain", "front_end_seconds", "loop_nest", "many_kernels", "phi_fan_in", "straight_line"]


def loop_nest(depth: int, name: str = "nest") -> Module:
    """``depth`` counted loops, each inside the previous one, one block per level.

    Level ``L``'s block is its loop header: it enters level ``L+1`` with a zero counter, or
    leaves to level ``L-1`` with that level's counter incremented (so it is also the latch of
    the loop one level out). The innermost level loops through a body that stores its counter.
    """
    b = KernelBuilder(name, params=[("n", i32), ("x", ptr_global)])
    n, x = b.params
    entry = b.block("entry")
    heads = [b.block(f"h{i}", [(f"i{i}", i32)]) for i in range(max(1, depth))]
    body, done = b.block("body"), b.block("done")
    b.set_block(entry)
    zero, one = b.const(0, i32), b.const(1, i32)
    b.br(heads[0], zero)
    for level, head in enumerate(heads):
        b.set_block(head)
        more = b.icmp("slt", head.params[0], n)
        if level:
            out, out_args = heads[level - 1], [b.add(heads[level - 1].params[0], one)]
        else:
            out, out_args = done, []
        if level + 1 < len(heads):
            b.cbr(more, heads[level + 1], out, [zero], out_args)
        else:
            b.cbr(more, body, out, [], out_args)
    b.set_block(body)
    b.store(heads[-1].params[0], x)
    b.br(heads[-1], b.add(heads[-1].params[0], one))
    b.set_block(done)
    b.ret()
    return Module(name, [b.kernel])


def _straight_kernel(name: str, n_ops: int) -> Kernel:
    b = KernelBuilder(name, params=[("n", i32), ("x", ptr_global)])
    n, x = b.params
    b.set_block(b.block("entry"))
    v = b.thread_id("x")
    steps = (b.add, b.mul, b.xor, b.sub)
    for k in range(max(0, n_ops - 3)):
        v = steps[k % 4](v, n)
    b.store(v, x)
    b.ret()
    return b.kernel


def straight_line(n_ops: int, name: str = "line") -> Module:
    """One kernel, one block, about ``n_ops`` ops: a dependent chain of integer arithmetic."""
    return Module(name, [_straight_kernel(name, n_ops)])


def branch_chain(n_blocks: int, name: str = "chain") -> Module:
    """``n_blocks`` blocks, each adding, comparing and branching to the next block or the exit."""
    b = KernelBuilder(name, params=[("n", i32), ("x", ptr_global)])
    n, x = b.params
    blocks = [b.block(f"b{i}") for i in range(max(1, n_blocks - 1))]
    done = b.block("done")
    v = n
    for i, blk in enumerate(blocks):
        b.set_block(blk)
        v = b.add(v, n)
        b.cbr(b.icmp("slt", v, n), blocks[i + 1] if i + 1 < len(blocks) else done, done)
    b.set_block(done)
    b.store(n, x)
    b.ret()
    return Module(name, [b.kernel])


def many_kernels(count: int, ops_each: int, name: str = "many") -> Module:
    """``count`` straight-line kernels of about ``ops_each`` ops each."""
    return Module(name, [_straight_kernel(f"k{i}", ops_each) for i in range(count)])


def phi_fan_in(n_preds: int, name: str = "fanin") -> Module:
    """A join block with one parameter, reached by ``n_preds`` branch edges (a switch ladder)."""
    b = KernelBuilder(name, params=[("n", i32), ("x", ptr_global)])
    n, x = b.params
    tests = [b.block(f"t{i}") for i in range(max(1, n_preds - 1))]
    join = b.block("join", [("v", i32)])
    b.set_block(tests[0])
    for i, blk in enumerate(tests):
        if i:
            b.set_block(blk)
        c = b.icmp("eq", n, i)
        if i + 1 < len(tests):
            b.cbr(c, join, tests[i + 1], [i], [])
        else:
            b.cbr(c, join, join, [i], [i + 1])
    b.set_block(join)
    b.store(join.params[0], x)
    b.ret()
    return Module(name, [b.kernel])


def front_end_seconds(data: bytes) -> float:
    """Seconds MODULE_LOAD spends on the wire form ``data`` before the compile worker's deadline
    starts: decoding and verifying it and hashing the module, as the server does (0.4 s for
    ``many_kernels(4, 8192)`` on this project's 2-core machine, more on a loaded CI core)."""
    start = time.monotonic()
    module_hash(decode(data))
    return time.monotonic() - start
