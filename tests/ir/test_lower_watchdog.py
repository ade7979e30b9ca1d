"""The x86 lowering's cancellation check: where it is emitted, that it stops every kind of
non-terminating kernel (IR loops of any shape, loops between barriers, huge grids), and that
it changes no result."""

from __future__ import annotations

import re
import struct
import threading
import time

import numpy as np
import pytest
from vxpu.ir import cpu_exec, text
from vxpu.ir.lower import x86 as x86_lower

# Cancels arrive from a timer; every kernel below would otherwise run for ever (or hours).
CANCEL_AFTER = 0.2
PROMPT = 2.0

SPIN = """
module @spin
kernel @spin(%n: i32) {
^entry:
  br ^loop
^loop:
  br ^loop
}
"""

# Counts up until i == n: with n < 0 and a step of 2 from 1 (odd values) it never gets there.
COUNTER = """
module @counter
kernel @counter(%n: i32, %out: ptr<global>) {
^entry:
  %one = const 1 : i32
  br ^head(%one)
^head(%i: i32):
  %done = icmp eq %i, %n
  cbr %done, ^exit, ^body
^body:
  %two = const 2 : i32
  %j = add %i, %two : i32
  br ^head(%j)
^exit:
  %t = thread_id.x
  %p = offset %out, %t : i32
  store %i, %p
  ret
}
"""

# Two blocks that jump into each other's middle: a cycle with two entries (irreducible).
IRREDUCIBLE = """
module @irr
kernel @irr(%n: i32) {
^entry:
  %z = const 0 : i32
  %c = icmp slt %n, %z
  cbr %c, ^a, ^b
^a:
  br ^b
^b:
  br ^a
}
"""

# Nested loops: the inner one finishes, the outer one never does.
NESTED = """
module @nested
kernel @nested(%n: i32) {
^entry:
  %z = const 0 : i32
  br ^outer(%z)
^outer(%i: i32):
  br ^inner(%z)
^inner(%j: i32):
  %one = const 1 : i32
  %k = add %j, %one : i32
  %more = icmp slt %k, %n
  cbr %more, ^inner(%k), ^outer(%i)
}
"""

# Threads loop for ever between two barriers (every thread spins, so the barrier is uniform).
BARRIER_SPIN = """
module @bspin
kernel @bspin(%n: i32) {
  shared @s: i32[64]
^entry:
  barrier
  br ^loop
^loop:
  %t = thread_id.x
  %z = const 0 : i32
  %stop = icmp slt %n, %z
  cbr %stop, ^out, ^loop
^out:
  barrier
  ret
}
"""

# A loop around a barrier that never ends: each region returns to the driver, which resumes.
BARRIER_LOOP = """
module @bloop
kernel @bloop(%n: i32) {
^entry:
  br ^loop
^loop:
  barrier
  br ^loop
}
"""

# out[t] = sum of 0..n-1: a counted loop (versioned on x86) that must still give its result.
SUM = """
module @sum
kernel @sum(%n: i32, %out: ptr<global>) {
^entry:
  %z = const 0 : i32
  %one = const 1 : i32
  br ^head(%z, %z)
^head(%i: i32, %acc: i32):
  %more = icmp slt %i, %n
  cbr %more, ^body, ^exit
^body:
  %acc2 = add %acc, %i : i32
  %i2 = add %i, %one : i32
  br ^head(%i2, %acc2)
^exit:
  %t = thread_id.x
  %p = offset %out, %t : i32
  store %acc, %p
  ret
}
"""

# No IR loop at all: only the driver's per-thread check can stop a grid of 2^31 blocks.
STRAIGHT = """
module @straight
kernel @straight(%n: i32) {
^entry:
  ret
}
"""


def _kernel(source: str) -> cpu_exec.CpuKernel:
    module = text.parse(source)
    return cpu_exec.load(module).kernel(module.kernels[0].name)


def _run_cancelled(kernel: cpu_exec.CpuKernel, grid: tuple[int, ...], block: tuple[int, ...], args: bytes,
                   base: int = 0, size: int = 0) -> cpu_exec.KernelFault:
    token = cpu_exec.CancelToken()
    timer = threading.Timer(CANCEL_AFTER, token.cancel)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(cpu_exec.KernelFault) as info:
            kernel.run(grid, block, args, base, size, cancel=token)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < PROMPT
    assert info.value.code == cpu_exec.FAULT_CANCELLED
    assert "cancelled by the host" in str(info.value)
    return info.value


def _headers(source: str) -> list[str]:
    return [b.name for b in x86_lower.loop_headers(text.parse(source).kernels[0])]


def test_loop_headers_are_the_targets_of_retreating_edges():
    assert _headers(SPIN) == ["loop"]
    assert _headers(COUNTER) == ["head"]
    assert sorted(_headers(NESTED)) == ["inner", "outer"]
    assert len(_headers(IRREDUCIBLE)) == 1          # one of the two entries of the cycle
    assert _headers(STRAIGHT) == [] and _headers(VADD_LIKE) == []


VADD_LIKE = """
module @v
kernel @v(%n: i32) {
^entry:
  %t = thread_id.x
  %ok = icmp slt %t, %n
  cbr %ok, ^a, ^b
^a:
  br ^b
^b:
  ret
}
"""


@pytest.mark.parametrize("source", [SPIN, COUNTER, NESTED, IRREDUCIBLE, SUM, BARRIER_LOOP, STRAIGHT])
def test_every_header_and_the_thread_loop_load_the_cancel_word(source):
    mod, _ = x86_lower.lower_module(text.parse(source))
    llvm = str(mod)
    checks = re.findall(r"load atomic volatile i32, i32\* %\S+ unordered, align 4\n", llvm)
    kernel = text.parse(source).kernels[0]
    headers = len(x86_lower.loop_headers(kernel))
    # A versioned counted loop is emitted twice (fast and wrapping copies): both are checked.
    copies = 2 if "loop.version" in llvm else 1
    assert (copies == 2) == (source is SUM)
    assert len(checks) == headers * copies + 1      # + the driver's per-thread check
    assert f"ret i32 -{x86_lower.FAULT_CANCELLED}" in llvm if headers else True


def test_infinite_self_loop_is_cancelled():
    fault = _run_cancelled(_kernel(SPIN), (4,), (32,), struct.pack("<i", 0))
    assert fault.block == (0, 0, 0) and fault.address == 0


def test_loop_whose_exit_is_never_met_is_cancelled():
    _run_cancelled(_kernel(COUNTER), (1,), (8,), struct.pack("<i4xQ", -2, 0))


def test_irreducible_and_nested_loops_are_cancelled():
    _run_cancelled(_kernel(IRREDUCIBLE), (1,), (1,), struct.pack("<i", -1))
    _run_cancelled(_kernel(IRREDUCIBLE), (1,), (1,), struct.pack("<i", 1))
    _run_cancelled(_kernel(NESTED), (2,), (2,), struct.pack("<i", 1000))


def test_loops_between_and_around_barriers_are_cancelled():
    _run_cancelled(_kernel(BARRIER_SPIN), (2,), (64,), struct.pack("<i", 0))
    _run_cancelled(_kernel(BARRIER_LOOP), (2,), (64,), struct.pack("<i", 0))


def test_a_huge_grid_of_short_threads_is_cancelled():
    _run_cancelled(_kernel(STRAIGHT), (0x7FFFFFFF, 1 << 20, 1), (1024,), struct.pack("<i", 0))


def test_a_set_token_stops_the_launch_at_once_and_reset_rearms_it():
    k = _kernel(SUM)
    out = np.zeros(64, np.int32)
    token = cpu_exec.CancelToken()
    token.cancel()
    assert token.cancelled
    with pytest.raises(cpu_exec.KernelFault) as info:
        k.run((1,), (4,), struct.pack("<i4xQ", 10, 0), out.ctypes.data, out.nbytes, cancel=token)
    assert info.value.code == cpu_exec.FAULT_CANCELLED and not out.any()
    token.reset()
    k.run((1,), (4,), struct.pack("<i4xQ", 10, 0), out.ctypes.data, out.nbytes, cancel=token)
    assert list(out[:4]) == [45] * 4


def test_concurrent_block_ranges_share_one_token():
    k = _kernel(SPIN)
    token = cpu_exec.CancelToken()
    faults: list[BaseException] = []

    def part(blocks: range) -> None:
        try:
            k.run((8,), (4,), struct.pack("<i", 0), 0, 0, blocks=blocks, cancel=token)
        except cpu_exec.KernelFault as exc:
            faults.append(exc)

    threads = [threading.Thread(target=part, args=(r,)) for r in (range(4), range(4, 8))]
    for t in threads:
        t.start()
    time.sleep(CANCEL_AFTER)
    token.cancel()
    for t in threads:
        t.join(PROMPT)
    assert not any(t.is_alive() for t in threads)
    assert sorted(f.block[0] for f in faults) == [0, 4]         # each range stopped in its first block


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003])
def test_results_unchanged_with_a_token(n):
    k = _kernel(SUM)
    out = np.zeros(32, np.int32)
    with_token = cpu_exec.CancelToken()
    k.run((1,), (32,), struct.pack("<i4xQ", n, 0), out.ctypes.data, out.nbytes, cancel=with_token)
    first = out.copy()
    out[:] = 0
    k.run((1,), (32,), struct.pack("<i4xQ", n, 0), out.ctypes.data, out.nbytes)
    expected = (n * (n - 1) // 2 + (1 << 31)) % (1 << 32) - (1 << 31)     # i32 arithmetic wraps
    assert np.array_equal(first, out) and (out == expected).all()


def _counted(ty: str, start: str, bound: str, step: str, back_from_exit: bool = False) -> str:
    """``for (i = start; i < bound; i += step)`` (start/bound/step: constants or the param %p)."""
    consts = "".join(f"  %{name} = const {value} : {ty}\n" for name, value in
                     (("start", start), ("bound", bound), ("step", step)) if value != "%p")
    names = {v: ("%p" if v == "%p" else f"%{k}") for k, v in (("start", start), ("bound", bound), ("step", step))}
    exit_branch = "br ^head(%next)" if back_from_exit else "ret"
    return f"""
module @counted
kernel @counted(%p: {ty}) {{
^entry:
{consts}  br ^head({names[start]})
^head(%i: {ty}):
  %more = icmp slt %i, {names[bound]}
  cbr %more, ^body, ^out
^body:
  %next = add %i, {names[step]} : {ty}
  br ^head(%next)
^out:
  %next2 = add %i, {names[step]} : {ty}
  {exit_branch.replace('%next', '%next2')}
}}
"""


def test_small_constant_trip_loops_need_no_check():
    assert _headers(_counted("i32", "0", "16", "1")) == []
    assert _headers(_counted("i8", "-100", "100", "3")) == []
    sgemm = next(k for k in __import__("vxpu.ir.samples", fromlist=["SAMPLES"]).SAMPLES["sgemm"].module().kernels)
    assert [b.name for b in x86_lower.loop_headers(sgemm)] == ["slab"]      # the 16-step tile loop is exempt


@pytest.mark.parametrize("start,bound,step,why", [
    ("%p", "16", "1", "start not constant"),
    ("0", "%p", "1", "bound not constant"),
    ("0", "16", "%p", "step not constant"),
    ("0", "16", "0", "step 0 never advances"),
    ("0", "16", "-1", "negative step"),
    ("0", "1000000", "1", "too many trips to skip the check"),
])
def test_loops_that_are_not_provably_short_keep_their_check(start, bound, step, why):
    assert _headers(_counted("i32", start, bound, step)) == ["head"], why


def test_near_misses_that_really_spin_are_checked_and_cancelled():
    # i8: 0, 2, ..., 126, then 128 wraps to -128 < 127: never exits.
    wrap = _counted("i8", "0", "127", "2")
    # The exit edge jumps back into the header: the count wraps and the loop never ends.
    reenter = _counted("i32", "0", "16", "1", back_from_exit=True)
    for source in (wrap, reenter):
        assert _headers(source) == ["head"]
        _run_cancelled(_kernel(source), (1,), (1,), struct.pack("<i", 1))


# Two 4-step loops whose exits jump into each other: the cycle through both must keep a check.
PING_PONG = """
module @pingpong
kernel @pingpong(%p: i32) {
^entry:
  %z = const 0 : i32
  %four = const 4 : i32
  %one = const 1 : i32
  br ^h1(%z)
^h1(%i: i32):
  %m1 = icmp slt %i, %four
  cbr %m1, ^b1, ^h2(%z)
^b1:
  %i2 = add %i, %one : i32
  br ^h1(%i2)
^h2(%j: i32):
  %m2 = icmp slt %j, %four
  cbr %m2, ^b2, ^h1(%z)
^b2:
  %j2 = add %j, %one : i32
  br ^h2(%j2)
}
"""

# An endless outer loop around a 16-step inner loop: the inner is exempt, the outer checked.
OUTER_SPIN = """
module @outer
kernel @outer(%p: i32) {
^entry:
  %z = const 0 : i32
  %sixteen = const 16 : i32
  %one = const 1 : i32
  br ^outer
^outer:
  br ^inner(%z)
^inner(%k: i32):
  %more = icmp slt %k, %sixteen
  cbr %more, ^step, ^outer
^step:
  %k2 = add %k, %one : i32
  br ^inner(%k2)
}
"""


def test_exempt_loops_never_form_an_unchecked_cycle():
    assert len(_headers(PING_PONG)) == 1
    assert _headers(OUTER_SPIN) == ["outer"]
    for source in (PING_PONG, OUTER_SPIN):
        _run_cancelled(_kernel(source), (2,), (2,), struct.pack("<i", 0))
