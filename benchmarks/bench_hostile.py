"""Benchmark of the issue-7 defences: what sandboxed compiles and per-connection caps cost.

Three measurements:

* ``latency`` — cold compile (no cache) of every sample kernel for each target, in this
  process and through a warm compile worker (:mod:`vxpu.ir.workers`); the difference is what
  the sandbox adds (the module in, the serialised native code out, a second decode+verify).
* ``hold`` — how long a module that passes the verifier can hold a worker: the slowest legal
  shapes at the complexity limits, and how precisely the wall-clock deadline ends an overrun.
* ``vfio`` — the vfio-user server's REGION_READ rate, one at a time and pipelined (64 requests
  per write), with the server of the current tree and with ``--before REV``'s ``transport.py``,
  ``server.py`` and ``dma.py`` (the server runs as ``python -S`` from a package tree built in a
  temporary directory, so both variants load identically).

Usage::

    python benchmarks/bench_hostile.py [latency] [hold] [vfio] [--reps N] [--before REV] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "ir"))

TARGETS = (("x86", None), ("nvptx", "sm_90"), ("amdgpu", "gfx942"))


def _compile_ms(data: bytes, kind: str, arch: str | None, pool: Any) -> float:
    from vxpu.ir.compile import compile_module

    t0 = time.perf_counter()
    compile_module(data, kind, arch=arch, cache=False, workers=pool)
    return (time.perf_counter() - t0) * 1e3


def latency(reps: int, targets: tuple[str, ...] = tuple(t for t, _ in TARGETS)) -> list[dict[str, Any]]:
    """Cold compile per sample and target: in-process vs a warm worker (interleaved)."""
    from vxpu.ir import samples
    from vxpu.ir.binary import encode
    from vxpu.ir.compile import compile_module
    from vxpu.ir.text import parse
    from vxpu.ir.workers import CompilePool

    rows = []
    files = sorted(samples.kernels_dir().glob("*.vxir"))
    with CompilePool(1) as pool:
        for kind, arch in TARGETS:
            if kind not in targets:
                continue
            for f in files:
                data = encode(parse(f.read_text()))
                try:
                    compile_module(data, kind, arch=arch, cache=False)
                    compile_module(data, kind, arch=arch, cache=False, workers=pool)
                except Exception as exc:  # noqa: BLE001 - a missing toolchain skips the target
                    rows.append({"target": kind, "sample": f.stem, "skipped": str(exc)[:120]})
                    break
                here, there = [], []
                for _ in range(reps):          # interleaved, so load on the machine hits both alike
                    here.append(_compile_ms(data, kind, arch, None))
                    there.append(_compile_ms(data, kind, arch, pool))
                rows.append({"target": kind, "sample": f.stem, "in_process_ms": statistics.median(here),
                             "worker_ms": statistics.median(there),
                             "added_ms": statistics.median(there) - statistics.median(here),
                             "added_min_ms": min(there) - min(here)})
                print(rows[-1], flush=True)
    return rows


def hold() -> list[dict[str, Any]]:
    """Seconds the slowest legal shapes hold a worker (default limits), and a deadline's precision."""
    import hostile_shapes as hs
    from vxpu.ir import limits
    from vxpu.ir.binary import encode
    from vxpu.ir.compile import compile_module
    from vxpu.ir.workers import CompileLimitError, CompilePool, WorkerLimits

    shapes = {
        "many_kernels(4 x 8192 ops: module limit)": hs.many_kernels(4, limits.MAX_OPS_PER_KERNEL),
        "straight_line(8192 ops: kernel limit)": hs.straight_line(limits.MAX_OPS_PER_KERNEL),
        "branch_chain(2048 blocks)": hs.branch_chain(limits.MAX_BLOCKS),
        "loop_nest(32 deep)": hs.loop_nest(limits.MAX_LOOP_DEPTH),
        "many_kernels(256 x 128 ops)": hs.many_kernels(limits.MAX_KERNELS, limits.MAX_OPS_PER_MODULE // 256),
    }
    rows = []
    with CompilePool(1) as pool:
        compile_module(encode(hs.straight_line(10)), "x86", cache=False, workers=pool)
        for name, module in shapes.items():
            data = encode(module, names=False)
            t0 = time.perf_counter()
            try:
                compile_module(data, "x86", cache=False, workers=pool)
                outcome = "ok"
            except CompileLimitError as exc:
                outcome = f"COMPILE_LIMIT ({exc.reason})"
            rows.append({"shape": name, "bytes": len(data), "seconds": time.perf_counter() - t0, "outcome": outcome})
            print(rows[-1], flush=True)
    slow = encode(hs.many_kernels(4, limits.MAX_OPS_PER_KERNEL), names=False)
    for wall in (1.0, 3.0):
        with CompilePool(1, WorkerLimits(wall_seconds=wall)) as pool:
            compile_module(encode(hs.straight_line(10)), "x86", cache=False, workers=pool)
            t0 = time.perf_counter()
            try:
                compile_module(slow, "x86", cache=False, workers=pool)
                outcome = "ok"
            except CompileLimitError as exc:
                outcome = f"COMPILE_LIMIT ({exc.reason})"
            rows.append({"shape": f"module limit, deadline {wall:g} s", "seconds": time.perf_counter() - t0,
                         "outcome": outcome})
            print(rows[-1], flush=True)
    return rows


# --- vfio message rate ----------------------------------------------------------------------------

def _package_tree(dest: Path, before: str | None) -> Path:
    """A ``vxpu`` package tree (symlinks into this checkout) whose server files come from
    ``before`` when given."""
    pkg = dest / "vxpu"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "vxpu").iterdir():
        (pkg / entry.name).symlink_to(entry)
    server = pkg / "vfio_server"
    server.mkdir()
    for entry in (ROOT / "vfio_server").iterdir():
        if before is not None and entry.name in ("transport.py", "server.py", "dma.py"):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{before}:vfio_server/{entry.name}"],
                                  capture_output=True, text=True, check=True).stdout
            (server / entry.name).write_text(text)
        else:
            (server / entry.name).symlink_to(entry)
    return dest


def _serve(tree: Path, path: Path) -> subprocess.Popen[bytes]:
    code = ("import sys; from vxpu.vfio_server.server import VfioUserServer; "
            "from vxpu.vfio_server.testdev import TestDevice; "
            f"VfioUserServer({str(path)!r}, TestDevice()).serve_forever()")
    env = dict(os.environ, PYTHONPATH=f"{tree}:{sysconfig.get_paths()['purelib']}")
    proc = subprocess.Popen([sys.executable, "-S", "-c", code], env=env, stdin=subprocess.DEVNULL, cwd=tree)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return proc
            except OSError:
                time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not listen")


def _cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _rates(path: Path, pid: int, n: int, depth: int = 64) -> dict[str, float]:
    from vxpu.vfio_server import protocol as P
    from vxpu.vfio_server.client import VfioUserClient

    from vxpu.abi import testdev as abi

    with VfioUserClient(path) as c:
        c.handshake()
        c.region_write(7, 4, struct.pack("<H", 0x0006))
        for _ in range(500):
            c.region_read(0, abi.MAGIC, 4)
        t0 = time.perf_counter()
        for _ in range(n):
            c.region_read(0, abi.MAGIC, 4)
        serial = n / (time.perf_counter() - t0)
        one = P.REGION_ACCESS.pack(abi.MAGIC, 0, 4)
        batch = b"".join(P.pack_header(i, P.Command.REGION_READ, P.HEADER_SIZE + len(one), P.TYPE_COMMAND) + one
                         for i in range(depth))
        rounds = max(1, n // depth)
        cpu0 = _cpu_ns(pid)
        t0 = time.perf_counter()
        for _ in range(rounds):
            c.send_raw(batch)
            for _ in range(depth):
                c.recv_message()
        pipelined = rounds * depth / (time.perf_counter() - t0)
        cpu_us = (_cpu_ns(pid) - cpu0) / (rounds * depth) / 1000
    return {"serial_per_s": serial, "pipelined_per_s": pipelined, "server_cpu_us_per_msg_pipelined": cpu_us}


def vfio(before: str, n: int, runs: int) -> dict[str, Any]:
    """REGION_READ rates of the server before and after the caps, runs interleaved."""
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    tmp = Path(tempfile.mkdtemp(prefix="vxpu-bench-hostile-"))
    try:
        trees = {"before": _package_tree(tmp / "before", before), "after": _package_tree(tmp / "after", None)}
        for i in range(runs):
            for variant, tree in trees.items():
                path = tmp / f"{variant}{i}.sock"
                proc = _serve(tree, path)
                try:
                    results[variant].append(_rates(path, proc.pid, n))
                finally:
                    proc.terminate()
                    proc.wait(10)
                print(variant, results[variant][-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {variant: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for variant, rows in results.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="*", default=["latency", "hold", "vfio"], choices=("latency", "hold", "vfio"))
    ap.add_argument("--reps", type=int, default=5, help="compiles per sample and side (median)")
    ap.add_argument("--before", default="5639f96^", help="revision of the server before the caps")
    ap.add_argument("--messages", type=int, default=20000, help="REGION_READs per vfio measurement")
    ap.add_argument("--runs", type=int, default=3, help="server runs per variant (median)")
    ap.add_argument("--targets", default="x86,nvptx,amdgpu", help="compile targets for latency")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    out: dict[str, Any] = {"cpu_count": os.cpu_count()}
    if "latency" in args.what:
        out["latency"] = latency(args.reps, tuple(args.targets.split(",")))
    if "hold" in args.what:
        out["hold"] = hold()
    if "vfio" in args.what:
        out["vfio"] = vfio(args.before, args.messages, args.runs)
        print(out["vfio"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
