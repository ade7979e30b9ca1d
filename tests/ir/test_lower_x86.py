"""x86 lowering: sample kernels against numpy and the reference interpreter (bit for bit),
the IR's defined semantics at the edges, barriers, atomics, concurrency and the math library."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.interp import Memory
from vxpu.ir.model import Module
from vxpu.ir.types import f16, f32, f64, i8, i16, i32, i64, ptr_global

from tests.ir.lowerhelpers import cpu_module, differential, load_sample, pack_args, run_x86

RNG = np.random.default_rng(12345)


def _mem(size: int = 8 << 20) -> Memory:
    return Memory(size)


# ---------------------------------------------------------------------------- samples vs numpy


@pytest.mark.parametrize("n", [1, 255, 1000, 70001])
def test_vector_add_and_saxpy(n: int) -> None:
    mem = _mem()
    a, b = RNG.standard_normal(n, dtype=np.float32), RNG.standard_normal(n, dtype=np.float32)
    pa, pb, pc = mem.upload(a), mem.upload(b), mem.upload(np.full(n, np.nan, np.float32))
    grid = ((n + 255) // 256,)
    run_x86(load_sample("vector_add"), "vector_add", grid, (256,), [n, pa, pb, pc], mem)
    np.testing.assert_array_equal(mem.read(pc, np.float32, n), a + b)
    run_x86(load_sample("saxpy"), "saxpy", grid, (256,), [n, 1.5, pa, pb], mem)
    np.testing.assert_array_equal(mem.read(pb, np.float32, n), np.float32(1.5) * a + b)


@pytest.mark.parametrize("w,h", [(1, 1), (17, 5), (130, 67)])
def test_stencil2d(w: int, h: int) -> None:
    mem = _mem()
    src = RNG.standard_normal((h, w), dtype=np.float32)
    ps, pd = mem.upload(src), mem.upload(np.full((h, w), np.nan, np.float32))
    cc, cn = np.float32(0.5), np.float32(0.125)
    run_x86(load_sample("stencil2d"), "stencil5", ((w + 15) // 16, (h + 15) // 16), (16, 16),
            [w, h, float(cc), float(cn), ps, pd], mem)
    want = src.copy()
    c = src[1:-1, 1:-1]
    want[1:-1, 1:-1] = cc * c + cn * ((src[1:-1, :-2] + src[1:-1, 2:]) + (src[:-2, 1:-1] + src[2:, 1:-1]))
    np.testing.assert_array_equal(mem.read(pd, np.float32, w * h).reshape(h, w), want)


@pytest.mark.parametrize("n", [1, 256, 4099])
def test_dot_and_histogram(n: int) -> None:
    mem = _mem()
    x, y = RNG.standard_normal(n, dtype=np.float32), RNG.standard_normal(n, dtype=np.float32)
    px, py, po = mem.upload(x), mem.upload(y), mem.upload(np.zeros(1, np.float32))
    run_x86(load_sample("dot"), "dot", ((n + 255) // 256,), (256,), [n, px, py, po], mem)
    want = float(np.dot(x.astype(np.float64), y))
    assert mem.read(po, np.float32, 1)[0] == pytest.approx(want, rel=1e-4, abs=1e-4)
    data = RNG.integers(0, 1 << 31, n, dtype=np.int32)
    pdata, ph = mem.upload(data), mem.upload(np.zeros(37, np.int32))
    run_x86(load_sample("histogram"), "histogram", (min((n + 255) // 256, 64),), (256,), [n, 37, pdata, ph], mem)
    np.testing.assert_array_equal(mem.read(ph, np.int32, 37), np.bincount(data % 37, minlength=37))


@pytest.mark.parametrize("m,n,k", [(16, 16, 16), (33, 17, 45)])
def test_sgemm(m: int, n: int, k: int) -> None:
    mem = _mem()
    a, b = RNG.standard_normal((m, k), dtype=np.float32), RNG.standard_normal((k, n), dtype=np.float32)
    pa, pb, pc = mem.upload(a), mem.upload(b), mem.upload(np.full((m, n), np.nan, np.float32))
    run_x86(load_sample("sgemm"), "sgemm", ((n + 15) // 16, (m + 15) // 16), (16, 16), [m, n, k, pa, pb, pc], mem)
    np.testing.assert_allclose(mem.read(pc, np.float32, m * n).reshape(m, n), a.astype(np.float64) @ b,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 300), (5, 1000)])
def test_softmax(rows: int, cols: int) -> None:
    mem = _mem()
    x = (RNG.standard_normal((rows, cols)) * 4).astype(np.float32)
    px, py = mem.upload(x), mem.upload(np.full((rows, cols), np.nan, np.float32))
    run_x86(load_sample("softmax"), "softmax", (rows,), (256,), [rows, cols, px, py], mem)
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(mem.read(py, np.float32, rows * cols).reshape(rows, cols),
                               e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_scan_multi_block() -> None:
    mod = load_sample("scan")
    mem = _mem()
    n = 256 * 3 + 17
    data = RNG.integers(-1000, 1000, n, dtype=np.int32)
    g = (n + 255) // 256
    pin, pout, psums = mem.upload(data), mem.upload(np.zeros(n, np.int32)), mem.upload(np.zeros(g, np.int32))
    pscan, pdummy = mem.upload(np.zeros(g, np.int32)), mem.upload(np.zeros(1, np.int32))
    run_x86(mod, "scan_blocks", (g,), (256,), [n, pin, pout, psums], mem)
    run_x86(mod, "scan_blocks", (1,), (256,), [g, psums, pscan, pdummy], mem)
    run_x86(mod, "add_offsets", (g,), (256,), [n, pout, pscan], mem)
    np.testing.assert_array_equal(mem.read(pout, np.int32, n), np.cumsum(data, dtype=np.int64).astype(np.int32))


# ---------------------------------------------------------------------------- differential vs interpreter


def test_reduce_sample_bitwise_matches_interpreter() -> None:
    from vxpu.ir.text import parse

    from tests.ir.irhelpers import HERE

    mod = parse((HERE / "samples" / "reduce.vxir").read_text())
    mem = Memory(1 << 20)
    n = 700
    px = mem.upload(RNG.standard_normal(n, dtype=np.float32))
    pout = mem.upload(np.zeros(1, np.float32))
    a, b = differential(mod, "block_sum", (3,), (256,), [n, px, pout], mem)
    np.testing.assert_array_equal(a, b)


def _binop_kernel(op: str, t, rt=None) -> Module:  # type: ignore[no-untyped-def]
    """out[i] = op(a[i], b[i]) (or conversion/unary of a[i] when op is a conversion)."""
    rt = rt or t
    kb = KernelBuilder("k", [("n", i32), ("a", ptr_global), ("b", ptr_global), ("o", ptr_global)])
    n, pa, pb, po = kb.params
    e, body, done = kb.block("e"), kb.block("body"), kb.block("done")
    kb.set_block(e)
    i = kb.add(kb.mul(kb.block_id("x"), kb.block_dim("x")), kb.thread_id("x"))
    kb.cbr(kb.icmp("slt", i, n), body, done)
    kb.set_block(body)
    x = kb.load(kb.offset(pa, i, t), t)
    y = kb.load(kb.offset(pb, i, t), t)
    if op in ("fptosi", "fptoui", "sitofp", "uitofp", "trunc", "sext", "zext", "fptrunc", "fpext", "bitcast"):
        r = kb.convert(op, x, rt)
    elif op in ("neg", "not", "abs", "fneg", "fabs", "sqrt", "rsqrt", "exp", "exp2", "log", "log2", "sin", "cos",
                "tanh", "floor", "ceil", "rint"):
        r = kb.unary(op, x)
    else:
        r = getattr(kb, op if op not in ("and", "or") else op + "_")(x, y)
    kb.store(r, kb.offset(po, i, rt))
    kb.br(done)
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


_NP = {i8: np.int8, i16: np.int16, i32: np.int32, i64: np.int64, f16: np.float16, f32: np.float32, f64: np.float64}


def _edge_ints(t) -> np.ndarray:  # type: ignore[no-untyped-def]
    info = np.iinfo(_NP[t])
    vals = [0, 1, -1, 2, -2, 3, 7, info.min, info.max, info.min + 1, t.bits - 1, t.bits, t.bits + 1, 2 * t.bits,
            100, -100]
    return np.array(vals, dtype=_NP[t])


def _run_diff(mod: Module, a: np.ndarray, b: np.ndarray, out_dtype) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    n = a.size
    mem = Memory(1 << 20)
    pa, pb = mem.upload(a), mem.upload(b)
    po = mem.upload(np.zeros(n, out_dtype))
    ref, got = differential(mod, "k", ((n + 63) // 64,), (64,), [n, pa, pb, po], mem)
    size = n * np.dtype(out_dtype).itemsize
    return ref[po:po + size].view(out_dtype), got[po:po + size].view(out_dtype)


@pytest.mark.parametrize("t", [i8, i16, i32, i64])
@pytest.mark.parametrize("op", ["sdiv", "udiv", "srem", "urem", "shl", "lshr", "ashr", "add", "sub", "mul",
                                "smin", "umax"])
def test_integer_edges_match_interpreter(op: str, t) -> None:  # type: ignore[no-untyped-def]
    e = _edge_ints(t)
    a, b = np.repeat(e, e.size), np.tile(e, e.size)
    ref, got = _run_diff(_binop_kernel(op, t), a, b, _NP[t])
    np.testing.assert_array_equal(got, ref)


def test_integer_edges_explicit() -> None:
    imin = np.iinfo(np.int32).min
    a = np.array([7, imin, imin, -7, 5, 1, -8, -8], np.int32)
    b = np.array([0, -1, -1, 0, 32, 40, 33, 31], np.int32)
    _, q = _run_diff(_binop_kernel("sdiv", i32), a, b, np.int32)
    assert list(q[:4]) == [0, imin, imin, 0]
    _, r = _run_diff(_binop_kernel("srem", i32), a, b, np.int32)
    assert list(r[:4]) == [7, 0, 0, -7]
    _, s = _run_diff(_binop_kernel("shl", i32), a, b, np.int32)
    assert list(s[4:6]) == [0, 0]
    _, s = _run_diff(_binop_kernel("ashr", i32), a, b, np.int32)
    assert list(s[6:8]) == [-1, -1]
    _, s = _run_diff(_binop_kernel("lshr", i32), a, b, np.int32)
    assert s[6] == 0


@pytest.mark.parametrize("src,dst", [(f32, i32), (f64, i64), (f32, i8), (f16, i16), (f64, i32)])
@pytest.mark.parametrize("op", ["fptosi", "fptoui"])
def test_float_to_int_saturates(op: str, src, dst) -> None:  # type: ignore[no-untyped-def]
    vals = np.array([0.0, -0.0, 1.5, -1.5, 2.9, -2.9, np.nan, -np.nan, np.inf, -np.inf, 1e30, -1e30, 127.9,
                     -128.9, 65504.0, 3e9, -3e9, 2.0 ** 63, -(2.0 ** 63)], np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        a = vals.astype(_NP[src])
    ref, got = _run_diff(_binop_kernel(op, src, dst), a, a, _NP[dst])
    np.testing.assert_array_equal(got, ref)
    assert got[6] == 0 and got[7] == 0  # NaN -> 0
    info = np.iinfo(_NP[dst])
    hi = info.max if op == "fptosi" else np.iinfo(_NP[dst]).max * 2 + 1
    assert int(got[8]) == (hi if op == "fptosi" else -1 if info.min < 0 else hi) or op == "fptoui"
    if op == "fptosi":
        assert got[9] == info.min and got[10] == info.max and got[11] == info.min


@pytest.mark.parametrize("t", [f16, f32, f64])
@pytest.mark.parametrize("op", ["fadd", "fsub", "fmul", "fdiv", "frem", "fmin", "fmax", "pow", "sqrt", "rsqrt",
                                "floor", "ceil", "rint", "fneg", "fabs"])
def test_float_ops_match_interpreter(op: str, t) -> None:  # type: ignore[no-untyped-def]
    base = np.array([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.25, -7.5, 1e-3, 100.0, np.inf, -np.inf, np.nan], np.float64)
    a, b = np.repeat(base, base.size).astype(_NP[t]), np.tile(base, base.size).astype(_NP[t])
    ref, got = _run_diff(_binop_kernel(op, t), a, b, _NP[t])
    if op in ("pow", "rsqrt"):
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=4e-7 if t is f32 else
                                   (2e-3 if t is f16 else 1e-13), equal_nan=True)
    elif op in ("fmin", "fmax"):  # either zero may be returned for zeros of opposite sign
        assert_same_floats(got + _NP[t](0.0), ref + _NP[t](0.0))
    else:
        assert_same_floats(got, ref)


def assert_same_floats(got: np.ndarray, ref: np.ndarray) -> None:
    """Bitwise equal, except that any NaN equals any NaN (docs/ir.md: NaN sign/payload unspecified)."""
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    bits = f"u{got.dtype.itemsize}"
    np.testing.assert_array_equal(got[~nan].view(bits), ref[~nan].view(bits))


@pytest.mark.parametrize("t", [f32, f64])
def test_frem_is_exact(t) -> None:  # type: ignore[no-untyped-def]
    dt = _NP[t]
    a = (RNG.standard_normal(3000) * 10.0 ** RNG.integers(-30, 30, 3000)).astype(dt)
    b = (RNG.standard_normal(3000) * 10.0 ** RNG.integers(-30, 30, 3000)).astype(dt)
    if t is f32:
        a[:5] = [3e38, 1e-45, -7.0, 5.0, 1e-40]
        b[:5] = [1e-44, 3e-45, 2.0, -np.inf, 3e-42]
    ref, got = _run_diff(_binop_kernel("frem", t), a, b, dt)
    with np.errstate(all="ignore"):
        want = np.fmod(a, b)
    assert_same_floats(got, want)
    assert_same_floats(ref, want)


def test_f16_fma_is_exact_and_needs_no_libcall() -> None:
    kb = KernelBuilder("k", [("n", i32), ("a", ptr_global), ("b", ptr_global), ("o", ptr_global)])
    n, pa, pb, po = kb.params
    e, body, done = kb.block("e"), kb.block("body"), kb.block("done")
    kb.set_block(e)
    i = kb.add(kb.mul(kb.block_id("x"), kb.block_dim("x")), kb.thread_id("x"))
    kb.cbr(kb.icmp("slt", i, n), body, done)
    kb.set_block(body)
    x = kb.load(kb.offset(pa, i, f16), f16)
    y = kb.load(kb.offset(pb, i, f16), f16)
    kb.store(kb.fma(x, y, kb.fneg(kb.fmul(x, y))), kb.offset(po, i, f16))
    kb.br(done)
    kb.set_block(done)
    kb.ret()
    mod = Module("m", [kb.finish()])
    a = RNG.standard_normal(3000).astype(np.float16)
    b = (RNG.standard_normal(3000) * 8).astype(np.float16)
    a[:4] = [np.inf, 65504, 6e-8, np.nan]
    b[:4] = [2.0, 2.0, 6e-8, 1.0]
    ref, got = _run_diff(mod, a, b, np.float16)
    assert_same_floats(got, ref)  # the interpreter rounds the exact value: bit-exact agreement


def _ulps(got: np.ndarray, want: np.ndarray) -> float:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    ok = np.isfinite(want64) & (want64 != 0)
    both_nan = np.isnan(got64) == np.isnan(want64)
    assert both_nan.all(), "NaN results differ"
    spacing = np.spacing(np.abs(want.astype(got.dtype))).astype(np.float64)
    return float(np.max(np.abs(got64[ok] - want64[ok]) / spacing[ok], initial=0.0))


@pytest.mark.parametrize("op,lo,hi,f32_ulp,f64_ulp", [
    # f32 limits against the f32-rounded reference: the exact error (benchmarks/sweep_math_cpu.py,
    # all 2^32 inputs) plus up to 0.5 for the reference's own rounding
    ("exp", -100, 100, 1.1, 1), ("exp2", -140, 140, 1.1, 1), ("log", 1e-30, 1e30, 1.5, 1),
    ("log2", 1e-30, 1e30, 1.6, 2), ("sin", -1e4, 1e4, 2, 2), ("cos", -1e4, 1e4, 2, 2), ("tanh", -20, 20, 1.6, 3),
])
def test_math_accuracy(op: str, lo: float, hi: float, f32_ulp: float, f64_ulp: float) -> None:
    rng = np.random.default_rng(sum(map(ord, op)))  # fixed per op, whatever ran before
    x = rng.uniform(lo, hi, 4000) if lo < 0 else np.exp(rng.uniform(math.log(lo), math.log(hi), 4000))
    x = np.concatenate([x, [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0]])
    ref = getattr(np, op)
    for t, limit in ((f32, f32_ulp), (f64, f64_ulp)):
        a = x.astype(_NP[t])
        _, got = _run_diff(_binop_kernel(op, t), a, a, _NP[t])
        with np.errstate(all="ignore"):
            want = ref(a.astype(np.float64))
        with np.errstate(over="ignore"):
            want_t = want if t is f64 else want.astype(np.float32)
        assert _ulps(got, want_t) <= limit, op


# ---------------------------------------------------------------------------- barriers, atomics, concurrency


def _reverse_kernel() -> Module:
    """Each block reverses its 64-element slice through shared memory; a local array and a value
    computed before the barrier are used after it."""
    kb = KernelBuilder("rev", [("x", ptr_global), ("y", ptr_global)])
    px, py = kb.params
    sh = kb.shared_array("s", f32, 64)
    loc = kb.local_array("l", i32, 4)
    e = kb.block("e")
    kb.set_block(e)
    t = kb.thread_id("x")
    g = kb.add(kb.mul(kb.block_id("x"), 64), t)
    v = kb.load(kb.offset(px, g, f32), f32)
    lp = kb.offset(kb.local_addr(loc), 3, i32)
    kb.store(kb.mul(t, 3), lp)
    kb.store(v, kb.offset(kb.shared_addr(sh), t, f32))
    kb.barrier()
    w = kb.load(kb.offset(kb.shared_addr(sh), kb.sub(63, t), f32), f32)
    kb.barrier()
    extra = kb.sitofp(kb.sub(kb.load(lp, i32), kb.mul(t, 3)), f32)  # 0 if the local survived
    kb.store(kb.fadd(kb.fadd(w, extra), kb.fsub(v, v)), kb.offset(py, g, f32))
    kb.ret()
    return Module("rev", [kb.finish()])


def test_barrier_fission_with_locals_and_spills() -> None:
    mod = _reverse_kernel()
    mem = _mem()
    x = RNG.standard_normal(64 * 5, dtype=np.float32)
    px, py = mem.upload(x), mem.upload(np.full(x.size, np.nan, np.float32))
    run_x86(mod, "rev", (5,), (64,), [px, py], mem)
    np.testing.assert_array_equal(mem.read(py, np.float32, x.size), x.reshape(5, 64)[:, ::-1].ravel())
    k = cpu_module(mod).kernel("rev")
    assert k.has_barriers and k.layout.spill_frame > 0 and k.layout.local_size == 16


def _atomic_kernel() -> Module:
    kb = KernelBuilder("atom", [("cnt", ptr_global), ("f", ptr_global), ("flag", ptr_global)])
    pc, pf, pflag = kb.params
    e = kb.block("e")
    kb.set_block(e)
    kb.atomic_add(pc, kb.const(1, i32))
    kb.atomic("atomic_umax", kb.offset(pc, 1, i32), kb.thread_id("x"))
    kb.atomic("atomic_smin", kb.offset(pc, 2, i32), kb.sub(0, kb.thread_id("x")))
    kb.atomic_fadd(pf, kb.const(0.5, f32))
    kb.atomic_fadd(kb.offset(pf, 1, f64), kb.const(0.25, f64))
    kb.atomic_cas(pflag, kb.const(0, i64), kb.add(kb.sext(kb.thread_id("x"), i64), 1))
    kb.ret()
    return Module("atom", [kb.finish()])


def test_atomics() -> None:
    mod = _atomic_kernel()
    mem = _mem()
    pc = mem.upload(np.zeros(3, np.int32))
    pf = mem.upload(np.zeros(2, np.float64))
    pflag = mem.upload(np.zeros(1, np.int64))
    run_x86(mod, "atom", (7,), (96,), [pc, pf, pflag], mem)
    assert list(mem.read(pc, np.int32, 3)) == [7 * 96, 95, -95]
    assert mem.read(pf, np.float32, 1)[0] == 7 * 96 * 0.5
    assert mem.read(pf + 8, np.float64, 1)[0] == 7 * 96 * 0.25
    assert mem.read(pflag, np.int64, 1)[0] == 1  # only the very first thread's CAS succeeds
    assert cpu_module(mod).kernel("atom").uses_global_atomics


def test_disjoint_block_ranges_from_threads_match_single_call() -> None:
    mod = load_sample("stencil2d")
    w, h = 257, 190
    src = RNG.standard_normal((h, w), dtype=np.float32)
    results = []
    for parallel in (False, True):
        mem = _mem()
        ps, pd = mem.upload(src), mem.upload(np.zeros((h, w), np.float32))
        k = cpu_module(mod).kernel("stencil5")
        grid = ((w + 15) // 16, (h + 15) // 16)
        args = pack_args(mod, "stencil5", [w, h, 0.5, 0.125, ps, pd])
        total = grid[0] * grid[1]
        if parallel:
            parts = [range(i * total // 4, (i + 1) * total // 4) for i in range(4)]
            ts = [threading.Thread(target=k.run, args=(grid, (16, 16), args, mem.buf.ctypes.data, mem.size),
                                   kwargs={"blocks": r}) for r in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        else:
            k.run(grid, (16, 16), args, mem.buf.ctypes.data, mem.size)
        results.append(mem.read(pd, np.float32, w * h))
    np.testing.assert_array_equal(results[0], results[1])


def test_kitchen_sink_compiles_and_loads_for_x86() -> None:
    from vxpu.ir.text import parse

    from tests.ir.irhelpers import HERE

    mod = parse((HERE / "samples" / "kitchen_sink.vxir").read_text())
    cm = cpu_module(mod)
    assert set(cm.kernels) == {k.name for k in mod.kernels}


def test_opt_level_zero_gives_same_results() -> None:
    mod = _reverse_kernel()
    x = RNG.standard_normal(128, dtype=np.float32)
    outs = []
    for opt in (0, 3):
        mem = _mem()
        px, py = mem.upload(x), mem.upload(np.zeros(128, np.float32))
        k = cpu_module(mod, opt).kernel("rev")
        k.run((2,), (64,), pack_args(mod, "rev", [px, py]), mem.buf.ctypes.data, mem.size)
        outs.append(mem.read(py, np.float32, 128))
    np.testing.assert_array_equal(outs[0], outs[1])


# ---------------------------------------------------------------------------- loop versioning


def _strided_loop_kernel(t, pred: str) -> Module:  # type: ignore[no-untyped-def]
    """out[thread] = number of iterations of ``for (j = j0; j pred n; j += s)`` and the last j."""
    kb = KernelBuilder("k", [("j0", t), ("n", t), ("s", t), ("o", ptr_global)])
    j0, n, s, po = kb.params
    e, head, body, done = kb.block("e"), kb.block("head", [("j", t), ("c", i32)]), kb.block("body"), kb.block("done")
    kb.set_block(e)
    kb.br(head, j0, kb.const(0, i32))
    kb.set_block(head)
    j, c = head.params
    more = kb.icmp(pred, j, n)
    kb.cbr(more, body, done)
    kb.set_block(body)
    kb.br(head, kb.add(j, s), kb.add(c, 1))
    kb.set_block(done)
    slot = kb.mul(kb.thread_id("x"), 2)
    kb.store(c, kb.offset(po, slot, i32))
    kb.store(kb.sext(j, i32) if t.bits < 32 else (kb.trunc(j, i32) if t.bits > 32 else j), kb.offset(po, kb.add(slot, 1), i32))
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("pred", ["slt", "ult"])
def test_counted_loops_are_versioned_and_exact(pred: str) -> None:
    from vxpu.ir.lower.common import reverse_postorder
    from vxpu.ir.lower.versioning import find_counted_loops

    mod = _strided_loop_kernel(i8, pred)
    k = mod.kernels[0]
    assert len(find_counted_loops(k, reverse_postorder(k))) == 1
    cases = [(0, 126, 3), (0, 126, 2), (0, 127, 1), (5, 0, 1), (-100, 100, 7), (0, 10, 0 + 1), (120, 127, 3),
             (-128, 127, 127), (0, -1, 85), (3, 125, 5), (0, 100, 60)]
    if pred == "ult":
        cases += [(0, 250, 3), (200, 255, 27)]
    for j0, n, s in cases:
        mem = Memory(1 << 20)
        po = mem.upload(np.zeros(2, np.int32))
        ref, got = differential(mod, "k", (1,), (1,), [j0 & 0xFF, n & 0xFF, s & 0xFF, po], mem)
        np.testing.assert_array_equal(got[po:po + 8], ref[po:po + 8]), (j0, n, s)


def test_versioned_loop_in_llvm_ir_carries_no_wrap_and_unroll() -> None:
    from vxpu.ir.lower import nvptx

    text = str(nvptx.lower_module(_strided_loop_kernel(i32, "slt")))
    assert "add nsw i32" in text and "llvm.loop.unroll.count" in text and "loop.version" in text
    assert "distinct !{" in text
