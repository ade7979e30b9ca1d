"""``vxpu ls`` figures from a server's STATS document (the shape the accelerator writes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vxpu.qmp.lifecycle import STATS_STALE_S, stats_summary

DOC = {"abi": "1.0", "device": {"batches": 2, "busy_ns": 307599, "bytes": {"dtoh": 0, "htod": 4096},
                                "commands": {"IDENTIFY": 1, "MEM_ALLOC": 3, "LAUNCH": 2},
                                "errors": {"INVALID_HANDLE": 1}, "fatal_errors": 0, "queue_depth": 1,
                                "resets": 1, "uptime_ns": 90633558}, "session": {}}


def test_summary_totals_and_age(tmp_path: Path) -> None:
    path = tmp_path / "vxpu0.stats"
    path.write_text(json.dumps(DOC))
    got = stats_summary(path)
    assert got is not None and got["age_s"] < 5
    assert {k: v for k, v in got.items() if k != "age_s"} == {
        "uptime_s": 0.1, "commands": 6, "errors": 1, "fatal_errors": 0, "resets": 1, "queue_depth": 1}
    old = time.time() - STATS_STALE_S - 5
    os.utime(path, (old, old))
    got = stats_summary(path)
    assert got is not None and got["age_s"] > STATS_STALE_S


def test_no_or_bad_document_is_none(tmp_path: Path) -> None:
    assert stats_summary(tmp_path / "missing.stats") is None
    (tmp_path / "bad.stats").write_text("{truncated")
    assert stats_summary(tmp_path / "bad.stats") is None
    (tmp_path / "shape.stats").write_text(json.dumps({"device": []}))
    assert stats_summary(tmp_path / "shape.stats") is None
