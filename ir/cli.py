"""``vxpu ir``: check, optimize, compile and run IR kernels from the command line.

::

    vxpu ir check FILE [--json]                      verify; exit 1 listing every problem
    vxpu ir opt FILE [-O N | --passes a,b] [-o OUT]  print the optimized .vxir
    vxpu ir compile FILE --target T [--arch A] [-O N] --emit E -o OUT
    vxpu ir run FILE --kernel K --grid G --block B --args ... [--interp] [--json]

FILE is .vxir text or the VXIR binary encoding (recognised by its magic). Heavy modules
(numpy, llvmlite) are imported inside the commands. The ``run`` argument syntax is described
in :data:`ARGS_HELP` (and ``vxpu ir run --help``); it is parsed by :mod:`vxpu.ir.cliargs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from vxpu.errors import ConfigError

log = logging.getLogger(__name__)

#: target -> the artifacts it can emit
EMITS = {
    "x86": ("llvm", "asm", "obj"),
    "nvptx": ("llvm", "ptx", "asm", "cubin"),
    "amdgpu": ("llvm", "asm", "obj", "hsaco"),
}

ARGS_HELP = """\
kernel arguments, one NAME=VALUE per parameter (in any order):
  scalars   n=1000  a=2.5  b=-3  mask=0xff  t=inf  (parsed for the parameter's type)
  buffers (pointer parameters), TYPE is i8 i16 i32 i64 f16 f32 f64 and SHAPE is N or NxM...:
    zeros:TYPE:SHAPE        all zeros            ones:TYPE:SHAPE    all ones
    rand:TYPE:SHAPE[:SEED]  floats uniform in [0, 1), integers uniform in [0, 100)
    arange:TYPE:SHAPE       0, 1, 2, ...         fill:TYPE:SHAPE:V  every element V
    list:TYPE:V1,V2,...     the given values     npy:PATH           a .npy file
example:
  vxpu ir run examples/kernels/saxpy.vxir --kernel saxpy --grid 4 --block 256 \\
      --args n=1000 a=2.0 x=rand:f32:1000 y=zeros:f32:1000
Every buffer is printed after the run (--show elements each; --json for scripts).
"""


def register(subparsers: Any) -> None:
    """Add ``vxpu ir ...`` to the top-level CLI."""
    ir = subparsers.add_parser("ir", help="check, optimize, compile and run IR kernels",
                               description="Work with vxpu IR modules (.vxir text or VXIR binary).")
    sub = ir.add_subparsers(dest="ir_command", metavar="COMMAND")
    ir.set_defaults(func=lambda args: (ir.print_help(), 2)[1])

    p = sub.add_parser("check", help="verify a module; exit 1 listing every problem")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("opt", help="print the module optimized at -O N")
    p.add_argument("file", type=Path)
    p.add_argument("-O", dest="opt", type=int, default=3, choices=range(4), help="level 0-3 (default 3)")
    p.add_argument("--passes", help="run these passes in order instead of a level (comma-separated: "
                                    "constfold, simplifycfg, cse, licm, dce)")
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    p.set_defaults(func=cmd_opt)

    p = sub.add_parser("compile", help="compile a module to LLVM IR, PTX, cubin, hsaco, assembly or an object")
    p.add_argument("file", type=Path)
    p.add_argument("--target", required=True, choices=tuple(EMITS))
    p.add_argument("--arch", help="sm_90, gfx942, an x86 CPU name ... (default: the target's default)")
    p.add_argument("-O", dest="opt", type=int, default=3, choices=range(4),
                   help="IR passes and LLVM level 0-3 (default 3)")
    p.add_argument("--emit", required=True, choices=("llvm", "ptx", "cubin", "hsaco", "asm", "obj"),
                   help="x86: llvm asm obj; nvptx: llvm ptx asm cubin; amdgpu: llvm asm obj hsaco")
    p.add_argument("-o", "--output", type=Path, default=Path("-"),
                   help="output file (default: stdout, for text artifacts: llvm, ptx, asm)")
    p.add_argument("--unchecked", action="store_true",
                   help="no per-buffer bounds checks (trusted modules only; guests always get checked code)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a kernel on the CPU (x86 JIT, or --interp) and print the buffers",
                       epilog=ARGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.add_argument("--kernel", help="kernel name (default: the only kernel of the module)")
    p.add_argument("--grid", default="1", help="blocks per grid: X, XxY or XxYxZ (default 1)")
    p.add_argument("--block", default="1", help="threads per block: X, XxY or XxYxZ (default 1)")
    p.add_argument("--args", nargs="*", default=[], metavar="NAME=VALUE", help="kernel arguments (see below)")
    p.add_argument("--interp", action="store_true", help="use the reference interpreter instead of the x86 JIT")
    p.add_argument("--detect-races", action="store_true",
                   help="with --interp: fail on data races (accesses no barrier orders)")
    p.add_argument("-O", dest="opt", type=int, default=3, choices=range(4), help="level 0-3 (default 3)")
    p.add_argument("--show", type=int, default=16, help="elements printed per buffer (default 16)")
    p.add_argument("--full", action="store_true", help="print every element")
    p.add_argument("--save", type=Path, help="also save every buffer to this .npz file")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_run)


# --- loading ---------------------------------------------------------------------------------

def load_file(path: Path, *, verify: bool = True) -> Any:
    """Read a .vxir text or VXIR binary file into a Module.

    Raises:
        ConfigError: the file cannot be read.
        ParseError / DecodeError / VerifyError: the module is invalid (every problem listed).
    """
    from vxpu.ir.binary import MAGIC, decode
    from vxpu.ir.text import parse

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data.startswith(MAGIC):
        module = decode(data, verify=False)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is neither .vxir text (UTF-8) nor VXIR binary: {exc}") from None
        module = parse(text)
    if verify:
        from vxpu.ir.verify import verify as verify_module

        verify_module(module)
    return module


def _write(path: Path, data: str | bytes) -> None:
    if str(path) == "-":
        if isinstance(data, bytes):
            raise ConfigError("binary output cannot go to stdout; give -o FILE")
        sys.stdout.write(data)
        return
    try:
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


# --- check / opt -------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    """``vxpu ir check``: 0 if valid, 1 (with every problem printed) if not."""
    from vxpu.ir.errors import IRError

    try:
        module = load_file(args.file)
    except IRError as exc:
        problems = getattr(exc, "problems", None)
        if args.json:
            items = [{"location": str(p.location), "message": p.message} for p in problems] if problems \
                else [{"location": "module", "message": str(exc)}]
            print(json.dumps({"file": str(args.file), "ok": False, "problems": items}))
        else:
            print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    kernels = [k.name for k in module.kernels]
    if args.json:
        print(json.dumps({"file": str(args.file), "ok": True, "module": module.name, "kernels": kernels}))
    else:
        print(f"{args.file}: ok (module @{module.name}, {len(kernels)} kernel(s): {', '.join(kernels)})")
    return 0


def optimize_module(module: Any, level: int, passes: str | None = None) -> None:
    """Run a level's pipeline, or the named passes in order, over ``module`` in place.

    Raises:
        IRError: an unknown pass name.
    """
    from vxpu.ir.passes import optimize, run_pass

    if passes:
        for name in (p.strip() for p in passes.split(",")):
            if name:
                run_pass(module, name)
    else:
        optimize(module, level)


def cmd_opt(args: argparse.Namespace) -> int:
    """``vxpu ir opt``: print (or write) the optimized module as .vxir."""
    from vxpu.ir.text import print_module

    module = load_file(args.file)
    optimize_module(module, args.opt, args.passes)
    text = print_module(module)
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write(args.output, text)
    return 0


# --- compile -----------------------------------------------------------------------------------

def cmd_compile(args: argparse.Namespace) -> int:
    """``vxpu ir compile``: write the requested artifact."""
    if args.emit not in EMITS[args.target]:
        raise ConfigError(f"--emit {args.emit} is not available for --target {args.target}; "
                          f"use one of {', '.join(EMITS[args.target])}")
    module = load_file(args.file)
    optimize_module(module, args.opt)
    t0 = time.perf_counter()
    data = emit(module, args.target, args.emit, arch=args.arch, opt_level=args.opt, checked=not args.unchecked)
    log.info("compiled %s for %s (%s) in %.1f ms", args.file, args.target, args.emit,
             (time.perf_counter() - t0) * 1e3)
    _write(args.output, data)
    return 0


def emit(module: Any, target: str, what: str, *, arch: str | None = None, opt_level: int = 3,
         checked: bool = True) -> str | bytes:
    """One artifact of ``module`` for ``target``: LLVM IR text, PTX/assembly text, or binary
    (``checked``: per-buffer bounds checks, docs/ir-lowering.md §7).

    Raises:
        ToolchainError / CompileError: the toolchain failed (the message has its log).
    """
    from vxpu.ir.compile import compile_module

    if what in ("ptx", "cubin", "hsaco") or (what == "obj" and target == "x86") or \
            (what == "asm" and target == "nvptx"):
        cm = compile_module(module, target, arch=arch, opt_level=opt_level, cache=False, checked=checked)
        return cm.asm if what in ("ptx", "asm") else cm.image
    from vxpu.ir.lower import toolchain as tc

    spec = tc.resolve_target(target, arch)
    if target == "nvptx":
        from vxpu.ir.lower import nvptx

        llvm_text = str(nvptx.lower_module(module, checked))
    elif target == "amdgpu":
        from vxpu.ir.lower import amdgpu

        llvm_text = str(amdgpu.lower_module(module, spec.cov, checked))
    else:
        from vxpu.ir.lower import x86

        llvm_text = str(x86.lower_module(module, checked)[0])
    mod = tc.parse_and_optimize(llvm_text, spec, opt_level)
    if what == "llvm":
        return str(mod)
    if what == "obj":
        return tc.emit_amdgpu_object(mod, spec, opt_level)
    with tc.LLVM_LOCK:
        return str(tc.target_machine(spec, opt_level).emit_assembly(mod.clone()))


# --- run ----------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    """``vxpu ir run``: run one kernel launch and print every buffer afterwards."""
    import numpy as np
    from vxpu.ir import cliargs, samples

    module = load_file(args.file)
    optimize_module(module, args.opt)
    kernel = _pick_kernel(module, args.kernel)
    grid, block = cliargs.parse_dims(args.grid, "--grid"), cliargs.parse_dims(args.block, "--block")
    values, buffers = cliargs.parse_args(kernel, args.args)
    launch = samples.Launch(kernel.name, grid, block, tuple(values))
    backend = "interp" if args.interp else "x86"
    if args.detect_races and not args.interp:
        raise ConfigError("--detect-races needs --interp (the x86 JIT does not track accesses)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        out = samples.run_launches(module, [launch], buffers, backend=backend, opt_level=args.opt,
                                   detect_races=args.detect_races, timings=timings)
    except ValueError as exc:  # the x86 JIT's launch checks (grid/block shape and size)
        raise ConfigError(f"bad launch of @{kernel.name}: {exc}") from None
    seconds = time.perf_counter() - t0
    if args.save is not None:
        try:
            np.savez(args.save, allow_pickle=False, **out)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.save}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps({"kernel": kernel.name, "backend": backend, "grid": grid, "block": block,
                          "seconds": seconds, "compile_seconds": timings["compile"],
                          "kernel_seconds": timings["kernel"],
                          "buffers": {n: cliargs.buffer_json(a) for n, a in out.items()}}))
        return 0
    print(f"@{kernel.name} grid {grid} block {block} on {backend}: compile {timings['compile'] * 1e3:.1f} ms, "
          f"kernel {timings['kernel'] * 1e3:.3f} ms")
    limit = None if args.full else max(0, args.show)
    for name, arr in out.items():
        print(cliargs.format_buffer(name, arr, limit))
    return 0


def _pick_kernel(module: Any, name: str | None) -> Any:
    if name is not None:
        return module.kernel(name)
    if len(module.kernels) != 1:
        raise ConfigError(f"module @{module.name} has {len(module.kernels)} kernels; choose one with --kernel "
                          f"({', '.join(k.name for k in module.kernels)})")
    return module.kernels[0]
