"""The guest half of ``vxpu demo``: ``python3 -m vxpu.guest.demo [--json]`` inside a VM.

It opens the VM's accelerator through the SDK (``Device.open()``), runs four of the IR sample
kernels (:mod:`vxpu.ir.sample_kernels`) on random data and checks each against numpy, in the
guest:

``saxpy``    ``y = a * x + y`` on 2^20 floats (numpy's float32 arithmetic, so exact);
``dot``      a block tree reduction with one atomic add per block, on 2^20 pairs (vs float64);
``sgemm``    a 16 x 16-tiled matrix product with shared memory and barriers (vs float64);
``softmax``  a row softmax, one block per row, two shared-memory reductions (vs float64).

It then measures what a guest program sees of the device:

* copies between pinned guest RAM and device memory, both ways (:data:`BANDWIDTH_BYTES`);
* the round trip of a NOP through the rings (post, then poll the completion in guest RAM);
* a trapped BAR0 read (``REG_SCRATCH``), the cost the rings avoid.

``guest_ms`` is the guest's wall-clock time of one launch plus the FENCE that waits for it
(after a warm-up launch that compiles the kernel); ``device_ms`` is one more launch timed by the
device between two events (EVENT_ELAPSED), the kernel without the guest's round trips. ``max_rel_err`` is
``max |got - want| / max |want|`` over all elements; both are ``null`` for a
kernel that failed before it could be checked (its ``error`` says why).

The result is one line, ``VXPU-DEMO {json}`` (``--json``), or a short table; ``phases_s`` says
where the time went (kernel uptime when the program started, importing numpy and the SDK,
opening the device plus the four kernels, the measurements). The exit status is
0 only when every kernel is within its tolerance. numpy is imported when the demo runs, not
when the module is imported (the SDK's modules stay importable without it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from vxpu.abi import xpu

MARKER = "VXPU-DEMO"
SEED = 20261202
N_VEC = 1 << 20
GEMM = 256                      # m = n = k
SOFTMAX = (256, 1024)           # rows, cols
BANDWIDTH_BYTES = 16 << 20
NOOP_SAMPLES = 2000
TRAP_SAMPLES = 500
#: tolerated max_rel_err per kernel (saxpy is computed with numpy's own float32 arithmetic)
TOLERANCE = {"saxpy": 0.0, "dot": 1e-4, "sgemm": 1e-5, "softmax": 1e-5}


def max_rel_err(got: Any, want: Any) -> float:
    """``max |got - want| / max |want|``: the error relative to the result's magnitude
    (elementwise relative error would be dominated by results that cancel to near zero)."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64).ravel()
    want = np.asarray(want, dtype=np.float64).ravel()
    if want.size == 0 or got.shape != want.shape:
        return 0.0 if got.shape == want.shape else float("inf")
    err = float(np.max(np.abs(got - want))) / (float(np.max(np.abs(want))) or 1.0)
    return err if math.isfinite(err) else float("inf")


def _source(name: str) -> str:
    return files("vxpu.ir").joinpath(f"sample_kernels/{name}.vxir").read_text()


LAUNCHES = 3    # warm-up, guest-timed, device-timed: kernels that accumulate are checked after all three


def _timed(dev: Any, launch: Callable[[], None]) -> dict[str, float]:
    """Warm up (compile); then ``guest_ms``, the guest's wall clock of one launch + synchronize,
    and ``device_ms``, one launch between two device events (EVENT_ELAPSED)."""
    launch()
    dev.synchronize()
    t0 = time.perf_counter()
    launch()
    dev.synchronize()
    out = {"guest_ms": (time.perf_counter() - t0) * 1e3}
    start, end = dev.event(), dev.event()
    start.record()
    launch()
    end.record()
    out["device_ms"] = dev.elapsed_ms(start, end)
    start.destroy(), end.destroy()
    return out


def run_saxpy(dev: Any, rng: Any) -> dict[str, Any]:
    import numpy as np

    n, a = N_VEC, np.float32(2.5)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    mod = dev.load_module(_source("saxpy"))
    dx, dy = dev.to_device(x), dev.to_device(y)
    grid = -(-n // 256)
    times = _timed(dev, lambda: mod.saxpy[grid, 256](n, float(a), dx, dy))
    want = y
    for _ in range(LAUNCHES):       # y accumulates: a multiply, then an add, in float32 like the kernel
        want = a * x + want
    err = max_rel_err(dy.to_host(), want)
    dx.free(), dy.free(), mod.unload()
    return {"shape": f"{n} floats", **times, "max_rel_err": err}


def run_dot(dev: Any, rng: Any) -> dict[str, Any]:
    import numpy as np

    n = N_VEC
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    mod = dev.load_module(_source("dot"))
    dx, dy, out = dev.to_device(x), dev.to_device(y), dev.zeros(1, np.float32)
    grid = -(-n // 256)

    def launch() -> None:
        out.fill_bytes(0)
        mod.dot[grid, 256](n, dx, dy, out)

    times = _timed(dev, launch)
    want = np.dot(x.astype(np.float64), y.astype(np.float64))
    err = max_rel_err(out.to_host(), [want])
    dx.free(), dy.free(), out.free(), mod.unload()
    return {"shape": f"{n} pairs", **times, "max_rel_err": err}


def run_sgemm(dev: Any, rng: Any) -> dict[str, Any]:
    import numpy as np

    m = n = k = GEMM
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    mod = dev.load_module(_source("sgemm"))
    da, db, dc = dev.to_device(a), dev.to_device(b), dev.empty((m, n), np.float32)
    grid = (-(-n // 16), -(-m // 16), 1)
    times = _timed(dev, lambda: mod.sgemm[grid, (16, 16, 1)](m, n, k, da, db, dc))
    err = max_rel_err(dc.to_host(), a.astype(np.float64) @ b.astype(np.float64))
    da.free(), db.free(), dc.free(), mod.unload()
    return {"shape": f"{m}x{k} @ {k}x{n}", **times, "max_rel_err": err,
            "gflops": 2 * m * n * k / (times["device_ms"] * 1e6) if times["device_ms"] > 0 else 0.0}


def run_softmax(dev: Any, rng: Any) -> dict[str, Any]:
    import numpy as np

    rows, cols = SOFTMAX
    x = (4 * rng.standard_normal((rows, cols))).astype(np.float32)
    mod = dev.load_module(_source("softmax"))
    dx, dy = dev.to_device(x), dev.empty((rows, cols), np.float32)
    times = _timed(dev, lambda: mod.softmax[rows, 256](rows, cols, dx, dy))
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    err = max_rel_err(dy.to_host(), e / e.sum(axis=1, keepdims=True))
    dx.free(), dy.free(), mod.unload()
    return {"shape": f"{rows} rows x {cols}", **times, "max_rel_err": err}


KERNELS: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "saxpy": run_saxpy, "dot": run_dot, "sgemm": run_sgemm, "softmax": run_softmax}


def measure_bandwidth(dev: Any, nbytes: int = BANDWIDTH_BYTES, reps: int = 3) -> dict[str, float]:
    """Best-of-``reps`` GB/s of pinned guest RAM -> device and back (the data is checked)."""
    import numpy as np

    n = nbytes // 4
    src = dev.pinned(n, np.uint32)
    back = dev.pinned(n, np.uint32)
    src.array[:] = np.arange(n, dtype=np.uint32) * np.uint32(2654435761)
    d = dev.empty(n, np.uint32)
    h2d, d2h = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        dev.copy_to_device(d, src)
        dev.synchronize()
        h2d.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dev.copy_to_host(back, d)
        d2h.append(time.perf_counter() - t0)
    same = bool(np.array_equal(src.array, back.array))
    d.free(), src.free(), back.free()
    if not same:
        raise RuntimeError("the data copied to the device and back differs from the original")
    return {"bandwidth_h2d_gbps": nbytes / min(h2d) / 1e9, "bandwidth_d2h_gbps": nbytes / min(d2h) / 1e9,
            "bandwidth_bytes": nbytes}


def _median_us(op: Callable[[], object], n: int, warmup: int = 100) -> float:
    for _ in range(warmup):
        op()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        op()
        samples.append(clock() - t0)
    return statistics.median(samples) / 1000


def measure_latency(dev: Any) -> dict[str, float]:
    """Median µs of a NOP round trip through the rings, and of one trapped BAR0 read."""
    noop = _median_us(lambda: dev.call(xpu.Opcode.NOP), NOOP_SAMPLES)
    read = dev.transport.read_reg
    trapped = _median_us(lambda: read(xpu.REG_SCRATCH), TRAP_SAMPLES, warmup=20)
    return {"noop_roundtrip_us": noop, "trapped_read_us": trapped}


def run(only: list[str] | None = None, local: str | None = None) -> dict[str, Any]:
    """Open the device, run the kernels and the measurements; the result document.

    Args:
        only: kernel names to run (default all).
        local: run on the host against a ``vxpu serve --backend <local>`` child
            (``Device.local``) instead of the VM's device.
    """
    phases: dict[str, float] = {"uptime_at_start": _uptime()}
    t = time.perf_counter()
    import numpy as np
    from vxpu.guest.sdk import Device

    phases["import_sdk_numpy"] = time.perf_counter() - t
    result: dict[str, Any] = {"ok": False, "kernels": [], "phases_s": phases}
    rng = np.random.default_rng(SEED)
    t0 = time.perf_counter()
    with (Device.local(local) if local else Device.open()) as dev:
        result["open_ms"] = (time.perf_counter() - t0) * 1e3
        ident = dev.identify()
        result["device"] = str(ident.get("name", "?"))
        for name, fn in KERNELS.items():
            if only and name not in only:
                continue
            entry: dict[str, Any] = {"name": name}
            try:
                entry.update(fn(dev, rng))
                entry["ok"] = entry["max_rel_err"] <= TOLERANCE[name]
            except Exception as exc:  # noqa: BLE001 - one kernel's failure is reported, the others still run
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}", max_rel_err=None, guest_ms=None, device_ms=None)
                traceback.print_exc(file=sys.stderr)
            result["kernels"].append(entry)
        t = time.perf_counter()
        phases["kernels"] = t - t0
        result.update(measure_bandwidth(dev))
        result.update(measure_latency(dev))
        phases["measurements"] = time.perf_counter() - t
    result["ok"] = bool(result["kernels"]) and all(k["ok"] for k in result["kernels"])
    return result


def _uptime() -> float:
    """Seconds since the (guest) kernel booted, or 0 where /proc/uptime is missing."""
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _round(doc: Any) -> Any:
    if isinstance(doc, float):
        return float(f"{doc:.4g}") if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _round(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_round(v) for v in doc]
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m vxpu.guest.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help=f"print one '{MARKER} {{json}}' line")
    parser.add_argument("--kernel", action="append", choices=sorted(KERNELS), help="run only this kernel (repeatable)")
    parser.add_argument("--local", metavar="BACKEND", help="outside a VM: drive a host 'vxpu serve --backend BACKEND'")
    args = parser.parse_args(argv)
    try:
        result = run(args.kernel, args.local)
    except Exception as exc:  # noqa: BLE001 - any failure becomes the result document
        traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "kernels": [], "error": f"{type(exc).__name__}: {exc}"}
    result = _round(result)
    if args.json:
        sys.stdout.write(f"{MARKER} {json.dumps(result, separators=(',', ':'))}\n")
    else:
        for k in result["kernels"]:
            print(f"{'ok' if k['ok'] else 'FAIL':<4}  {k['name']:<8} {k.get('shape', ''):<20} "
                  f"{k.get('guest_ms')} ms  max rel err {k.get('max_rel_err')}  {k.get('error', '')}")
        print({k: v for k, v in result.items() if k != "kernels"})
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
