"""docs/device-abi.md §4 and vxpu.abi.xpu / vxpu.abi.status say the same thing: every register,
opcode, status (with its meaning), fatal code and configuration problem of the module is in
the prose contract, at the same value, and the prose names nothing the module lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vxpu.abi import xpu as abi
from vxpu.abi.status import MEANING, Status

DOC = Path(__file__).resolve().parents[2] / "docs" / "device-abi.md"


@pytest.fixture(scope="module")
def section() -> str:
    text = DOC.read_text()
    start = text.index("## 4. Accelerator device")
    return text[start:text.index("\n## ", start + 10)]


def _part(section: str, heading: str) -> str:
    start = section.index(heading)
    nxt = section.find("\n### ", start + len(heading))
    return section[start:nxt if nxt > 0 else len(section)]


def test_status_table_matches_the_module(section):
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \| (.+) \|$", _part(section, "### 4.4"), re.MULTILINE)
    assert {(int(c), n, m) for c, n, m in rows} == {(int(s), s.name, MEANING[s]) for s in Status}


def test_register_map_matches_the_module(section):
    rows = re.findall(r"^\| (0x[0-9A-F]+)(?: / (0x[0-9A-F]+))? \| ([A-Z_]+)(?: / ([A-Z_]+))? \|",
                      _part(section, "### 4.2"), re.MULTILINE)
    documented = {}
    for lo, hi, name, name_hi in rows:            # "0x20 / 0x24 | QUEUE_BASE_LO / HI": two registers
        documented[name] = int(lo, 16)
        if hi:
            documented[name.rsplit("_", 1)[0] + "_" + name_hi] = int(hi, 16)
    registers = {k[4:]: v for k, v in vars(abi).items() if k.startswith("REG_")}
    assert documented == registers


def test_opcodes_match_the_module(section):
    rows = re.findall(r"^\| (0x[0-9A-F]{2}) \| ([A-Z_]+) \|", _part(section, "### 4.6"), re.MULTILINE)
    assert {(int(v, 16), n) for v, n in rows} == {(int(o), o.name) for o in abi.Opcode}


def test_fatal_codes_and_config_problems_match_the_module(section):
    queue = _part(section, "### 4.3")
    fatal = re.findall(r"^\| (\d) ([A-Z_]+) \|", queue, re.MULTILINE)
    assert {(int(v), n) for v, n in fatal} == {(int(f), f.name) for f in abi.FatalCode if f}
    problems = re.findall(r"\(([A-Z_]+) (\d)[):]", queue)
    assert {(n, int(v)) for n, v in problems} == {(p.name, int(p)) for p in abi.ConfigProblem}
