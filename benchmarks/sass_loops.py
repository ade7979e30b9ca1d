"""SASS instruction counts of the sample kernels: the whole kernel and each loop body.

Usage: ``python benchmarks/sass_loops.py [--unchecked] [--set SWITCH=VALUE ...] [--twin] [sample ...]``

Compiles each sample (``examples/kernels/<sample>.vxir``) for sm_90 exactly as the backend does
(LLVM → PTX → nvJitLink), disassembles the cubin with ``nvdisasm`` (``$NVDISASM`` or on PATH)
and prints, per kernel, the number of instructions (``NOP`` padding left out) and the length of
every loop body (from a backward branch's target to the branch, both included). ``--set``
sets a ``GpuHooks`` switch first (``split_offsets=``, ``guarded_loads=all`` ...: the lowering
forms ``bench_checked_gpu.py --variants`` times). ``--twin`` also counts the CUDA C twins
(``bench_ir_gpu.SAMPLE_CUDA``) compiled with ``nvcc -O3 -arch=sm_90 -cubin`` (``$NVCC`` or on
PATH). Needs no GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def tool(name: str) -> str:
    path = os.environ.get(name.upper()) or shutil.which(name)
    if not path:
        raise SystemExit(f"{name} not found (set ${name.upper()})")
    return path


def sass(cubin: Path, fn: str) -> list[str]:
    """The instructions and labels of function ``fn`` in ``cubin`` (NOPs left out)."""
    out = subprocess.run([tool("nvdisasm"), "-c", "-sf", str(cubin)], capture_output=True, text=True, check=True).stdout
    lines: list[str] = []
    on = False
    for line in out.splitlines():
        if re.match(rf"^\.text\.{re.escape(fn)}:", line):
            on = True
            continue
        if on and line.startswith("//---"):
            break
        text = re.sub(r"/\*[0-9a-f]+\*/", "", line).strip()
        if on and text and not re.match(r"^NOP\s*;$", text) and (not text.startswith(".") or re.match(r"^\.L_x_\d+:$", text)):
            lines.append(text)
    return lines


def loops(lines: list[str]) -> list[list[str]]:
    """Each loop body: the instructions from a backward branch's target label to the branch."""
    labels = {line[:-1]: i for i, line in enumerate(lines) if line.endswith(":")}
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if not x.endswith(":")]
            if len(body) > 1:                      # not the trailing "BRA self"
                out.append(body)
    return out


def report(cubin: Path, kernels: list[str], tag: str, show: bool) -> None:
    for k in kernels:
        lines = sass(cubin, k)
        bodies = loops(lines)
        print(f"{tag} {k}: {sum(1 for x in lines if not x.endswith(':'))} instructions, loops {[len(b) for b in bodies]}")
        for b in bodies if show else ():
            print("\n".join("      " + x for x in b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", nargs="*")
    ap.add_argument("--unchecked", action="store_true", help="the unchecked build (default: checked)")
    ap.add_argument("--set", action="append", default=[], help="GpuHooks switch=value (0/1 for booleans)")
    ap.add_argument("--twin", action="store_true", help="also the CUDA C twins (nvcc)")
    ap.add_argument("--show", action="store_true", help="print the loop bodies")
    ns = ap.parse_args(argv)
    import bench_ir_gpu as big
    from vxpu.ir.compile import compile_module
    from vxpu.ir.lower.gpu import GpuHooks
    from vxpu.ir.text import parse

    for item in ns.set:
        key, _, value = item.partition("=")
        old = getattr(GpuHooks, key)
        setattr(GpuHooks, key, bool(int(value)) if isinstance(old, bool) else value)
    stems = ns.samples or sorted(p.stem for p in (big.ROOT / "examples" / "kernels").glob("*.vxir"))
    with tempfile.TemporaryDirectory() as tmp:
        for stem in stems:
            mod = parse((big.ROOT / "examples" / "kernels" / f"{stem}.vxir").read_text())
            cm = compile_module(mod, "nvptx", arch="sm_90", cache=False, checked=not ns.unchecked)
            cubin = Path(tmp) / f"{stem}.cubin"
            cubin.write_bytes(cm.image)
            report(cubin, [k.name for k in mod.kernels], "unchecked" if ns.unchecked else "checked", ns.show)
        if ns.twin:
            src = Path(tmp) / "twin.cu"
            src.write_text(big.SAMPLE_CUDA)
            cubin = Path(tmp) / "twin.cubin"
            subprocess.run([tool("nvcc"), "-O3", "-arch=sm_90", "-cubin", "-o", str(cubin), str(src)], check=True)
            names = [f"s_{big.SAMPLES[s]}" for s in stems if s in big.SAMPLES]
            report(cubin, names, "CUDA C", ns.show)
    return 0


if __name__ == "__main__":
    sys.exit(main())
