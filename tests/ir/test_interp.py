"""The reference interpreter: op semantics at the edges (docs/ir.md §4), memory model, faults,
barriers and speed."""

from __future__ import annotations

import math
import struct
import time
from fractions import Fraction

import numpy as np
import pytest
from vxpu.ir.errors import IRError
from vxpu.ir.interp import InterpFault, Memory, run_kernel
from vxpu.ir.interp_ops import evaluator, int_to_float, round_fraction
from vxpu.ir.model import Module, Op, Param
from vxpu.ir.text import parse
from vxpu.ir.types import f16, f32, f64, i1, i8, i32, i64

from .irhelpers import build_saxpy

INF, NAN = math.inf, math.nan
I32MIN = 0x80000000


def ev(opcode: str, t, *args, src=None, pred=None):
    """Evaluate one op on interpreter values (ints as unsigned patterns)."""
    srct = src or t
    operands = [Param(srct if opcode != "select" or i else i1) for i in range(len(args))]
    if opcode in ("icmp", "fcmp"):
        op = Op(opcode, operands, pred=pred)
    elif opcode == "select":
        operands = [Param(i1), Param(t), Param(t)]
        op = Op(opcode, operands)
    else:
        op = Op(opcode, operands, type=t)
    fn = evaluator(op)
    assert fn is not None
    return fn(*args)


def same(a: float, b: float) -> bool:
    """Equal including the sign of zero; NaN equals NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1, a) == math.copysign(1, b)


# --- integer semantics -------------------------------------------------------------------------

@pytest.mark.parametrize("opcode,a,b,want", [
    ("add", 0xFFFFFFFF, 1, 0),
    ("sub", 0, 1, 0xFFFFFFFF),
    ("mul", 0x10000, 0x10000, 0),
    ("sdiv", 7, 0, 0),
    ("sdiv", I32MIN, 0xFFFFFFFF, I32MIN),
    ("sdiv", (-7) & 0xFFFFFFFF, 2, (-3) & 0xFFFFFFFF),
    ("udiv", 7, 0, 0),
    ("udiv", 0xFFFFFFFF, 2, 0x7FFFFFFF),
    ("srem", 7, 0, 7),
    ("srem", I32MIN, 0xFFFFFFFF, 0),
    ("srem", (-7) & 0xFFFFFFFF, 2, 0xFFFFFFFF),
    ("srem", 7, (-2) & 0xFFFFFFFF, 1),
    ("urem", 7, 0, 7),
    ("shl", 1, 31, I32MIN),
    ("shl", 1, 32, 0),
    ("shl", 1, 0xFFFFFFFF, 0),
    ("lshr", I32MIN, 31, 1),
    ("lshr", I32MIN, 32, 0),
    ("ashr", I32MIN, 31, 0xFFFFFFFF),
    ("ashr", I32MIN, 40, 0xFFFFFFFF),
    ("ashr", 0x40000000, 40, 0),
    ("smin", 0xFFFFFFFF, 1, 0xFFFFFFFF),
    ("umin", 0xFFFFFFFF, 1, 1),
    ("smax", 0xFFFFFFFF, 1, 1),
    ("umax", 0xFFFFFFFF, 1, 0xFFFFFFFF),
])
def test_integer_binary_edges(opcode, a, b, want):
    assert ev(opcode, i32, a, b) == want


def test_integer_unary_and_i1():
    assert ev("neg", i32, I32MIN) == I32MIN
    assert ev("abs", i32, I32MIN) == I32MIN
    assert ev("abs", i32, 0xFFFFFFFF) == 1
    assert ev("not", i8, 0x0F) == 0xF0
    # i1 read as signed: 1 is -1, so -1 / -1 = MIN / -1 -> MIN = 1; 1 + 1 wraps to 0.
    assert ev("sdiv", i1, 1, 1) == 1
    assert ev("add", i1, 1, 1) == 0
    assert ev("smin", i1, 0, 1) == 1


def test_comparisons():
    assert ev("icmp", i32, 0xFFFFFFFF, 1, pred="slt") == 1
    assert ev("icmp", i32, 0xFFFFFFFF, 1, pred="ult") == 0
    for pred, want in (("oeq", 0), ("une", 1), ("ord", 0), ("uno", 1), ("ult", 1), ("olt", 0), ("one", 0),
                       ("ueq", 1)):
        assert ev("fcmp", f32, NAN, 1.0, pred=pred) == want, pred
    assert ev("fcmp", f32, -0.0, 0.0, pred="oeq") == 1
    assert ev("select", f32, 1, 2.0, 3.0) == 2.0


# --- conversions -------------------------------------------------------------------------------

def test_conversions():
    assert ev("trunc", i8, 0x1FF, src=i32) == 0xFF
    assert ev("sext", i64, 0x80, src=i8) == 0xFFFFFFFFFFFFFF80
    assert ev("zext", i64, 0x80, src=i8) == 0x80
    assert ev("sext", i32, 1, src=i1) == 0xFFFFFFFF
    assert ev("fptosi", i32, 1e10, src=f32) == 0x7FFFFFFF
    assert ev("fptosi", i32, -1e10, src=f32) == I32MIN
    assert ev("fptosi", i32, NAN, src=f32) == 0
    assert ev("fptosi", i8, -3.9, src=f64) == (-3) & 0xFF
    assert ev("fptosi", i64, INF, src=f64) == 0x7FFFFFFFFFFFFFFF
    assert ev("fptoui", i32, -5.0, src=f32) == 0
    assert ev("fptoui", i32, 1e20, src=f64) == 0xFFFFFFFF
    assert ev("fptoui", i8, NAN, src=f16) == 0
    assert ev("uitofp", f32, 0xFFFFFFFF, src=i32) == 4294967296.0
    assert ev("sitofp", f32, 0xFFFFFFFF, src=i32) == -1.0
    assert same(ev("fptrunc", f16, 65520.0, src=f32), INF)   # rounds past the largest f16
    assert ev("fptrunc", f16, 65519.0, src=f32) == 65504.0
    assert ev("bitcast", i32, 1.0, src=f32) == 0x3F800000
    assert ev("bitcast", f32, 0xBF800000, src=i32) == -1.0


def test_int_to_float_rounds_once():
    # 2**60 + 2**36 + 1 is just above the f32 midpoint 2**60 + 2**36: it must round up, which
    # converting through f64 first (dropping the +1) would get wrong.
    v = (1 << 60) + (1 << 36) + 1
    assert int_to_float(v, 32) == float((1 << 60) + (1 << 37))
    assert int_to_float((1 << 60) + (1 << 36), 32) == float(1 << 60)   # tie: to even
    assert int_to_float(-(1 << 63), 64) == -(2.0 ** 63)


def test_round_fraction_matches_numpy():
    rng = np.random.default_rng(5)
    for bits, dtype in ((32, np.float32), (16, np.float16)):
        for x in np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-12, 12, 2000),
                                 rng.standard_normal(200) * 1e-42]):
            with np.errstate(all="ignore"):
                want = float(dtype(x))
            assert same(round_fraction(Fraction(float(x)), bits), want)


# --- floats --------------------------------------------------------------------------------------

def test_float_edges():
    assert same(ev("fdiv", f32, 1.0, -0.0), -INF)
    assert math.isnan(ev("fdiv", f32, 0.0, 0.0))
    assert same(ev("fadd", f32, 16777216.0, 1.0), 16777216.0)     # f32 rounding
    assert ev("fadd", f16, 2048.0, 1.0) == 2048.0
    assert same(ev("frem", f32, -5.5, 2.0), -1.5)
    assert math.isnan(ev("frem", f32, 1.0, 0.0))
    assert math.isnan(ev("frem", f32, INF, 1.0))
    assert ev("frem", f32, 3.0, INF) == 3.0
    assert ev("fmin", f32, NAN, 2.0) == 2.0 and ev("fmax", f32, 3.0, NAN) == 3.0
    assert math.isnan(ev("fmin", f32, NAN, NAN))
    assert same(ev("floor", f32, -0.5), -1.0) and same(ev("ceil", f32, -0.5), -0.0)
    assert same(ev("rint", f32, 2.5), 2.0) and same(ev("rint", f32, -0.5), -0.0) and ev("rint", f64, 3.5) == 4.0
    assert same(ev("rint", f16, -INF), -INF) and math.isnan(ev("rint", f64, NAN))
    assert same(ev("fneg", f32, 0.0), -0.0) and same(ev("fabs", f32, -0.0), 0.0)
    assert math.isnan(ev("sqrt", f32, -1.0)) and same(ev("sqrt", f32, -0.0), -0.0)
    assert same(ev("log", f32, 0.0), -INF) and math.isnan(ev("log", f32, -1.0))
    assert same(ev("exp", f32, 1000.0), INF) and ev("exp", f32, -1000.0) == 0.0
    assert same(ev("pow", f64, -0.0, -3.0), -INF) and same(ev("pow", f64, 0.0, -2.0), INF)
    assert math.isnan(ev("pow", f64, -8.0, 1 / 3)) and ev("pow", f64, NAN, 0.0) == 1.0
    assert same(ev("pow", f64, -10.0, 309.0), -INF)
    assert same(ev("rsqrt", f32, -0.0), -INF) and ev("rsqrt", f32, 4.0) == 0.5


def test_fma_single_rounding():
    rng = np.random.default_rng(7)
    for bits, dtype in ((32, np.float32), (64, np.float64)):
        for _ in range(300):
            a, b, c = (float(dtype(v)) for v in rng.standard_normal(3))
            want = round_fraction(Fraction(a) * Fraction(b) + Fraction(c), bits)
            assert ev("fma", f32 if bits == 32 else f64, a, b, c) == want
    # The classic case: a*b+c where rounding a*b first loses the answer.
    a = 1.0 + 2.0 ** -30
    assert ev("fma", f64, a, a, -(1.0 + 2.0 ** -29)) == 2.0 ** -60
    assert same(ev("fma", f64, 1e-200, -1e-200, 0.0), -0.0)   # exact tiny product keeps its sign
    assert same(ev("fma", f32, 2.0, 3.0, -6.0), 0.0)


# --- kernels ---------------------------------------------------------------------------------------

def _memory_kernel(body: str, params: str = "%p: ptr<global>") -> Module:
    return parse(f"module @m\nkernel @k({params}) {{\n^entry:\n{body}\n}}\n")


def test_saxpy_256_threads_is_fast_and_exact():
    m = build_saxpy()
    mem = Memory()
    x = np.arange(256, dtype=np.float32)
    y = np.ones(256, np.float32)
    px, py = mem.upload(x), mem.upload(y)
    t0 = time.perf_counter()
    run_kernel(m, "saxpy", 1, 256, [256, 0.5, px, py], mem)
    assert time.perf_counter() - t0 < 0.5
    assert np.array_equal(mem.read(py, np.float32, 256), np.float32(0.5) * x + y)


def test_geometry_3d():
    m = parse("""module @m
kernel @k(%out: ptr<global>) {
^entry:
  %tx = thread_id.x
  %ty = thread_id.y
  %tz = thread_id.z
  %bx = block_id.x
  %by = block_id.y
  %gx = grid_dim.x
  %dx = block_dim.x
  %dy = block_dim.y
  %dz = block_dim.z
  %t0 = mul %tz, %dy : i32
  %t1 = add %t0, %ty : i32
  %t2 = mul %t1, %dx : i32
  %tid = add %t2, %tx : i32
  %b0 = mul %by, %gx : i32
  %bid = add %b0, %bx : i32
  %per0 = mul %dx, %dy : i32
  %per = mul %per0, %dz : i32
  %g0 = mul %bid, %per : i32
  %g = add %g0, %tid : i32
  %p = offset %out, %g : i32
  store %g, %p
  ret
}
""")
    mem = Memory()
    out = mem.alloc(4 * 2 * 3 * 24)
    run_kernel(m, "k", (2, 3), (2, 3, 4), [out], mem)
    assert np.array_equal(mem.read(out, np.int32, 144), np.arange(144, dtype=np.int32))


@pytest.mark.parametrize("body,match", [
    ("  %c = const 100000 : i32\n  %q = offset %p, %c : i32\n  %v = load %q : i32\n  ret", "out of bounds"),
    ("  %c = const 1 : i32\n  %q = byte_offset %p, %c\n  %v = load %q : i32\n  ret", "misaligned"),
    ("  trap", "trap"),
])
def test_faults(body, match):
    mem = Memory()
    buf = mem.alloc(16)
    with pytest.raises(InterpFault, match=match):
        run_kernel(_memory_kernel(body), "k", 1, 1, [buf], mem)


def test_strict_memory_catches_overrun_into_the_next_buffer():
    mem = Memory()
    a, b = mem.alloc(16), mem.alloc(16)
    assert b - a == 256 and a >= mem.guard and a % 256 == 0
    body = "  %c = const 4 : i32\n  %q = offset %p, %c : i32\n  %v = load %q : i32\n  ret"
    with pytest.raises(InterpFault, match="out of bounds"):
        run_kernel(_memory_kernel(body), "k", 1, 1, [a], mem)
    loose = Memory(strict=False)
    a2 = loose.alloc(16)
    run_kernel(_memory_kernel(body), "k", 1, 1, [a2], loose)      # inside the arena: fine
    with pytest.raises(InterpFault):
        run_kernel(_memory_kernel("  %v = load %p : i32\n  ret"), "k", 1, 1, [0], loose)   # null


def test_non_uniform_barrier_faults():
    m = parse("""module @m
kernel @k(%p: ptr<global>) {
^entry:
  %t = thread_id.x
  %z = const 0 : i32
  %c = icmp eq %t, %z
  cbr %c, ^a, ^b
^a:
  barrier
  br ^b
^b:
  ret
}
""")
    with pytest.raises(InterpFault, match="non-uniform barrier"):
        run_kernel(m, "k", 1, 4, [0], Memory())


def test_shared_local_and_atomics():
    m = parse("""module @m
kernel @k(%out: ptr<global>) {
  shared @s: i32[4]
  local @l: i32[2]
^entry:
  %t = thread_id.x
  %one = const 1 : i32
  %sp = shared_addr @s
  %old = atomic_add %sp, %one : i32
  %s1 = offset %sp, %one : i32
  %mx = atomic_smax %s1, %t : i32
  %two = const 2 : i32
  %s2 = offset %sp, %two : i32
  %z = const 0 : i32
  %cas = atomic_cas %s2, %z, %t : i32
  %lp = local_addr @l
  %lv = load %lp : i32
  %lv1 = add %lv, %t : i32
  store %lv1, %lp
  %back = load %lp : i32
  barrier
  %c = icmp eq %t, %z
  cbr %c, ^w, ^e
^w:
  %a = load %sp : i32
  %b = load %s1 : i32
  %d = load %s2 : i32
  store %a, %out
  %o1 = offset %out, %one : i32
  store %b, %o1
  %o2 = offset %out, %two : i32
  store %d, %o2
  br ^e
^e:
  ret
}
""")
    mem = Memory()
    out = mem.alloc(12)
    run_kernel(m, "k", 1, 8, [out], mem)
    # 8 increments; max thread id 7; the first CAS (thread 0 writes 0) keeps 0, then thread 1 wins.
    assert list(mem.read(out, np.int32, 3)) == [8, 7, 1]


def test_float_atomics_follow_thread_order():
    m = parse("""module @m
kernel @k(%out: ptr<global>, %x: ptr<global>) {
^entry:
  %t = thread_id.x
  %px = offset %x, %t : f32
  %v = load %px : f32
  %old = atomic_fadd %out, %v : f32
  ret
}
""")
    vals = np.array([1e8, 1.0, -1e8, 1.0], np.float32)
    mem = Memory()
    out, x = mem.upload(np.zeros(1, np.float32)), mem.upload(vals)
    run_kernel(m, "k", 1, 4, [out, x], mem)
    want = np.float32(0)
    for v in vals:
        want = np.float32(want + v)
    assert mem.read(out, np.float32, 1)[0] == want == 1.0


def test_arguments_are_checked():
    m = build_saxpy()
    mem = Memory()
    with pytest.raises(IRError, match="takes 4 arguments"):
        run_kernel(m, "saxpy", 1, 1, [1], mem)
    with pytest.raises(IRError, match="does not fit"):
        run_kernel(m, "saxpy", 1, 1, [1 << 40, 1.0, 0, 0], mem)
    with pytest.raises(IRError, match="more than 1024"):
        run_kernel(m, "saxpy", 1, (64, 32), [1, 1.0, 0, 0], mem)
    with pytest.raises(IRError, match="grid"):
        run_kernel(m, "saxpy", 0, 1, [1, 1.0, 0, 0], mem)
    with pytest.raises(IRError, match="no kernel"):
        run_kernel(m, "nope", 1, 1, [], mem)


def test_step_limit_stops_endless_loops():
    m = _memory_kernel("  br ^loop\n^loop:\n  br ^loop")
    with pytest.raises(InterpFault, match="step limit"):
        run_kernel(m, "k", 1, 1, [0], Memory(), step_limit=1000)


def test_memory_api_errors():
    mem = Memory(1 << 17)
    with pytest.raises(IRError, match="full"):
        mem.alloc(1 << 20)
    with pytest.raises(IRError, match="positive"):
        mem.alloc(0)
    with pytest.raises(IRError, match="outside"):
        mem.read(mem.size - 2, np.int32, 1)
    with pytest.raises(IRError):
        Memory(100, guard=200)


def test_kernel_values_round_to_param_type():
    m = parse("""module @m
kernel @k(%a: f16, %out: ptr<global>) {
^entry:
  store %a, %out
  ret
}
""")
    mem = Memory()
    out = mem.alloc(2)
    run_kernel(m, "k", 1, 1, [0.1, out], mem)
    assert mem.read(out, np.float16, 1)[0] == np.float16(0.1)
    assert struct.unpack("<e", np.float16(0.1).tobytes())[0] == float(np.float16(0.1))


RACY = """module @m
kernel @k(%out: ptr<global>) {
  shared @s: i32[4]
^entry:
  %t = thread_id.x
  %sp = shared_addr @s
  %z = const 0 : i32
  store %t, %sp
  SYNC
  %v = load %sp : i32
  %p = offset %out, %t : i32
  store %v, %p
  ret
}
"""


def test_race_detection():
    mem = Memory()
    out = mem.alloc(64)
    # Every thread writes s[0] in the same round: a write-write race.
    with pytest.raises(InterpFault, match="data race on shared"):
        run_kernel(parse(RACY.replace("SYNC", "")), "k", 1, 4, [out], mem, detect_races=True)
    # Without tracking the result is just one of the values.
    run_kernel(parse(RACY.replace("SYNC", "")), "k", 1, 4, [out], mem)
    # A barrier between the writes and the reads does not help the writes themselves.
    with pytest.raises(InterpFault, match="thread 0 of block 0 wrote"):
        run_kernel(parse(RACY.replace("SYNC", "barrier")), "k", 1, 4, [out], mem, detect_races=True)
    # One writer, a barrier, then everyone reads: race-free.
    fine = RACY.replace("  store %t, %sp\n  SYNC", "  %c = icmp eq %t, %z\n  cbr %c, ^w, ^r\n^w:\n  store %t, %sp\n"
                        "  br ^r\n^r:\n  barrier")
    run_kernel(parse(fine), "k", 1, 4, [out], mem, detect_races=True)
    # Blocks are never ordered: two blocks writing out[t] race in global memory.
    with pytest.raises(InterpFault, match="data race on global"):
        run_kernel(parse(fine), "k", 2, 4, [out], mem, detect_races=True)
