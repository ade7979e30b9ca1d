"""The optimization passes: each pass on its own (the output always verifies and computes the same
results in the interpreter), the levels, and every sample at -O0..-O3 on the interpreter and
the x86 JIT."""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.ir import samples
from vxpu.ir.errors import IRError
from vxpu.ir.interp import Memory, run_kernel
from vxpu.ir.model import Module
from vxpu.ir.passes import LEVELS, PASSES, optimize, run_pass
from vxpu.ir.passes.licm import natural_loops
from vxpu.ir.passes.util import clone_module
from vxpu.ir.text import parse, print_module
from vxpu.ir.verify import verify

from .irhelpers import sample_files


def kernel_text(body: str, params: str = "%n: i32, %out: ptr<global>") -> Module:
    m = parse(f"module @m\nkernel @k({params}) {{\n{body}\n}}\n")
    verify(m)
    return m


def ops_of(m: Module) -> list[str]:
    return [op.opcode for op in m.kernels[0].ops()]


def run_one(m: Module, n: int = 5, threads: int = 4, count: int = 8, dtype=np.int32) -> np.ndarray:
    """Run kernel @k(n, out) in the interpreter and return out."""
    mem = Memory()
    out = mem.alloc(count * 8)
    run_kernel(m, "k", 1, threads, [n, out], mem)
    return mem.read(out, dtype, count)


def apply(m: Module, name: str) -> bool:
    """Run one pass, verify, and check the results did not change."""
    before = run_one(m)
    changed = run_pass(m, name, verify_each=True)
    verify(m)
    assert np.array_equal(run_one(m), before), print_module(m)
    return changed


# --- constfold -------------------------------------------------------------------------------------

FOLD_CASES = [
    ("shl", "i32", 1, 40, 0),
    ("lshr", "i32", -1, 32, 0),
    ("ashr", "i32", -8, 99, -1),
    ("sdiv", "i32", 7, 0, 0),
    ("sdiv", "i32", -2147483648, -1, -2147483648),
    ("srem", "i32", -2147483648, -1, 0),
    ("urem", "i32", 9, 0, 9),
    ("udiv", "i8", -1, 3, 85),
    ("mul", "i16", 300, 300, 24464),
]


@pytest.mark.parametrize("op,t,a,b,want", FOLD_CASES)
def test_constfold_integer_edges(op, t, a, b, want):
    m = kernel_text(f"""^entry:
  %a = const {a} : {t}
  %b = const {b} : {t}
  %r = {op} %a, %b : {t}
  %w = sext %r : i64
  store %w, %out
  ret""")
    expect = run_one(m, dtype=np.int64)[0]
    assert apply(m, "constfold")
    assert run_one(m, dtype=np.int64)[0] == expect == want
    k = m.kernels[0]
    assert next(op for op in k.ops() if op.result is not None and op.result.name == "r").opcode == "const"


@pytest.mark.parametrize("expr,want_bits", [
    ("%r = fptosi %x : i32", 0x7FFFFFFF),             # 1e10 saturates
    ("%r = fptoui %nx : i32", 0),                      # negative -> 0
    ("%r = fptosi %nan : i32", 0),                     # NaN -> 0
])
def test_constfold_saturating_conversions(expr, want_bits):
    m = kernel_text(f"""^entry:
  %x = const 1e10 : f32
  %nx = const -1e10 : f32
  %nan = const nan : f32
  {expr}
  store %r, %out
  ret""")
    assert apply(m, "constfold")
    assert run_one(m, dtype=np.uint32)[0] == want_bits


def test_constfold_float_rounding_and_what_it_leaves_alone():
    m = kernel_text("""^entry:
  %a = const 0.1 : f32
  %b = const 0.2 : f32
  %s = fadd %a, %b : f32
  store %s, %out
  %e = exp %a : f32
  %p1 = offset %out, %n : f32
  store %e, %p1
  %z = const 0.0 : f32
  %nan = fdiv %z, %z : f32
  %two = const 2 : i32
  %p2 = offset %out, %two : f32
  store %nan, %p2
  %nz = const -0.0 : f32
  %mn = fmin %z, %nz : f32
  %three = const 3 : i32
  %p3 = offset %out, %three : f32
  store %mn, %p3
  %h = const 1.5 : f16
  %f = fma %h, %h, %h : f16
  %fx = fpext %f : f32
  %four = const 4 : i32
  %p4 = offset %out, %four : f32
  store %fx, %p4
  ret""")
    apply(m, "constfold")
    ops = ops_of(m)
    assert "fadd" not in ops
    assert {"exp", "fdiv", "fmin", "fma"} <= set(ops)         # approximate, NaN, ±0 choice, f16 fma
    assert run_one(m, dtype=np.float32)[0] == np.float32(0.1) + np.float32(0.2)


def test_constfold_identities():
    m = kernel_text("""^entry:
  %t = thread_id.x
  %z = const 0 : i32
  %one = const 1 : i32
  %a = add %t, %z : i32
  %b = mul %a, %one : i32
  %c = sub %b, %b : i32
  %d = or %b, %c : i32
  %eq = icmp eq %d, %d
  %s = select %eq, %d, %z
  %p = offset %out, %t : i32
  store %s, %p
  %fx = sitofp %t : f32
  %fone = const 1.0 : f32
  %f = fmul %fx, %fone : f32
  %q = offset %out, %t : f32
  store %f, %q
  ret""")
    apply(m, "constfold")
    run_pass(m, "dce", verify_each=True)
    assert ops_of(m).count("add") == 0 and "mul" not in ops_of(m) and "fmul" not in ops_of(m)
    assert "select" not in ops_of(m) and "icmp" not in ops_of(m)


def test_constfold_never_touches_side_effects():
    m = kernel_text("""^entry:
  %one = const 1 : i32
  %old = atomic_add %out, %one : i32
  %v = load %out : i32
  %w = add %v, %one : i32
  store %w, %out
  ret""")
    assert not run_pass(m, "constfold")
    assert ops_of(m).count("atomic_add") == 1 and "load" in ops_of(m)


# --- dce ---------------------------------------------------------------------------------------------

def test_dce_removes_dead_values_params_and_loads():
    m = kernel_text("""^entry:
  %z = const 0 : i32
  %dead = mul %n, %n : i32
  %unused_load = load %out : i32
  br ^loop(%z, %z)
^loop(%i: i32, %junk: i32):
  %junk2 = add %junk, %i : i32
  %one = const 1 : i32
  %i2 = add %i, %one : i32
  %more = icmp slt %i2, %n
  cbr %more, ^loop(%i2, %junk2), ^done
^done:
  %old = atomic_add %out, %i2 : i32
  ret""")
    assert apply(m, "dce")
    k = m.kernels[0]
    loop = k.blocks[1]
    assert len(loop.params) == 1
    assert "mul" not in ops_of(m) and "load" not in ops_of(m)
    assert "atomic_add" in ops_of(m)
    assert not run_pass(m, "dce")


# --- cse ---------------------------------------------------------------------------------------------

def test_cse_merges_along_dominators_only():
    m = kernel_text("""^entry:
  %t = thread_id.x
  %t2 = thread_id.x
  %a = add %t, %n : i32
  %b = add %n, %t2 : i32
  %c = icmp slt %t, %n
  cbr %c, ^left, ^right
^left:
  %d = add %t, %n : i32
  %e = mul %d, %d : i32
  %p = offset %out, %t : i32
  store %e, %p
  br ^exit
^right:
  %f = mul %a, %a : i32
  %q = offset %out, %t : i32
  store %f, %q
  br ^exit
^exit:
  %g = mul %b, %b : i32
  %r = offset %out, %t : i32
  %old = atomic_add %r, %g : i32
  ret""")
    assert apply(m, "cse")
    ops = ops_of(m)
    assert ops.count("add") == 1 and ops.count("thread_id") == 1
    # mul %a,%a in ^right and ^left's mul %d,%d (= %a) do not dominate each other or ^exit
    assert ops.count("mul") == 3
    assert ops.count("offset") == 3


def test_cse_loads_stop_at_stores_barriers_and_atomics():
    m = kernel_text("""^entry:
  %t = thread_id.x
  %p = offset %out, %t : i32
  %a = load %p : i32
  %b = load %p : i32
  %s1 = add %a, %b : i32
  store %s1, %p
  %c = load %p : i32
  barrier
  %d = load %p : i32
  %one = const 1 : i32
  %old = atomic_add %out, %one : i32
  %e = load %p : i32
  %s2 = add %c, %d : i32
  %s3 = add %s2, %e : i32
  store %s3, %p
  ret""")
    assert apply(m, "cse")
    assert ops_of(m).count("load") == 4


def test_cse_keeps_signed_zeros_apart():
    m = kernel_text("""^entry:
  %a = const 0.0 : f32
  %b = const -0.0 : f32
  %c = const 0.0 : f32
  store %a, %out
  %one = const 1 : i32
  %p = offset %out, %one : f32
  store %b, %p
  %two = const 2 : i32
  %q = offset %out, %two : f32
  store %c, %q
  ret""")
    apply(m, "cse")
    consts = [op.imm for op in m.kernels[0].ops() if op.opcode == "const" and op.type.is_float]
    assert len(consts) == 2


# --- simplifycfg -------------------------------------------------------------------------------------

def test_simplifycfg_folds_merges_and_forwards():
    m = kernel_text("""^entry:
  %true = const 1 : i1
  %t = thread_id.x
  cbr %true, ^a(%t), ^dead
^dead:
  br ^exit
^a(%x: i32):
  br ^b
^b:
  %c = icmp slt %x, %n
  cbr %c, ^fwd(%x), ^exit
^fwd(%y: i32):
  br ^join(%y)
^join(%z: i32):
  %p = offset %out, %z : i32
  store %z, %p
  br ^exit
^exit:
  ret""")
    assert apply(m, "simplifycfg")
    names = [b.name for b in m.kernels[0].blocks]
    assert "dead" not in names and "fwd" not in names and "a" not in names and "b" not in names
    assert len(m.kernels[0].blocks) == 3


def test_simplifycfg_uniform_block_params():
    m = kernel_text("""^entry:
  %t = thread_id.x
  %c = icmp slt %t, %n
  cbr %c, ^l, ^r
^l:
  br ^j(%t, %n)
^r:
  br ^j(%t, %t)
^j(%a: i32, %b: i32):
  %p = offset %out, %a : i32
  store %b, %p
  ret""")
    assert apply(m, "simplifycfg")
    j = next(b for b in m.kernels[0].blocks if b.name == "j")
    assert len(j.params) == 1


def test_simplifycfg_does_not_make_cbr_with_twin_targets():
    m = kernel_text("""^entry:
  %t = thread_id.x
  %c = icmp slt %t, %n
  cbr %c, ^x, ^j(%n)
^x:
  br ^j(%t)
^j(%a: i32):
  %p = offset %out, %t : i32
  store %a, %p
  ret""")
    apply(m, "simplifycfg")
    for op in m.kernels[0].ops():
        if op.opcode == "cbr":
            assert op.successors[0].block is not op.successors[1].block


# --- licm ----------------------------------------------------------------------------------------------

LOOP = """^entry:
  %t = thread_id.x
  %z = const 0 : i32
  %c0 = icmp slt %t, %n
  cbr %c0, ^outer(%z), ^outer(%t)
^outer(%i: i32):
  br ^inner(%z, %z)
^inner(%j: i32, %acc: i32):
  %k = mul %n, %n : i32
  %k2 = add %k, %i : i32
  %p = offset %out, %t : i32
  %v = load %p : i32
  %s = add %acc, %k2 : i32
  %s2 = add %s, %v : i32
  %one = const 1 : i32
  %j2 = add %j, %one : i32
  %more = icmp slt %j2, %n
  cbr %more, ^inner(%j2, %s2), ^after
^after:
  store %s2, %p
  %i2 = add %i, %one : i32
  %two = const 2 : i32
  %again = icmp slt %i2, %two
  cbr %again, ^outer(%i2), ^exit
^exit:
  ret"""


def test_licm_hoists_pure_ops_through_nested_loops():
    m = kernel_text(LOOP)
    assert [len(b) for _, b in natural_loops(m.kernels[0])] == [1, 3]
    assert apply(m, "licm")
    k = m.kernels[0]
    inner = next(b for b in k.blocks if b.name == "inner")
    outer = next(b for b in k.blocks if b.name == "outer")
    inner_ops = [op.opcode for op in inner.ops]
    assert "mul" not in inner_ops and "load" in inner_ops and "offset" not in inner_ops
    assert inner_ops.count("add") == 3                      # s, s2, j2 stay
    assert all(op.opcode != "mul" for op in outer.ops)       # n*n left both loops
    pre = next(b for b in k.blocks if b.name and b.name.startswith("outer.preheader"))
    assert "mul" in [op.opcode for op in pre.ops]
    assert not run_pass(m, "licm")


# --- pipeline -----------------------------------------------------------------------------------------

def test_levels_and_errors():
    assert LEVELS[0] == () and set(LEVELS[3]) == set(PASSES)
    m = kernel_text(LOOP)
    with pytest.raises(IRError, match="level"):
        optimize(m, 4)
    with pytest.raises(IRError, match="unknown pass"):
        run_pass(m, "inline")
    assert not optimize(m, 0)


@pytest.mark.parametrize("path", sample_files(), ids=lambda p: p.name)
def test_every_pass_keeps_files_valid_and_converges(path):
    m = parse(path.read_text())
    verify(m)
    for name in PASSES:
        c = clone_module(m)
        assert c == m
        run_pass(c, name, verify_each=True)
    for level in LEVELS:
        c = clone_module(m)
        optimize(c, level, verify_each=True)
        assert not optimize(c, level, verify_each=True) or level < 3
        assert parse(print_module(c)) == c


@pytest.mark.parametrize("name", sorted(samples.SAMPLES))
def test_samples_give_identical_results_at_every_level(name):
    sample = samples.SAMPLES[name]
    case = sample.case(sample.test_sizes[1], seed=3)
    reference = None
    for level in LEVELS:
        m = sample.module()
        optimize(m, level, verify_each=True)
        for backend in ("interp", "x86"):
            out = samples.run_case(case, m, backend=backend, opt_level=level, cache=False)
            assert not samples.compare(case, out)
            if backend == "x86" and not sample.backend_exact:
                continue
            if reference is None:
                reference = out
            for key, arr in out.items():
                assert np.array_equal(arr, reference[key], equal_nan=True), (name, level, backend, key)
