"""examples/guest/saxpy.py runs as a user would run it on the host, and says it is correct."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "guest" / "saxpy.py"


@pytest.mark.timeout(180)
def test_guest_example_runs_on_the_host():
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "correct" in proc.stdout and "(host)" in proc.stdout
