"""Optimization passes over the IR, and the -O0..-O3 pipeline.

Every pass is a module with ``run(kernel) -> bool`` (True if it changed anything) that keeps
the IR's exact semantics (docs/ir.md) and leaves the kernel valid for the verifier:

=============  ==================================================================================
constfold      folds pure ops with constant operands exactly as the semantics say, plus safe
               algebraic identities (``x + 0``, ``select c, a, a`` ...)
dce            removes unused pure ops, unused loads and unused block parameters (dead cycles too)
simplifycfg    folds constant ``cbr``, removes unreachable blocks, merges straight-line blocks,
               forwards empty blocks, replaces block parameters that always get one value
cse            merges identical pure ops along the dominator tree; merges identical loads only
               inside one block with no store, atomic or barrier in between
licm           hoists pure ops out of natural loops into a preheader (never loads)
=============  ==================================================================================

:func:`optimize` runs a level's passes over a module in place (``pipeline.LEVELS``).
"""

from .pipeline import LEVELS, PASSES, optimize, run_pass

__all__ = ["LEVELS", "PASSES", "optimize", "run_pass"]
