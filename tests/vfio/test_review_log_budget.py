"""Review finding: the hostile-input warning budget must not refill on reconnect.

Each refused message is logged at WARNING only while a budget lasts, then at DEBUG. With a
budget per connection, a peer that reconnects in a loop gets a fresh budget every time and can
flood the log anyway; the budget therefore belongs to the server (it refills slowly, so a
later, unrelated problem is still reported)."""

from __future__ import annotations

import errno
import logging

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server import server as srvmod
from vxpu.vfio_server.client import VfioUserClient

from vxpu.log import LogBudget

from .conftest import expect_error, raw


def test_reconnecting_does_not_refill_the_warning_budget(server, caplog):
    caplog.set_level(logging.DEBUG, logger=server.log.name)
    for _ in range(4):
        with VfioUserClient(server.path, timeout=3.0) as c:
            c.handshake()
            for i in range(srvmod.WARN_BUDGET + 10):
                c.send_raw(raw(P.Command.DMA_UNMAP, b"\0" * 3, msg_id=i))
                expect_error(c, errno.EINVAL, msg_id=i)
    refusals = [r for r in caplog.records if "refused DMA_UNMAP" in r.getMessage()]
    warned = [r for r in refusals if r.levelno >= logging.WARNING]
    assert len(refusals) == 4 * (srvmod.WARN_BUDGET + 10), "every refusal is still logged (at DEBUG)"
    assert len(warned) <= srvmod.WARN_BUDGET + 4, f"{len(warned)} WARNING lines across 4 connections"


def test_budget_refills_slowly():
    import time

    budget = LogBudget(capacity=2, refill_s=0.05)
    assert budget.take() and budget.take()
    assert not budget.take() and not budget.take()
    time.sleep(0.12)
    assert budget.take() and budget.take()      # two refilled
    assert not budget.take()
