"""mypy over the package as installed (scripts/typecheck): cross-layer names are real types.

``scripts/typecheck`` builds ``build/typecheck/vxpu`` from setup.py's folder -> package mapping
and runs ``mypy -p vxpu``; any error fails this test with mypy's report (repository paths).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install 'vxpu[dev]')")
def test_mypy_is_clean_across_layers() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "typecheck")], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}{proc.stderr}"
