"""Types, the opcode table, the model and the builder."""

from __future__ import annotations

import math
import pickle

import pytest
from vxpu.ir import ops, types
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.errors import IRError, VerifyError
from vxpu.ir.model import Module, normalize_imm
from vxpu.ir.text import parse, print_module
from vxpu.ir.types import f16, f32, f64, i1, i8, i32, i64, ptr, ptr_constant, ptr_global, ptr_shared

from .irhelpers import HERE, build_saxpy


def test_types_are_interned_and_immutable():
    assert types.parse_type("i32") is i32
    assert types.parse_type("ptr<global>") is ptr_global is ptr("global")
    assert ptr(types.AddressSpace.SHARED) is ptr_shared
    assert pickle.loads(pickle.dumps(f16)) is f16
    with pytest.raises(AttributeError):
        i32.bits = 64  # type: ignore[misc]
    with pytest.raises(IRError, match="unknown type"):
        types.parse_type("i128")
    with pytest.raises(IRError, match="address space"):
        ptr("texture")


def test_type_properties_and_codes():
    assert [t.size for t in types.MEMORY_TYPES] == [1, 2, 4, 8, 2, 4, 8]
    assert not i1.is_memory and not ptr_global.is_memory and f16.is_memory
    assert (i8.min_signed, i8.max_unsigned) == (-128, 255)
    codes = [t.code for t in types.ALL_TYPES]
    assert len(set(codes)) == len(codes) and all(0 < c < 256 for c in codes)
    assert all(types.type_from_code(t.code) is t for t in types.ALL_TYPES)
    assert str(ptr_constant) == "ptr<constant>"


def test_opcode_table_is_consistent():
    codes = {d.code for d in ops.OPS.values()}
    assert len(codes) == len(ops.OPS)
    for d in ops.OPS.values():
        assert set(d.operands) <= set(ops.OPERAND_RULES), d.name
        assert d.type_class is None or d.type_class in ops.TYPE_CLASSES, d.name
        assert d.result is None or d.result in ops.RESULT_RULES, d.name
        assert d.conv is None or d.conv in ops.CONVERSIONS, d.name
        assert set(d.attrs) <= {"pred", "dim", "array", "imm"}, d.name
        assert (d.successors > 0) <= d.terminator, d.name
        assert d.doc, d.name
        if d.result == "T":
            assert d.type_class is not None, d.name
    terminators = {d.name for d in ops.OPS.values() if d.terminator}
    assert terminators == {"br", "cbr", "ret", "trap"}
    assert ops.OPS["load"].reads_memory and not ops.OPS["load"].writes_memory
    assert ops.OPS["store"].writes_memory and ops.OPS["atomic_cas"].side_effects
    assert ops.OPS["add"].pure and ops.OPS["add"].commutative and not ops.OPS["sub"].commutative
    assert not ops.OPS["barrier"].pure and not ops.OPS["trap"].pure


def test_kitchen_sink_uses_every_op():
    """The round-trip and codec tests cover the whole table only while this sample does."""
    text = (HERE / "samples" / "kitchen_sink.vxir").read_text()
    used = {op.opcode for k in parse(text).kernels for op in k.ops()}
    assert used == set(ops.OPS)


@pytest.mark.parametrize("name, annotated, operands, expect", [
    ("add", i32, [i32, i32], []),
    ("add", i32, [i32, i64], ["operand 1 of add: expected i32, got i64"]),
    ("add", f32, [f32, f32], ["add cannot have type f32"]),
    ("fadd", None, [f32, f32], ["fadd needs a type annotation"]),
    ("icmp", None, [f32, f32], ["icmp compares integers"]),
    ("icmp", None, [i32, i8], ["expected i32 like the other operand"]),
    ("store", None, [f32, ptr_constant], ["cannot store through ptr<constant>"]),
    ("store", None, [i1, ptr_global], ["operand 0 of store: expected a memory type"]),
    ("atomic_add", i32, [types.ptr_local, i32], ["atomics need ptr<global> or ptr<shared>"]),
    ("trunc", i64, [i32], ["cannot convert i32 to i64"]),
    ("bitcast", f32, [i32], []),
    ("bitcast", f64, [i32], ["cannot convert i32 to f64"]),
    ("fptosi", i1, [f32], ["fptosi cannot have type i1"]),
    ("offset", f32, [ptr_global, i1], ["operand 1 of offset: expected an integer index"]),
    ("select", None, [i32, f32, f32], ["operand 0 of select: expected i1"]),
    ("ret", None, [i32], ["ret takes 0 operand(s), got 1"]),
])
def test_check_types(name, annotated, operands, expect):
    problems = ops.check_types(ops.OPS[name], annotated, operands)
    assert len(problems) == len(expect), problems
    for got, want in zip(problems, expect):
        assert want in got


def test_infer_result():
    assert ops.infer_result(ops.OPS["offset"], f32, [ptr_shared, i32]) is ptr_shared
    assert ops.infer_result(ops.OPS["select"], None, [i1, f64, f64]) is f64
    assert ops.infer_result(ops.OPS["icmp"], None, [i32, i32]) is i1
    assert ops.infer_result(ops.OPS["store"], None, [f32, ptr_global]) is None


def test_normalize_imm():
    assert normalize_imm(i32, 0xFFFFFFFF) == -1
    assert normalize_imm(i32, -1) == -1
    assert normalize_imm(i1, -1) == 1 and normalize_imm(i1, 1) == 1
    assert normalize_imm(i8, 200) == -56
    assert normalize_imm(f32, 0.1) == 0.10000000149011612
    assert normalize_imm(f16, 1 / 3) == 0.333251953125
    assert math.isnan(normalize_imm(f32, float("-nan")))
    assert normalize_imm(f16, float("inf")) == math.inf
    for t, bad in ((i8, 256), (i8, -129), (i32, 1.5), (f16, 1e6), (f32, "1"), (i32, True), (ptr_global, 0)):
        with pytest.raises(IRError):
            normalize_imm(t, bad)


def test_builder_saxpy_verifies_and_prints():
    m = build_saxpy()
    text = print_module(m)
    assert "%i = add" in text and "cbr %inb, ^body, ^exit" in text
    assert parse(text) == m


def test_builder_checks_types_eagerly():
    b = KernelBuilder("k", params=[("n", i32), ("a", f32), ("p", ptr_constant)])
    n, a, p = b.params
    b.set_block(b.block("entry"))
    with pytest.raises(IRError, match="expected i32, got f32"):
        b.add(n, a)
    with pytest.raises(IRError, match="cannot store through ptr<constant>"):
        b.store(a, p)
    with pytest.raises(IRError, match="predicate"):
        b.icmp("lt", n, n)
    with pytest.raises(IRError, match="not a conversion"):
        b.convert("add", n, i64)
    with pytest.raises(IRError, match="unknown op"):
        b.emit("frobnicate")


def test_builder_needs_a_block_and_own_blocks():
    b = KernelBuilder("k")
    with pytest.raises(IRError, match="set_block"):
        b.ret()
    other = KernelBuilder("o")
    with pytest.raises(IRError, match="another kernel"):
        b.set_block(other.block("x"))


def test_builder_python_constants_and_loop_with_block_params():
    b = KernelBuilder("count", params=[("n", i32), ("out", ptr_global)])
    n, out = b.params
    entry, loop, done = b.block("entry"), b.block("loop", [("i", i32), ("acc", f32)]), b.block("done")
    b.set_block(entry)
    b.br(loop, b.const(0, i32), b.const(0.0, f32))
    b.set_block(loop)
    i, acc = loop.params
    i1_ = b.add(i, 1, name="i1")
    acc1 = b.fadd(acc, 0.5, name="acc1")
    b.cbr(b.icmp("slt", i1_, n), loop, done, true_args=[i1_, acc1])
    b.set_block(done)
    b.store(b.sitofp(n, f32), b.offset(out, 0, f32))
    b.ret()
    k = b.finish()
    consts = [op.imm for op in k.ops() if op.opcode == "const"]
    assert consts == [0, 0.0, 1, 0.5, 0]


def test_builder_finish_runs_the_verifier():
    b = KernelBuilder("k", params=[("n", i32)])
    b.set_block(b.block("entry"))
    b.thread_id("x")
    with pytest.raises(VerifyError, match="does not end with a terminator"):
        b.finish()
    assert b.finish(verify=False).name == "k"


def test_shared_and_local_arrays():
    b = KernelBuilder("k", params=[("x", ptr_global)])
    tile = b.shared_array("tile", f32, 64)
    scratch = b.local_array("scratch", i32, 4)
    b.set_block(b.block("entry"))
    ps = b.shared_addr(tile)
    pl = b.local_addr(scratch)
    assert ps.type is ptr_shared and pl.type is types.ptr_local
    b.store(b.load(b.offset(ps, 3, f32), f32), b.params[0])
    b.barrier()
    b.ret()
    k = b.finish()
    assert tile.size == 256 and scratch.size == 16
    assert k.shared == [tile] and k.local == [scratch]


def test_structural_equality_and_numbering():
    a, b = build_saxpy(), build_saxpy()
    assert a == b and a is not b
    k = b.kernels[0]
    assert list(k.numbering().values()) == list(range(len(k.numbering())))
    k.blocks[1].ops[0].result.name = "renamed"
    assert a != b
    assert Module("x") != Module("y") and Module("x") == Module("x")
    with pytest.raises(IRError, match="no kernel @nope"):
        a.kernel("nope")
    assert a.kernel("saxpy").param("a").type is f32


def test_builder_checks_branch_arguments():
    b = KernelBuilder("k", params=[("n", i32)])
    entry, loop = b.block("entry"), b.block("loop", [("i", i32)])
    b.set_block(entry)
    with pytest.raises(IRError, match="takes 1 argument"):
        b.br(loop)
    with pytest.raises(IRError, match=r"argument 0 to \^loop has type f32, expected i32"):
        b.br(loop, b.const(1.0, f32))
    b.br(loop, 0)
    assert entry.ops[-1].successors[0].args[0].type is i32


def test_ir_core_imports_only_the_standard_library():
    """The guest imports the IR core: it must not pull in numpy, llvmlite or anything else."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import vxpu.ir.binary, vxpu.ir.builder, vxpu.ir.hashing, vxpu.ir.text, vxpu.ir.verify\n"
            "extra = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)\n"
            "print(sorted(x for x in extra if not x.startswith('_') and x != 'vxpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
