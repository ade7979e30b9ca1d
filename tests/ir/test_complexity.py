"""Complexity limits (issue 7): the slow and crashing shapes are refused before LLVM sees them.

The shapes come from :mod:`tests.ir.hostile_shapes`. Each must be refused by the verifier,
by the wire decoder and by ``vxpu ir check`` / ``vxpu ir compile`` in milliseconds, with a
message that names the limit; every sample stays far inside every limit.
"""

from __future__ import annotations

import json

import pytest
from vxpu.ir import limits
from vxpu.ir.binary import decode, encode
from vxpu.ir.complexity import loop_nest_depth, phi_fan_in
from vxpu.ir.errors import DecodeError, VerifyError
from vxpu.ir.model import Module
from vxpu.ir.text import parse
from vxpu.ir.verify import Dominators, check, verify

from vxpu import cli

from . import hostile_shapes as hs
from .irhelpers import best_time, sample_files

#: (builder, expected message fragment): the shapes of issue 7.
SHAPES = {
    "nest2000": (lambda: hs.loop_nest(2000), "loops are nested 2000 deep, more than the limit of 32"),
    "line65000": (lambda: hs.straight_line(65000), "65000 ops exceed the limit of 32768 per module"),
    "chain16000": (lambda: hs.branch_chain(16000), "47999 ops exceed the limit of 32768 per module"),
    "many256x1000": (lambda: hs.many_kernels(256, 1000), "256000 ops exceed the limit of 32768 per module"),
    "fanin1000": (lambda: hs.phi_fan_in(1000),
                  ("1000 branches pass arguments to this block, more than the limit of 256 (phi fan-in)")),
}


@pytest.fixture(scope="module")
def shapes() -> dict[str, Module]:
    return {name: build() for name, (build, _) in SHAPES.items()}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_is_refused_by_the_verifier_in_milliseconds(shapes, name):
    module, message = shapes[name], SHAPES[name][1]
    seconds, problems = best_time(lambda: check(module), repeat=3)
    assert [p.message for p in problems] == [message] or any(message in str(p) for p in problems), problems
    assert seconds < 0.1, seconds
    with pytest.raises(VerifyError, match="limit"):
        verify(module)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_is_refused_on_the_wire_in_milliseconds(shapes, name):
    data = encode(shapes[name], names=False)
    assert len(data) <= limits.MAX_MODULE_BYTES

    def refuse() -> str:
        with pytest.raises((DecodeError, VerifyError)) as info:
            decode(data)
        return str(info.value)

    seconds, message = best_time(refuse, repeat=3)
    assert "limit" in message, message
    # The decoder stops at the first count past a limit; for 256 kernels of 1,000 ops that is
    # after decoding the op budget (32,768 ops, about 0.1 s).
    assert seconds < 1.0, seconds


def test_the_crashing_nest_is_the_size_of_the_report(shapes):
    """The module that crashed LLVM was a 61,610-byte 2000-deep nest: ours is of that size and
    under the op and block limits, so only the depth limit stops it."""
    module = shapes["nest2000"]
    assert 40_000 < len(encode(module, names=False)) < 70_000
    kernel = module.kernels[0]
    assert len(kernel.blocks) <= limits.MAX_BLOCKS
    assert sum(len(b.ops) for b in kernel.blocks) <= limits.MAX_OPS_PER_KERNEL
    assert loop_nest_depth(Dominators(kernel)) == 2000


@pytest.mark.parametrize("command", ["check", "compile"])
def test_cli_refuses_the_crashing_nest(capsys, tmp_path, shapes, command):
    path = tmp_path / "nest.vxbin"
    path.write_bytes(encode(shapes["nest2000"]))
    argv = ["ir", command, str(path)] + (["--target", "x86", "--emit", "llvm", "-o", str(tmp_path / "o")]
                                         if command == "compile" else ["--json"])
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc in (1, 2)
    text = out.out + out.err
    assert "loops are nested 2000 deep, more than the limit of 32" in text
    if command == "check":
        assert json.loads(out.out)["ok"] is False
    assert not (tmp_path / "o").exists()


def test_shapes_at_the_limits_are_accepted():
    verify(hs.loop_nest(limits.MAX_LOOP_DEPTH))
    verify(hs.phi_fan_in(limits.MAX_PHI_FAN_IN))
    verify(hs.straight_line(limits.MAX_OPS_PER_KERNEL))
    verify(hs.branch_chain(limits.MAX_BLOCKS))
    with pytest.raises(VerifyError, match=f"nested {limits.MAX_LOOP_DEPTH + 1} deep"):
        verify(hs.loop_nest(limits.MAX_LOOP_DEPTH + 1))
    with pytest.raises(VerifyError, match=f"{limits.MAX_PHI_FAN_IN + 1} branches"):
        verify(hs.phi_fan_in(limits.MAX_PHI_FAN_IN + 1))


@pytest.mark.parametrize("depth", [0, 1, 2, 5, 31])
def test_loop_nest_depth_counts_natural_loops(depth):
    module = hs.loop_nest(depth) if depth else hs.straight_line(10)
    assert loop_nest_depth(Dominators(module.kernels[0])) == depth


def test_sibling_loops_and_irreducible_flow_do_not_nest():
    siblings = parse("""module @m
kernel @k(%n: i32) {
^entry:
  %z = const 0 : i32
  %one = const 1 : i32
  br ^a(%z)
^a(%i: i32):
  %i1 = add %i, %one : i32
  %c = icmp slt %i1, %n
  cbr %c, ^a(%i1), ^b(%z)
^b(%j: i32):
  %j1 = add %j, %one : i32
  %d = icmp slt %j1, %n
  cbr %d, ^b(%j1), ^out
^out:
  ret
}
""")
    assert loop_nest_depth(Dominators(siblings.kernels[0])) == 1
    irreducible = parse("""module @m
kernel @k(%n: i32) {
^entry:
  %z = const 0 : i32
  %c = icmp slt %n, %z
  cbr %c, ^a, ^b
^a:
  br ^b
^b:
  br ^a
}
""")
    assert loop_nest_depth(Dominators(irreducible.kernels[0])) == 0


def test_every_sample_is_far_inside_the_limits():
    """At most an eighth of every limit (the largest sample: 126 ops, 20 blocks, depth 2)."""
    for path in sample_files():
        module = parse(path.read_text())
        assert sum(len(b.ops) for k in module.kernels for b in k.blocks) * 8 <= limits.MAX_OPS_PER_MODULE
        for k in module.kernels:
            assert len(k.blocks) * 8 <= limits.MAX_BLOCKS, path
            assert sum(len(b.ops) for b in k.blocks) * 8 <= limits.MAX_OPS_PER_KERNEL, path
            assert loop_nest_depth(Dominators(k)) * 8 <= limits.MAX_LOOP_DEPTH, path
            assert phi_fan_in(k)[0] * 8 <= limits.MAX_PHI_FAN_IN, path
