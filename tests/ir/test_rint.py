"""``rint`` (opcode 83): round to the nearest integer, halfway cases to even, on every path.

The interpreter and the x86 JIT must agree bit for bit with numpy's ``rint`` on halfway cases,
signed zeros, NaN, infinities and values too large to have a fraction, for f16, f32 and f64; the
op must survive the text and binary round trip; NVPTX and AMDGPU must get the hardware
instruction (``cvt.rni``, ``v_rndne``), not a libm call.
"""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.ir.binary import decode, encode
from vxpu.ir.lower import amdgpu, nvptx, toolchain
from vxpu.ir.ops import OPS, OPS_BY_CODE
from vxpu.ir.text import parse, print_module
from vxpu.ir.types import f16, f32, f64

from tests.ir.test_lower_x86 import _binop_kernel, _run_diff, assert_same_floats

_NP = {f16: np.float16, f32: np.float32, f64: np.float64}


def _edges(t) -> np.ndarray:  # type: ignore[no-untyped-def]
    dt = _NP[t]
    info = np.finfo(dt)
    big = float(2 ** (info.nmant))  # from here on every float is an integer
    halves = [k + 0.5 for k in range(-6, 6)]
    vals = halves + [0.0, -0.0, 0.49999997, -0.49999997, 1.5, 2.5, -2.5, big - 0.5, -(big - 0.5), big, big + 2,
                     float(info.max), -float(info.max), float(info.tiny), -float(info.smallest_subnormal),
                     np.inf, -np.inf, np.nan, 1e30, -7.25]
    rng = np.random.default_rng(83)
    drawn = rng.standard_normal(500) * 10.0 ** rng.integers(-3, 8, 500)
    with np.errstate(over="ignore"):
        return np.concatenate([np.array(vals), drawn]).astype(dt)


def test_rint_is_opcode_83() -> None:
    assert OPS["rint"].code == 83 and OPS_BY_CODE[83].name == "rint"


@pytest.mark.parametrize("t", [f16, f32, f64], ids=lambda t: t.name)
def test_interpreter_and_x86_round_half_to_even(t) -> None:  # type: ignore[no-untyped-def]
    a = _edges(t)
    ref, got = _run_diff(_binop_kernel("rint", t), a, a, _NP[t])
    want = np.rint(a)
    assert_same_floats(ref, want)
    assert_same_floats(got, want)
    assert np.signbit(got[a == 0]).tolist() == np.signbit(a[a == 0]).tolist()


def test_text_and_binary_round_trip() -> None:
    mod = _binop_kernel("rint", f32)
    text = print_module(mod)
    assert "= rint " in text
    again = parse(text)
    assert print_module(decode(encode(again))) == text


def _llvm_ir(lower, t) -> str:  # type: ignore[no-untyped-def]
    return str(lower(_binop_kernel("rint", t)))


@pytest.mark.parametrize("t,insn", [(f32, "cvt.rni.f32.f32"), (f64, "cvt.rni.f64.f64")])
def test_nvptx_uses_cvt_rni(t, insn: str) -> None:  # type: ignore[no-untyped-def]
    spec = toolchain.resolve_target("nvptx", "sm_90")
    ptx = toolchain.emit_ptx(toolchain.parse_and_optimize(_llvm_ir(nvptx.lower_module, t), spec, 3), spec)
    assert insn in ptx and "roundeven" not in ptx


@pytest.mark.parametrize("t,insn", [(f32, "v_rndne_f32"), (f64, "v_rndne_f64")])
def test_amdgpu_uses_v_rndne(t, insn: str) -> None:  # type: ignore[no-untyped-def]
    spec = toolchain.resolve_target("amdgpu", "gfx942")
    mod = toolchain.parse_and_optimize(_llvm_ir(amdgpu.lower_module, t), spec, 3)
    asm = toolchain.target_machine(spec).emit_assembly(mod)
    assert insn in asm and "roundeven" not in asm
