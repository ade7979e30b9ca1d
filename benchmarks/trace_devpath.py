"""Line up a guest trace and a server trace of the same round trips (``bench_sdk.py --trace``).

Both files hold ``perf_counter_ns`` timestamps (CLOCK_MONOTONIC, one clock for every process of
the host): the guest's ``("start"|"end", kind, t)`` around each round trip and
``("post", opcode, t)`` after each post; the server's ``(key, start, end)`` per timed call
(``VXPU_XPU_PROFILE=1 VXPU_XPU_TRACE=FILE``: ``op:<OPCODE>``, ``flush``, ``synchronize``,
``cycle``). For each round trip this prints the median of every phase, in order:

* LAUNCH + completion (kind 0): guest posts LAUNCH → server starts it → LAUNCH done → server
  starts the FENCE (the LAUNCH's completion group and the next cycle between) → FENCE done →
  its completion group posted → the guest's ``synchronize()`` returns;
* 1 MiB x16 copies (kind 1): first post → first copy issued; last copy issued → the batch's
  completions posted (the wait for the GPU inside) → the guest returns.

Usage: ``python benchmarks/trace_devpath.py GUEST.json SERVER.json``.
"""

from __future__ import annotations

import bisect
import json
import statistics
import sys
from typing import Any

from vxpu.abi.xpu import Opcode

LAUNCH, FENCE = int(Opcode.LAUNCH), int(Opcode.FENCE)


def _rounds(guest: list[list[Any]]) -> list[tuple[int, int, int, list[tuple[int, int]]]]:
    """``(kind, start, end, [(opcode, t_post)])`` per guest round trip."""
    out, cur = [], None
    for what, arg, t in guest:
        if what == "start":
            cur = (arg, t, [])
        elif what == "post" and cur is not None:
            cur[2].append((arg, t))
        elif what == "end" and cur is not None:
            out.append((cur[0], cur[1], t, cur[2]))
            cur = None
    return out


def _within(events: list[list[Any]], starts: list[int], t0: int, t1: int) -> list[list[Any]]:
    i = bisect.bisect_left(starts, t0)
    j = bisect.bisect_right(starts, t1)
    return events[i:j]


def analyse(guest: list[list[Any]], server: list[list[Any]]) -> dict[str, dict[str, float]]:
    """Median microseconds per phase, per kind of round trip."""
    server = sorted(server, key=lambda e: e[1])
    starts = [e[1] for e in server]
    phases: dict[str, dict[str, list[float]]] = {"launch": {}, "copies": {}}

    def add(kind: str, name: str, ns: int) -> None:
        phases[kind].setdefault(name, []).append(ns / 1e3)

    for kind, t0, t1, posts in _rounds(guest):
        ev = _within(server, starts, t0, t1)
        ops = [e for e in ev if e[0].startswith("op:")]
        flushes = [e for e in ev if e[0] == "flush"]
        if kind == 0:
            pl = next((t for op, t in posts if op == LAUNCH), None)
            pf = next((t for op, t in posts if op == FENCE), None)
            el = next((e for e in ops if e[0] == "op:LAUNCH"), None)
            ef = next((e for e in ops if e[0] == "op:FENCE"), None)
            if None in (pl, pf, el, ef):
                continue
            assert pl is not None and pf is not None and el is not None and ef is not None
            fl = [e for e in flushes if e[1] >= ef[2]]
            add("launch", "total", t1 - t0)
            add("launch", "guest: start -> LAUNCH posted", pl - t0)
            add("launch", "LAUNCH posted -> server starts it", el[1] - pl)
            add("launch", "server: LAUNCH", el[2] - el[1])
            add("launch", "guest: LAUNCH posted -> FENCE posted", pf - pl)
            add("launch", "LAUNCH done -> FENCE started", ef[1] - el[2])
            add("launch", "server: FENCE", ef[2] - ef[1])
            if fl:
                add("launch", "FENCE done -> its completion posted", fl[0][2] - ef[2])
                add("launch", "completion posted -> guest returns", t1 - fl[0][2])
        else:
            copies = [e for e in ops if e[0].startswith("op:MEM_COPY")]
            if not copies or not posts or not flushes:
                continue
            last = flushes[-1]
            add("copies", "total", t1 - t0)
            add("copies", "first post -> first copy started", copies[0][1] - posts[0][1])
            add("copies", "first copy started -> last copy issued", copies[-1][2] - copies[0][1])
            add("copies", "last copy issued -> completions posted", last[2] - copies[-1][2])
            add("copies", "completions posted -> guest returns", t1 - last[2])
            add("copies", "guest: posting all", posts[-1][1] - posts[0][1])
    return {kind: {name: statistics.median(v) for name, v in d.items()} for kind, d in phases.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0]) as fh:
        guest = json.load(fh)
    with open(args[1]) as fh:
        server = json.load(fh)
    for kind, d in analyse(guest, server).items():
        print(f"== {kind} (median us)")
        for name, v in d.items():
            print(f"  {name:<44} {v:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
