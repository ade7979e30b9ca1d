"""Guest half of bench_guest_ring.py: runs inside the VM, prints one ``VXPU-RING {json}`` line.

Measures, in one run and as guest Python sees it (``time.perf_counter_ns`` around each op):
the NOP round trip through the rings, twice: through the SDK (``Device.call``: post, publish,
wait, check; before and after a kernel has run) and through a minimal driver loop on the same
rings (pack the descriptor, store ``sq_tail``, spin on ``cq_tail``, read the completion, store
``cq_head``: the protocol's own cost without the SDK's bookkeeping); the per-command cost of a
batch of NOPs; a trapped BAR0 read and a posted BAR0 write (REG_SCRATCH); a read of the ring
header in guest RAM (the floor); and pinned copy bandwidth both ways for several sizes.
"""

import json
import os
import sys
import time
from importlib.resources import files

import numpy as np
from vxpu.guest.demo import measure_bandwidth
from vxpu.guest.sdk import Device

from vxpu.abi import xpu

N = int(os.environ.get("VXPU_RING_SAMPLES", "2000"))


def dist(op, n=N, warmup=100):
    for _ in range(warmup):
        op()
    clock = time.perf_counter_ns
    s = []
    for _ in range(n):
        t = clock()
        op()
        s.append(clock() - t)
    s.sort()
    return {"median_us": s[len(s) // 2] / 1e3, "p10_us": s[len(s) // 10] / 1e3, "p90_us": s[9 * len(s) // 10] / 1e3,
            "n": n}


def noop(dev):
    ring, d0 = dev.ring, dev.ring.doorbells
    out = dist(lambda: dev.call(xpu.Opcode.NOP))
    out["doorbells_per_op"] = (ring.doorbells - d0) / (N + 100)
    return out


def lean(dev):
    """The minimal NOP round trip on the SDK's rings (the SDK's counters are brought along)."""
    ring = dev.ring
    ring.drain()
    hdr, sq, cq = ring._hdr, ring._sq, ring._cq
    pack, unpack = xpu.DESCRIPTOR.pack_into, xpu.COMPLETION.unpack_from
    sqt, cqh, cqt = xpu.QH_SQ_TAIL // 4, xpu.QH_CQ_HEAD // 4, xpu.QH_CQ_TAIL // 4
    state = [ring._submitted, ring._cq_head, ring._completed]

    def op():
        seq, head, _ = state
        pack(sq, (seq & ring._sq_mask) * xpu.SQ_ENTRY_SIZE, xpu.Opcode.NOP, 0, 0, seq, 0, 0, 0, 0, 0, 0)
        hdr[sqt] = (seq + 1) & xpu.INDEX_MASK
        while hdr[cqt] == head:
            pass
        tag, _r, _r2, status, _ = unpack(cq, (head & ring._cq_mask) * xpu.CQ_ENTRY_SIZE)
        if tag != seq or status:
            raise RuntimeError(f"NOP {seq}: tag {tag}, status {status}")
        state[0], state[1], state[2] = seq + 1, (head + 1) & xpu.INDEX_MASK, state[2] + 1
        hdr[cqh] = state[1]

    out = dist(op)
    ring._submitted = ring._published = state[0]
    ring._cq_head, ring._completed = state[1], state[2]
    return out


def batched(dev, k=32):
    ring = dev.ring

    def op():
        for _ in range(k - 1):
            ring.post(xpu.Opcode.NOP)
        dev.call(xpu.Opcode.NOP)
    d = dist(op, N // k, 10)
    return {"per_op_us": d["median_us"] / k, "batch": k}


def bandwidth(dev, sizes=(1 << 20, 4 << 20, 16 << 20, 64 << 20), reps=3):
    """The demo's pinned-copy measurement (data checked both ways) at several sizes."""
    out = []
    for nbytes in sizes:
        try:
            bw = measure_bandwidth(dev, nbytes, reps)
        except RuntimeError:                     # the copied-back data differed
            out.append({"bytes": nbytes, "ok": False})
            continue
        out.append({"bytes": nbytes, "h2d_gbps": bw["bandwidth_h2d_gbps"], "d2h_gbps": bw["bandwidth_d2h_gbps"],
                    "ok": True})
    return out


def main():
    doc = {}
    with Device.open() as dev:
        doc["device"] = dev.identify().get("name")
        regs = dev.transport
        doc["noop_fresh"] = noop(dev)
        doc["noop_lean"] = lean(dev)
        doc["trapped_read"] = dist(lambda: regs.read_reg(xpu.REG_SCRATCH), N // 4, 20)
        doc["posted_write"] = dist(lambda: regs.write_reg(xpu.REG_SCRATCH, 1), N // 4, 20)
        regs.read_reg(xpu.REG_SCRATCH)
        hdr = dev.ring._hdr
        doc["ram_read"] = dist(lambda: hdr[0x11])
        doc["noop_batched"] = batched(dev)
        mod = dev.load_module(files("vxpu.ir").joinpath("sample_kernels/saxpy.vxir").read_text())
        x = dev.zeros(1 << 16, np.float32)
        y = dev.zeros(1 << 16, np.float32)
        mod.saxpy[256, 256](1 << 16, 1.0, x, y)
        dev.synchronize()
        doc["noop_after_launch"] = noop(dev)
        doc["bandwidth"] = bandwidth(dev)
        doc["stats"] = dev.stats()["device"]
    print("VXPU-RING " + json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
