"""Test-session isolation shared by every suite.

The CLI's ``main()`` (run in-process by the CLI tests) installs a root log handler on the
``sys.stderr`` of that moment, which under pytest is a capture stream closed after the test;
a later test's log line then fails with "I/O operation on closed file". Each test gets the
root logger back as it found it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
