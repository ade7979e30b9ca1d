"""Accuracy of ``pow``, ``sin`` and ``cos`` over their whole range against a 200-bit reference.

The x86 lowering (``ir/lower/math.py``, the same code as NVPTX and AMDGPU get) must stay within
the bounds of docs/ir.md §4.2 (4 ulp; the asserted limits are the measured maxima of
docs/ir-lowering.md §3 rounded up), and the reference interpreter (Python's ``math``, i.e. the C
library) must agree with it within the sum of both errors. Inputs are seeded numpy draws: pow with
|y·log x| up to the overflow/underflow limits and x near 1 with huge y; sin/cos with |x| from 2^-30
to the largest double, next to multiples of π/2, and the double closest to one (the worst case of
the argument reduction, K. C. Ng).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from vxpu.ir.types import f32, f64

from tests.ir.test_lower_x86 import _binop_kernel, _run_diff

mpmath = pytest.importorskip("mpmath", reason="mpmath (a sympy dependency) gives the 200-bit reference")

_NP = {f32: np.float32, f64: np.float64}


def _exact(op: str, x: float, y: float) -> object:
    arg = mpmath.mpf(x)
    return mpmath.power(arg, mpmath.mpf(y)) if op == "pow" else getattr(mpmath, op)(arg)


def _max_ulps(got: np.ndarray, a: np.ndarray, b: np.ndarray, op: str) -> float:
    """Max error in ulps of the result's type against the 200-bit value (finite nonzero results)."""
    worst, counted = 0.0, 0
    with mpmath.workprec(200):
        for g, x, y in zip(got.tolist(), a.tolist(), b.tolist()):
            exact = _exact(op, x, y)
            want = float(exact)
            if not math.isfinite(want) or want == 0.0 or abs(want) > np.finfo(got.dtype).max:
                continue
            counted += 1
            spacing = float(np.spacing(got.dtype.type(abs(want))))
            if got.dtype == np.float32:  # against the correctly rounded f32 result
                exact = mpmath.mpf(float(np.float32(want)))
            worst = max(worst, float(abs(mpmath.mpf(g) - exact)) / spacing)
    assert counted > 0.9 * got.size
    return worst


def _pow_inputs(rng: np.random.Generator, t: type) -> tuple[np.ndarray, np.ndarray]:
    lim = 700.0 if t is f64 else 85.0
    x = np.exp(rng.uniform(-lim, lim, 3000))
    y = rng.uniform(-lim * 1.06, lim, 3000) / np.log(x)                   # |y·log x| to the limits
    x1 = 1.0 + rng.uniform(-0.25, 0.5, 1500)                                # x near 1, large |y|
    y1 = rng.uniform(-1.0, 1.0, 1500) * lim / np.abs(np.log(x1))
    xi = -np.exp(rng.uniform(-5, 5, 500))                                    # negative x, integer y
    yi = np.round(rng.uniform(-lim / 5, lim / 5, 500) / np.maximum(np.abs(np.log(-xi)), 1.0))
    top = np.log(float(np.finfo(_NP[t]).max))
    bottom = np.log(float(np.finfo(_NP[t]).smallest_subnormal))
    xe = np.exp(rng.uniform(bottom, top, 1000))                               # subnormal x too, and
    ye = np.concatenate([rng.uniform(top - 10, top, 500), rng.uniform(bottom, bottom + 10, 500)]) / np.log(xe)
    return (np.concatenate([x, x1, xi, xe]).astype(_NP[t]),                  # results near the limits
            np.concatenate([y, y1, yi, ye]).astype(_NP[t]))


def _trig_inputs(rng: np.random.Generator, t: type) -> tuple[np.ndarray, np.ndarray]:
    """(random |x| from 2^-30 to the top of the type and the doubles next to k·π/2, hard cases)."""
    top = 1023.9 if t is f64 else 127.9
    x = np.exp2(rng.uniform(-30, top, 4000)) * rng.choice([-1.0, 1.0], 4000)
    with mpmath.workprec(200):
        ks = np.concatenate([np.arange(1, 300), rng.integers(300, 2 ** 40, 300)])
        near = np.array([float(mpmath.mpf(int(k)) * mpmath.pi / 2) for k in ks])
    near = np.concatenate([near, np.nextafter(near, 0), np.nextafter(near, np.inf)])
    hard = np.array([6381956970095103 * 2.0 ** 797, 1e22, 2.0 ** 20, np.nextafter(2.0 ** 20, 0),
                     1.7976931348623157e308])
    big = np.finfo(_NP[t]).max
    return (np.concatenate([x, near]).astype(_NP[t]), hard[hard < big].astype(_NP[t]))


@pytest.mark.parametrize("t,limit", [(f64, 1.5), (f32, 1.0)], ids=["f64", "f32"])
def test_pow_within_bound(t, limit: float) -> None:  # type: ignore[no-untyped-def]
    a, b = _pow_inputs(np.random.default_rng(7), t)
    ref, got = _run_diff(_binop_kernel("pow", t), a, b, _NP[t])
    assert _max_ulps(got, a, b, "pow") <= limit
    assert _max_ulps(ref, a, b, "pow") <= 1.0  # the interpreter's C pow


@pytest.mark.parametrize("op", ["sin", "cos"])
@pytest.mark.parametrize("t,limit", [(f64, 1.5), (f32, 1.0)], ids=["f64", "f32"])
def test_sin_cos_within_bound_over_the_whole_range(op: str, t, limit: float) -> None:  # type: ignore[no-untyped-def]
    drawn, hard = _trig_inputs(np.random.default_rng(11), t)
    a = np.concatenate([drawn, hard])
    ref, got = _run_diff(_binop_kernel(op, t), a, a, _NP[t])
    assert _max_ulps(got, a, a, op) <= limit
    # Not on the hard cases: glibc 2.36's cos(6381956970095103·2^797) is 8 ulp off (its result
    # is 4.7e-19; the reduction keeps about 2^-110 absolute).
    assert _max_ulps(ref[:drawn.size], drawn, drawn, op) <= 1.0


@pytest.mark.parametrize("op", ["sin", "cos"])
def test_sin_cos_specials(op: str) -> None:
    a = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 2.0 ** 20, -(2.0 ** 20), 5e-324])
    _, got = _run_diff(_binop_kernel(op, f64), a, a, np.float64)
    assert np.isnan(got[:3]).all()
    want = [getattr(math, op)(float(v)) for v in a[3:]]
    assert [math.copysign(1.0, g) for g in got[3:5]] == [math.copysign(1.0, w) for w in want[:2]]
    np.testing.assert_allclose(got[3:], want, rtol=4e-16, atol=0)
