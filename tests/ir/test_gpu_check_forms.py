"""gpucheck's parameter-offset check forms, as emitted, against the general check.

``CheckGroups._param_index`` builds the check of ``offset P, i : T`` from the entry-computed
``(d, q)`` ("dq", the default) or ``(D, L)`` ("dl"). Here the very instructions it emits are
compiled for the host (llvmlite MCJIT; no GPU) and compared, over the edges of the pointer's
distance from its buffer, the index and the buffer length, with the general check: the access
at ``off = P + s*i - base (mod 2^64)`` is allowed exactly when ``off`` is a multiple of ``s`` and
``off + s <= length``. Both forms must agree everywhere up to the host limit on lengths
(``gpu_checked.MAX_LENGTH`` = 2^62, ir-lowering §7), and the element form is shown to need it.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import llvmlite.binding as llvm
import pytest
from llvmlite import ir
from vxpu.accel.gpu_checked import MAX_LENGTH
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.lower.gpucheck import CheckGroups
from vxpu.ir.types import i8, i16, i32, i64, ptr_global

from tests.ir.lowerhelpers import jit_function

I1, I32, I64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
M64 = (1 << 64) - 1
_TYPES = {1: i8, 2: i16, 4: i32, 8: i64}


def _check_fn(size: int, form: str):  # type: ignore[no-untyped-def]
    """``ok(P, base, length, i)`` compiled from the check ``_param_index`` emits for two
    ``size``-byte loads at ``offset P, i``."""
    kb = KernelBuilder("k", [("P", ptr_global), ("i", i32)])
    p, i = kb.params
    kb.set_block(kb.block("e"))
    t = _TYPES[size]
    pv = kb.offset(p, i, t)
    kb.load(pv, t)
    kb.load(pv, t)                    # two uses: the parameter form applies
    kb.ret()
    kernel = kb.finish()
    mod = ir.Module("forms")
    mod.triple = llvm.get_process_triple()
    fn = ir.Function(mod, ir.FunctionType(I1, [I64, I64, I64, I32]), "ok")
    a_p, a_base, a_len, a_i = fn.args
    entry, body = fn.append_basic_block("entry"), fn.append_basic_block("body")
    eb = ir.IRBuilder(entry)
    ptr = ir.IntType(8).as_pointer(1)
    p_val = eb.inttoptr(a_p, ptr)
    eb.branch(body)
    b = ir.IRBuilder(body)
    addr = b.inttoptr(b.add(a_p, b.mul(b.sext(a_i, I64), ir.Constant(I64, size))), ptr)
    values = {p: p_val, i: a_i, pv: addr}
    hooks = SimpleNamespace(param_bounds={0: (a_base, a_len)}, param_form=form, param_form_uses=2,
                            assume_proven=set())
    kl = SimpleNamespace(fn=fn, b=b, values=values, get=values.__getitem__, kernel=kernel)
    member = CheckGroups(hooks)._param_index(kl, pv, size)   # type: ignore[arg-type]
    assert member is not None, "the parameter form did not apply"
    kl.b.ret(member.ok)
    proto = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int32)
    return jit_function(mod, "ok", proto)


def _mismatches(size: int, form: str, lengths: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    ok = _check_fn(size, form)
    out = []
    for base in (0, 8, 1 << 63, (1 << 64) - 64):
        for dist in (0, 1, size - 1, size, -size, 3 * size, 1 << 62, -(1 << 62), (1 << 62) + size,
                     (1 << 63) - size, -(1 << 63)):
            for length in lengths:
                q, d = length // size, dist // size
                near = {q - d, q - d - 1, -d, -d - 1}
                for idx in {-(1 << 31), -(1 << 31) + 1, -1, 0, 1, 2, (1 << 31) - 1, *near}:
                    idx = ((idx + (1 << 31)) % (1 << 32)) - (1 << 31)     # an i32
                    p = (base + dist) & M64
                    off = (p + size * idx - base) & M64
                    want = off % size == 0 and off + size <= length
                    if bool(ok(p, base, length, idx)) != want:
                        out.append((base, dist, length, idx))
    return out


_LENGTHS = (0, 1, 3, 7, 8, 9, 32, (1 << 62) - 1, MAX_LENGTH)


@pytest.mark.parametrize("form", ["dq", "dl"])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_the_parameter_forms_are_the_general_check_up_to_the_host_limit(size: int, form: str) -> None:
    assert _mismatches(size, form, _LENGTHS) == []


@pytest.mark.parametrize("size", [2, 8])
def test_the_element_form_needs_the_host_limit(size: int) -> None:
    """Past 2^62 the element form accepts or refuses wrongly (so CheckedArgs.fill refuses
    such bounds); the byte-offset form stays exact."""
    past = ((1 << 63), M64)
    assert _mismatches(size, "dq", past)
    assert _mismatches(size, "dl", past) == []
