"""Write the checked and unchecked cubins of the sample kernels (for ``cuobjdump -sass``).

Usage: ``python benchmarks/sass_checked.py OUTDIR [sample ...]``: writes ``OUTDIR/<sample>.checked.cubin``
and ``OUTDIR/<sample>.unchecked.cubin`` (sm_90), to compare what the bounds checks add to the
machine code (bench_checked_gpu.py measures the time).
"""

from __future__ import annotations

import sys
from pathlib import Path

from vxpu.ir.compile import compile_module
from vxpu.ir.samples import SAMPLES


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in argv[1:] or list(SAMPLES):
        module = SAMPLES[name].module()
        for checked in (True, False):
            cm = compile_module(module, "nvptx", arch="sm_90", cache=False, checked=checked)
            (out / f"{name}.{'checked' if checked else 'unchecked'}.cubin").write_bytes(cm.image)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
