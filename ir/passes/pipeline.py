"""The optimization levels and the driver that runs passes over a module.

====  ===================================================================================
-O0   nothing
-O1   constfold, simplifycfg, dce
-O2   constfold, simplifycfg, cse, dce
-O3   constfold, simplifycfg, cse, licm, dce, repeated until nothing changes (at most
      :data:`MAX_ROUNDS` rounds)
====  ===================================================================================

Passes work in place. Use :func:`vxpu.ir.passes.util.clone_module` first to keep the
original. With ``verify_each`` the verifier runs after every pass that changed something, and
a failure names the pass (tests use this; a failure is a bug in the pass).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType

from ..errors import IRError
from ..model import Kernel, Module
from . import constfold, cse, dce, licm, simplifycfg

__all__ = ["LEVELS", "MAX_ROUNDS", "PASSES", "PassFailed", "optimize", "run_pass"]

log = logging.getLogger(__name__)

#: Every pass by name: ``run(kernel) -> changed``.
PASSES: Mapping[str, Callable[[Kernel], bool]] = MappingProxyType({
    "constfold": constfold.run,
    "simplifycfg": simplifycfg.run,
    "cse": cse.run,
    "licm": licm.run,
    "dce": dce.run,
})

#: The passes of each level, in order.
LEVELS: Mapping[int, tuple[str, ...]] = MappingProxyType({
    0: (),
    1: ("constfold", "simplifycfg", "dce"),
    2: ("constfold", "simplifycfg", "cse", "dce"),
    3: ("constfold", "simplifycfg", "cse", "licm", "dce"),
})

#: Most rounds of the -O3 pipeline (each round runs every pass once).
MAX_ROUNDS = 8


class PassFailed(IRError):
    """A pass produced invalid IR (a bug in the pass; the message names it and the problems)."""


def run_pass(module: Module, name: str, *, verify_each: bool = False) -> bool:
    """Run one pass by name over every kernel of ``module``. Returns True if anything changed.

    Raises:
        IRError: unknown pass name.
        PassFailed: with ``verify_each``, the pass left invalid IR.
    """
    fn = PASSES.get(name)
    if fn is None:
        raise IRError(f"unknown pass {name!r}; passes are {', '.join(PASSES)}")
    changed = False
    for kernel in module.kernels:
        if fn(kernel):
            changed = True
            if verify_each:
                _verify_after(kernel, name)
    return changed


def _verify_after(kernel: Kernel, name: str) -> None:
    from ..errors import VerifyError
    from ..verify import verify_kernel

    try:
        verify_kernel(kernel)
    except VerifyError as exc:
        raise PassFailed(f"pass {name} left kernel @{kernel.name} invalid: {exc}") from exc


def optimize(module: Module, level: int = 3, *, verify_each: bool = False) -> bool:
    """Optimize a verified ``module`` in place at ``level`` (0-3). Returns True if it changed.

    Raises:
        IRError: a level outside 0-3.
        PassFailed: with ``verify_each``, a pass left invalid IR.
    """
    if level not in LEVELS:
        raise IRError(f"optimization level must be 0, 1, 2 or 3, not {level!r}")
    names = LEVELS[level]
    rounds = MAX_ROUNDS if level >= 3 else 1
    changed = False
    for r in range(rounds):
        step = False
        for name in names:
            step |= run_pass(module, name, verify_each=verify_each)
        changed |= step
        if not step:
            break
        log.debug("optimize -O%d round %d changed the module", level, r + 1)
    return changed
