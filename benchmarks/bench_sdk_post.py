"""Benchmark: the guest SDK's own Python per command, with no server and no backend.

The SDK (:class:`vxpu.guest.Device`) runs over :class:`NullTransport`, an in-process stand-in
for the accelerator whose "device" does nothing while a measurement runs: it keeps
``FLAG_NEED_WAKEUP`` clear (an awake device that polls ``sq_tail``, so no doorbell is rung, as
on a busy server), never consumes a descriptor by itself, and between timed rounds the
benchmark writes OK completions for what was posted (untimed). For the synchronous rows the
completions a call will wait for are written *before* the call (tags of commands not yet
posted), so ``synchronize()`` finds its FENCE completed at its first poll: what is timed is
exactly the guest's Python, the part of a round trip that no server change can remove.

During set-up (open, MODULE_LOAD, KERNEL_GET, MEM_ALLOC) the stand-in behaves like a sleeping
device that runs everything at the doorbell, enough for ``Device``, ``load_module`` and
``empty`` to work unchanged.

Rows (nanoseconds; the minimum over rounds, this 2-core machine being shared, and the median):

* posts, timed as rounds of ``--batch`` calls (per call = round / batch): ``ring.post(NOP)``,
  the empty kernel ``launcher()``, ``saxpy[g, b](n, a, x, y)`` (4 arguments, 24-byte blob in the
  side area), the same written ``mod.saxpy[4, 256](...)`` (attribute, launcher look-up, call),
  ``Device.launch`` with a prepared blob, the saxpy launcher inside ``dev.batch()``, a 64 KiB
  pinned ``copy_to_device`` and ``copy_to_host(blocking=False)``;
* round trips, timed one call at a time with the completions already written: ``synchronize()``
  (a FENCE), empty ``launcher()`` + ``synchronize()`` (LAUNCH + FENCE), saxpy + ``synchronize()``,
  and 16 ``copy_to_host(blocking=False)`` + ``synchronize()``, the guest's whole share of one of
  ``bench_sdk.py``'s copy batches (its last poll takes 17 completions);
* the timer's own cost (two ``perf_counter_ns`` calls), included in the round-trip rows;
* "echo process" rows (``--no-echo`` skips them): a forked process plays a device that
  completes every descriptor OK as soon as it sees it (spinning on ``sq_tail``; MEM_ALLOC
  answers address 0), so waits really wait for another process: LAUNCH + FENCE, FENCE alone,
  MEM_ALLOC + MEM_FREE, a staged 4 KiB ``to_device`` and ``to_host``, and 256 launches then a
  FENCE (per launch). The echo process's own time is in these figures, the same for every tree.

No GPU and no server are involved, so it runs anywhere the SDK does (a few seconds), the GPU
host included, where it gives the guest's share of bench_sdk's round trips on that CPU.

``--guest DIR`` imports ``vxpu.guest`` from ``DIR`` instead of the installed tree, so that two
versions of the SDK are measured by the same script in the same session
(``git archive REV guest | tar -x -C /tmp/old`` then ``--guest /tmp/old/guest``).

Usage: ``python benchmarks/bench_sdk_post.py [--rounds N] [--batch K] [--guest DIR] [--no-echo]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import signal
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any


def use_guest_tree(folder: str) -> None:
    """Import ``vxpu.guest`` from ``folder`` (e.g. ``git archive REV guest | tar -x -C DIR``
    gives ``DIR/guest``) instead of the installed one: the A/B switch. Call before anything
    imports the SDK."""
    import importlib.util

    import vxpu

    init = os.path.join(folder, "__init__.py")
    spec = importlib.util.spec_from_file_location("vxpu.guest", init, submodule_search_locations=[folder])
    if spec is None or spec.loader is None:
        raise SystemExit(f"no package at {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vxpu.guest"] = module
    spec.loader.exec_module(module)
    vxpu.guest = module  # type: ignore[attr-defined]


if __name__ == "__main__" and "--guest" in sys.argv[1:-1]:
    use_guest_tree(sys.argv[sys.argv.index("--guest") + 1])

from vxpu.guest.sdk import Device  # (imported after the optional --guest switch)
from vxpu.guest.transport import DmaMemory
from vxpu.ir import decode, parse
from vxpu.ir.args import kernel_signature

from vxpu.abi import xpu
from vxpu.abi.status import Status

BASE = 0x1000_0000
_U32 = struct.Struct("<I")

IR = """module @bench
kernel @empty() {
^entry:
  ret
}
kernel @saxpy(%n: i32, %a: f32, %x: ptr<global>, %y: ptr<global>) {
^entry:
  ret
}
"""


class NullTransport:
    """Guest RAM in a shared mapping and a device that runs commands only when told to.

    ``awake`` False (set-up): FLAG_NEED_WAKEUP is set and every doorbell runs what was
    submitted (MEM_ALLOC, MODULE_LOAD, KERNEL_GET answered; everything else OK). ``awake`` True
    (measurement): the flag is clear and nothing runs until :meth:`complete_posted`.
    """

    name = "null"

    def __init__(self, size: int = 16 << 20) -> None:
        self.ram = mmap.mmap(-1, size)          # anonymous and shared: a forked echo device sees it
        self.view = memoryview(self.ram)
        self.next = 0
        self.regs: dict[int, int] = {xpu.REG_MAGIC: xpu.MAGIC_VALUE, xpu.REG_VERSION: xpu.VERSION_VALUE}
        self.sq_head = self.cq_tail = 0
        self.next_handle = 0x10000
        self.kernels: dict[tuple[int, str], int] = {}      # (module, name) -> packed argument size
        self.modules: dict[int, Any] = {}
        self.awake = False

    # -- Transport -------------------------------------------------------------------------------
    def read_reg(self, offset: int) -> int:
        if offset == xpu.REG_STATUS:
            return int(xpu.DeviceStatus.ENABLED) if self.regs.get(xpu.REG_QUEUE_ENABLE) else 0
        return self.regs.get(offset, 0)

    def write_reg(self, offset: int, value: int) -> None:
        self.regs[offset] = value
        if offset == xpu.REG_QUEUE_ENABLE and value:
            self.sq_head = self.cq_tail = 0
            self.set_awake(self.awake)
        if offset == xpu.REG_DOORBELL and not self.awake:
            self.run()

    def alloc_dma(self, size: int, *, contiguous: bool = False) -> DmaMemory:
        size = -(-size // 4096) * 4096
        off = self.next
        self.next += size
        if self.next > len(self.ram):
            raise MemoryError("NullTransport RAM exhausted")
        return DmaMemory(self.view[off:off + size], [(0, BASE + off, size)])

    def free_dma(self, mem: DmaMemory) -> None:
        pass

    def close(self) -> None:
        pass

    # -- the device ------------------------------------------------------------------------------
    def _addr(self, lo: int) -> int:
        return (self.regs.get(lo, 0) | self.regs.get(lo + 4, 0) << 32) - BASE

    def set_awake(self, awake: bool) -> None:
        """Awake: need-wakeup clear, nothing runs by itself. Asleep: set, doorbells run."""
        self.awake = awake
        _U32.pack_into(self.ram, self._addr(xpu.REG_QUEUE_BASE_LO) + xpu.QH_FLAGS,
                       0 if awake else xpu.FLAG_NEED_WAKEUP)

    def _store(self, sq_head: int, cq_tail: int) -> None:
        hdr = self._addr(xpu.REG_QUEUE_BASE_LO)
        _U32.pack_into(self.ram, hdr + xpu.QH_SQ_HEAD, sq_head & xpu.INDEX_MASK)
        _U32.pack_into(self.ram, hdr + xpu.QH_CQ_TAIL, cq_tail & xpu.INDEX_MASK)

    def run(self) -> None:
        """Execute every submitted descriptor (set-up commands answered, the rest OK)."""
        sq, cq = self._addr(xpu.REG_SQ_BASE_LO), self._addr(xpu.REG_CQ_BASE_LO)
        nsq, ncq = self.regs[xpu.REG_SQ_ENTRIES], self.regs[xpu.REG_CQ_ENTRIES]
        tail = _U32.unpack_from(self.ram, self._addr(xpu.REG_QUEUE_BASE_LO) + xpu.QH_SQ_TAIL)[0]
        while self.sq_head != tail:
            d = xpu.DESCRIPTOR.unpack_from(self.ram, sq + (self.sq_head % nsq) * xpu.SQ_ENTRY_SIZE)
            status, result, result2 = self._execute(d)
            xpu.COMPLETION.pack_into(self.ram, cq + (self.cq_tail % ncq) * xpu.CQ_ENTRY_SIZE, d[3], result,
                                     result2, status, 0)
            self.sq_head = (self.sq_head + 1) & xpu.INDEX_MASK
            self.cq_tail = (self.cq_tail + 1) & xpu.INDEX_MASK
        self._store(self.sq_head, self.cq_tail)

    def _execute(self, d: tuple[int, ...]) -> tuple[int, int, int]:
        op, a0, addr, length = d[0], d[4], d[8], d[9]
        if op == xpu.Opcode.MEM_ALLOC:
            handle, self.next_handle = self.next_handle, self.next_handle + max(a0, 256)
            return 0, handle, 0
        if op == xpu.Opcode.MODULE_LOAD:
            handle, self.next_handle = self.next_handle, self.next_handle + 16
            self.modules[handle] = decode(bytes(self.ram[addr - BASE:addr - BASE + length]))
            return 0, handle, 0
        if op == xpu.Opcode.KERNEL_GET:
            name = bytes(self.ram[addr - BASE:addr - BASE + length]).decode()
            kernel = next((k for k in self.modules[a0].kernels if k.name == name), None)
            if kernel is None:
                return int(Status.NOT_FOUND), 0, 0
            handle, self.next_handle = self.next_handle, self.next_handle + 16
            return 0, handle, kernel_signature(kernel).args_size
        return 0, 0, 0

    def complete_posted(self) -> None:
        """OK completions for everything submitted (tags from the descriptors)."""
        sq, cq = self._addr(xpu.REG_SQ_BASE_LO), self._addr(xpu.REG_CQ_BASE_LO)
        nsq, ncq = self.regs[xpu.REG_SQ_ENTRIES], self.regs[xpu.REG_CQ_ENTRIES]
        tail = _U32.unpack_from(self.ram, self._addr(xpu.REG_QUEUE_BASE_LO) + xpu.QH_SQ_TAIL)[0]
        while self.sq_head != tail:
            tag = struct.unpack_from("<Q", self.ram, sq + (self.sq_head % nsq) * xpu.SQ_ENTRY_SIZE + 8)[0]
            xpu.COMPLETION.pack_into(self.ram, cq + (self.cq_tail % ncq) * xpu.CQ_ENTRY_SIZE, tag, 0, 0, 0, 0)
            self.sq_head = (self.sq_head + 1) & xpu.INDEX_MASK
            self.cq_tail = (self.cq_tail + 1) & xpu.INDEX_MASK
        self._store(self.sq_head, self.cq_tail)

    def complete_ahead(self, first_tag: int, count: int) -> None:
        """OK completions for the next ``count`` commands, tags ``first_tag`` on, before the guest
        posts them (the device "finished" them at once); call with nothing else in flight."""
        cq, ncq = self._addr(xpu.REG_CQ_BASE_LO), self.regs[xpu.REG_CQ_ENTRIES]
        for i in range(count):
            xpu.COMPLETION.pack_into(self.ram, cq + (self.cq_tail % ncq) * xpu.CQ_ENTRY_SIZE, first_tag + i,
                                     0, 0, 0, 0)
            self.cq_tail = (self.cq_tail + 1) & xpu.INDEX_MASK
        self.sq_head = (self.sq_head + count) & xpu.INDEX_MASK
        self._store(self.sq_head, self.cq_tail)


#: A word of the queue header page that no one else uses: non-zero tells the echo device to stop.
_ECHO_STOP = 0x800


def echo_device(t: NullTransport) -> int:
    """Fork a process that completes every descriptor OK as soon as it sees it (spinning on
    ``sq_tail``, no sleep, no yield), from the transport's current indices on; its pid. The
    parent must not run the in-process device while it serves (``awake`` stays True); stop it
    with :func:`stop_echo`, which takes its indices back."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:                                        # the child: a device as small as Python allows
        hdr = t.view[t._addr(xpu.REG_QUEUE_BASE_LO):][:xpu.QUEUE_HEADER_ALIGN].cast("I")
        sq, cq = t._addr(xpu.REG_SQ_BASE_LO), t._addr(xpu.REG_CQ_BASE_LO)
        nsq, ncq = t.regs[xpu.REG_SQ_ENTRIES], t.regs[xpu.REG_CQ_ENTRIES]
        head, ctail, ram = t.sq_head, t.cq_tail, t.ram
        tag_at, complete = struct.Struct("<Q").unpack_from, xpu.COMPLETION.pack_into
        sq_tail, sq_head, cq_tail, stop = xpu.QH_SQ_TAIL // 4, xpu.QH_SQ_HEAD // 4, xpu.QH_CQ_TAIL // 4, _ECHO_STOP // 4
        idle = 0
        while not hdr[stop]:
            tail = hdr[sq_tail]
            if tail == head:
                idle += 1
                if not idle & 0xFFFF and os.getppid() != parent:
                    break                       # the benchmark died without stopping us
                continue
            while head != tail:
                complete(ram, cq + (ctail % ncq) * xpu.CQ_ENTRY_SIZE,
                         tag_at(ram, sq + (head % nsq) * xpu.SQ_ENTRY_SIZE + 8)[0], 0, 0, 0, 0)
                head = (head + 1) & xpu.INDEX_MASK
                ctail = (ctail + 1) & xpu.INDEX_MASK
            hdr[sq_head] = head
            hdr[cq_tail] = ctail
    finally:
        os._exit(0)


def stop_echo(t: NullTransport, pid: int) -> None:
    """Stop the echo device ``pid`` and take its ring indices back."""
    hdr_off = t._addr(xpu.REG_QUEUE_BASE_LO)
    _U32.pack_into(t.ram, hdr_off + _ECHO_STOP, 1)
    try:
        os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _U32.pack_into(t.ram, hdr_off + _ECHO_STOP, 0)
    t.sq_head = _U32.unpack_from(t.ram, hdr_off + xpu.QH_SQ_HEAD)[0]
    t.cq_tail = _U32.unpack_from(t.ram, hdr_off + xpu.QH_CQ_TAIL)[0]


class Bench:
    """A device on a NullTransport with the kernels and arrays the rows use."""

    def __init__(self, sq_entries: int = 1024) -> None:
        self.t = NullTransport()
        self.dev = Device(self.t, sq_entries=sq_entries, staging_chunk=64 << 10, staging_count=2)
        mod = self.dev.load_module(parse(IR))
        self.empty = mod.empty[1, 32]
        self.saxpy_kernel = mod.saxpy
        self.saxpy = mod.saxpy[4, 256]
        self.x, self.y = self.dev.empty(1024, "float32"), self.dev.empty(1024, "float32")
        self.host = self.dev.pinned(64 << 10, "uint8")
        self.darr = self.dev.empty(64 << 10, "uint8")
        self.dims = xpu.pack_launch_dims((4, 1, 1), (256, 1, 1), 0)
        self.blob = self.saxpy_kernel.pack((1024, 2.0, self.x, self.y))
        self.dev.synchronize()
        self.t.set_awake(True)
        self.ring = self.dev.ring
        assert self.ring is not None

    def settle(self) -> None:
        """Complete and consume everything posted (untimed)."""
        ring = self.ring
        assert ring is not None
        self.t.complete_posted()
        ring.poll()
        if ring.in_flight:
            raise RuntimeError(f"{ring.in_flight} commands still in flight")
        ring.raise_async()

    def posts(self, fn: Callable[[], None], batch: int, rounds: int) -> list[float]:
        """ns per call of ``fn`` over ``rounds`` rounds of ``batch`` calls."""
        out = []
        clock = time.perf_counter_ns
        loop = range(batch)
        for _ in range(rounds):
            t0 = clock()
            for _ in loop:
                fn()
            out.append((clock() - t0) / batch)
            self.settle()
        return out

    def round_trips(self, fn: Callable[[], None], commands: int, calls: int) -> list[float]:
        """ns per call of ``fn``, whose ``commands`` completions are written before each call."""
        ring = self.ring
        assert ring is not None
        out: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(calls):
            self.t.complete_ahead(ring.submitted, commands)
            t0 = clock()
            fn()
            out.append(clock() - t0)
            if ring.in_flight:
                raise RuntimeError(f"{ring.in_flight} commands still in flight after a round trip")
        return out


def measure(rounds: int, batch: int, echo: bool = True) -> list[dict[str, Any]]:
    b = Bench()
    dev, ring, x, y = b.dev, b.ring, b.x, b.y
    assert ring is not None
    empty, saxpy, kernel, dims, blob, host, darr = b.empty, b.saxpy, b.saxpy_kernel, b.dims, b.blob, b.host, b.darr
    nop = int(xpu.Opcode.NOP)
    mod = kernel.module

    def batched_saxpy() -> None:
        with dev.batch():
            for _ in range(batch):
                saxpy(1024, 2.0, x, y)

    def empty_sync() -> None:
        empty()
        dev.synchronize()

    def saxpy_sync() -> None:
        saxpy(1024, 2.0, x, y)
        dev.synchronize()

    def copies_sync() -> None:
        for _ in range(16):
            dev.copy_to_host(host, darr, blocking=False)
        dev.synchronize()

    posts: list[tuple[str, Callable[[], None]]] = [
        ("ring.post(NOP)", lambda: ring.post(nop)),
        ("empty kernel: launcher()", lambda: empty()),
        ("saxpy[g, b](n, a, x, y)", lambda: saxpy(1024, 2.0, x, y)),
        ("mod.saxpy[4, 256](n, a, x, y) (attribute, launcher, call)", lambda: mod.saxpy[4, 256](1024, 2.0, x, y)),
        ("Device.launch(kernel, dims, blob)", lambda: dev.launch(kernel, dims, blob)),
        ("copy_to_device(DeviceArray, HostArray 64 KiB)", lambda: dev.copy_to_device(darr, host)),
        ("copy_to_host(HostArray 64 KiB, blocking=False)", lambda: dev.copy_to_host(host, darr, blocking=False)),
    ]
    trips: list[tuple[str, Callable[[], None], int]] = [
        ("synchronize() (FENCE already completed)", dev.synchronize, 1),
        ("launcher() + synchronize() (empty kernel)", empty_sync, 2),
        ("saxpy[g, b](...) + synchronize()", saxpy_sync, 2),
        ("16 copy_to_host(blocking=False) + synchronize() (bench_sdk's batch)", copies_sync, 17),
    ]
    raw: dict[str, list[float]] = {}
    # interleave the rows, a few rounds at a time, so a burst of load hits all of them
    step = max(1, rounds // 10)
    done = 0
    while done < rounds:
        n = min(step, rounds - done)
        for name, fn in posts:
            raw.setdefault(name, []).extend(b.posts(fn, batch, n))
        raw.setdefault("saxpy[g, b](...) inside dev.batch()", []).extend(
            [t / batch for t in b.posts(batched_saxpy, 1, n)])
        for name, fn, commands in trips:
            raw.setdefault(name, []).extend(b.round_trips(fn, commands, n * 20))
        clock = time.perf_counter_ns
        raw.setdefault("timer: two perf_counter_ns() calls", []).extend(
            [float(-clock() + clock()) for _ in range(n * 20)])
        done += n
    b.settle()
    if echo:
        echo_rows(b, rounds, batch, raw)
    dev.close()
    return [{"what": k, "min_ns": min(v), "median_ns": statistics.median(v), "samples": len(v)}
            for k, v in raw.items()]


def echo_rows(b: Bench, rounds: int, batch: int, raw: dict[str, list[float]]) -> None:
    """Round trips through :func:`echo_device`, a second process completing each descriptor
    as it sees it: what the guest adds around a device that answers at once, its waiter's
    reaction to a completion included (the echo process's own cost is in every figure too,
    the same for both trees of an A/B)."""
    dev, ring, empty = b.dev, b.ring, b.empty
    assert ring is not None
    clock = time.perf_counter_ns
    data = bytes(4096)
    out_buf = bytearray(4096)
    pid = echo_device(b.t)
    try:
        small = dev.empty(1024, "float32")        # (the echo device answers MEM_ALLOC with 0)
        staged: list[tuple[str, Callable[[], None]]] = [
            ("echo process: dev.empty(1024) (MEM_ALLOC round trip) + free()", lambda: dev.empty(1024).free()),
            ("echo process: to_device(4 KiB bytes) + free() (MEM_ALLOC, staged HTOD)",
             lambda: dev.to_device(data).free()),
            ("echo process: to_host(4 KiB bytearray) (staged DTOH)", lambda: small.to_host(out_buf)),
        ]
        for _ in range(rounds):
            for name, fn in (("echo process: launcher() + synchronize() (empty kernel)", lambda: (empty(), dev.synchronize())),
                             ("echo process: synchronize()", dev.synchronize)):
                out = raw.setdefault(name, [])
                for _ in range(20):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
            for name, fn in staged:
                out = raw.setdefault(name, [])
                for _ in range(5):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
            t0 = clock()
            for _ in range(batch):
                empty()
            dev.synchronize()
            raw.setdefault(f"echo process: {batch} x launcher() then synchronize(), per launch", []).append(
                (clock() - t0) / batch)
        small.free()
        dev.synchronize()
    finally:
        stop_echo(b.t, pid)
    ring.poll()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100, help="timed rounds per post row (default 100)")
    ap.add_argument("--batch", type=int, default=256, help="calls per round of the post rows (default 256)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--no-echo", action="store_true", help="skip the rows through a forked echo device")
    ap.add_argument("--guest", metavar="DIR", help="import vxpu.guest from DIR (an A/B switch: another tree's guest/)")
    args = ap.parse_args(argv)
    if not 1 <= args.batch <= 512:
        ap.error("--batch must be 1..512 (the ring has 1024 slots)")
    rows = measure(args.rounds, args.batch, echo=not args.no_echo)
    width = max(len(r["what"]) for r in rows)
    print(f"{'what':<{width}}  {'min ns':>8}  {'median ns':>9}")
    for r in rows:
        print(f"{r['what']:<{width}}  {r['min_ns']:8.0f}  {r['median_ns']:9.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"python": sys.version.split()[0], "machine": platform.machine(), "guest": args.guest,
                       "rounds": args.rounds, "batch": args.batch, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
