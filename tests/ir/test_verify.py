"""The verifier: negative tests as data files (tests/ir/invalid/*.vxir), plus rules text cannot express.

Each invalid file holds a module with its expected problems written on the offending lines as
``; error: <substring>`` comments (several per line: ``; error: a ; error: b``). The runner
parses the file (a ParseError counts as its problems) or else verifies it, and requires a
one-to-one match: every expected error found on its line, no unexpected problem.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from vxpu.ir import limits
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.errors import ParseError, Problem, VerifyError
from vxpu.ir.model import Block, Kernel, LocalArray, Module, Op, SharedArray, Successor
from vxpu.ir.text import parse
from vxpu.ir.types import f32, i32, ptr_global
from vxpu.ir.verify import Dominators, check, verify

from .irhelpers import HERE, best_time, big_kernel_text, build_saxpy, sample_files

INVALID = sorted((HERE / "invalid").glob("*.vxir"))
SAMPLES = sample_files()
_EXPECT = re.compile(r"error:\s*(.*?)\s*(?=;\s*error:|$)")


def expected_errors(text: str) -> list[tuple[int, str]]:
    """``(line, substring)`` for every ``; error: ...`` annotation."""
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        _code, sep, comment = line.partition(";")
        if sep and lineno > 1 and "error:" in comment:
            out.extend((lineno, m.group(1)) for m in _EXPECT.finditer(comment))
    return out


def actual_problems(text: str) -> list[Problem]:
    try:
        module = parse(text)
    except ParseError as exc:
        return exc.problems
    return check(module)


def match(expected: list[tuple[int, str]], problems: list[Problem]) -> list[str]:
    """Mismatches between expected annotations and problems (empty when they agree one to one)."""
    remaining = list(problems)
    failures = []
    for line, text in expected:
        hit = next((p for p in remaining if p.location.line == line and text in p.message), None)
        if hit is None:
            failures.append(f"line {line}: expected an error containing {text!r}")
        else:
            remaining.remove(hit)
    failures += [f"unexpected: {p}" for p in remaining]
    return failures


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_invalid_file(path: Path):
    text = path.read_text()
    expected = expected_errors(text)
    assert expected, f"{path.name} has no '; error:' annotations"
    failures = match(expected, actual_problems(text))
    assert not failures, "\n".join(failures)


def test_runner_catches_missing_and_unexpected_errors():
    text = "module @m\nkernel @k(%n: i32) {\n^e:\n  %x = add %n, %n : i64  ; error: nothing like this\n  ret\n}\n"
    failures = match(expected_errors(text), actual_problems(text))
    assert any("expected an error containing 'nothing like this'" in f for f in failures)
    assert any(f.startswith("unexpected: 4:3") for f in failures)


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_samples_verify(path):
    verify(parse(path.read_text()))


def test_verify_error_lists_every_problem_with_location():
    text = (HERE / "invalid" / "operand_types.vxir").read_text()
    with pytest.raises(VerifyError) as info:
        verify(parse(text))
    err = info.value
    assert len(err.problems) == len(expected_errors(text))
    first = err.problems[0]
    assert (first.location.kernel, first.location.block, first.location.op) == ("k", "entry", 0)
    assert str(err).splitlines()[1].strip().startswith("6:3, kernel @k, block ^entry, op 0:")


def _kernel_with(ops_for_entry, **kw) -> Kernel:
    k = Kernel("k", [("n", i32), ("x", ptr_global)], **kw)
    b = k.add_block(Block("entry"))
    for op in ops_for_entry(k):
        b.append(op)
    b.append(Op("ret"))
    return k


def _messages(k: Kernel, module_name: str = "m") -> list[str]:
    return [p.message for p in check(Module(module_name, [k]))]


def test_rules_text_cannot_express():
    other = Kernel("other", [("n", i32)])
    foreign = other.params[0]
    msgs = _messages(_kernel_with(lambda k: [Op("add", [foreign, foreign], type=i32)]))
    assert msgs == ["operand %n is not defined in this kernel"] * 2

    stray = SharedArray("stray", f32, 4)
    msgs = _messages(_kernel_with(lambda k: [Op("shared_addr", array=stray)]))
    assert msgs == ["shared_addr names @stray, which is not a shared array of this kernel"]

    loc = LocalArray("l", f32, 4)
    msgs = _messages(_kernel_with(lambda k: [Op("shared_addr", array=loc)], local=[loc]))
    assert msgs == ["shared_addr names @l, which is not a shared array of this kernel"]

    def wrong_result(k: Kernel) -> list[Op]:
        op = Op("add", [k.params[0], k.params[0]], type=i32)
        op.result.type = f32  # type: ignore[union-attr]
        return [op]

    assert _messages(_kernel_with(wrong_result)) == ["result of add has type f32, expected i32"]
    msgs = _messages(_kernel_with(lambda k: [Op("const", type=i32, imm=1)]), module_name="bad name")
    assert msgs == ["invalid module name 'bad name': use a C identifier"]


def test_names_are_checked():
    def named(k: Kernel) -> list[Op]:
        return [Op("add", [k.params[0], k.params[0]], type=i32, name="n"),
                Op("add", [k.params[0], k.params[0]], type=i32, name="bad name")]

    msgs = _messages(_kernel_with(named))
    assert "duplicate value name %n" in msgs and "invalid value name 'bad name'" in msgs


def test_noncanonical_constant_in_the_model():
    def const(k: Kernel) -> list[Op]:
        op = Op("const", type=i32, imm=1)
        op.imm = 2 ** 40
        return [op]

    assert "does not fit i32" in _messages(_kernel_with(const))[0]


def test_successor_to_a_foreign_block():
    k = Kernel("k")
    b = k.add_block(Block("entry"))
    b.append(Op("br", successors=[Successor(Block("elsewhere"))]))
    assert _messages(k) == ["br targets a block that is not in this kernel"]


def test_kernel_without_blocks_and_limits():
    assert _messages(Kernel("k")) == ["kernel has no blocks; it needs at least an entry block ending in ret"]
    k = Kernel("k", [(f"p{i}", i32) for i in range(limits.MAX_PARAMS + 1)])
    k.add_block(Block("entry")).append(Op("ret"))
    assert _messages(k) == [f"{limits.MAX_PARAMS + 1} parameters exceed the limit of {limits.MAX_PARAMS} parameters per kernel"]
    b = KernelBuilder("many_block_params")
    b.set_block(b.block("entry"))
    b.ret()
    b.block("wide", [(None, i32)] * (limits.MAX_BLOCK_PARAMS + 1))
    assert "block parameters exceed the limit" in _messages(b.kernel)[0]


def test_dominators_on_a_loop():
    m = parse((HERE / "samples" / "reduce.vxir").read_text())
    k = m.kernels[0]
    dom = Dominators(k)
    blocks = {b.name: b for b in k.blocks}
    assert dom.order[0] is blocks["entry"]
    assert dom.idom[id(blocks["stage"])] is blocks["entry"]
    assert dom.idom[id(blocks["sync"])] is blocks["work"]
    assert dom.dominates(blocks["step"], blocks["add"])
    assert not dom.dominates(blocks["add"], blocks["sync"])
    assert dom.dominates(blocks["exit"], blocks["exit"])


def test_deep_nesting_and_long_chains_are_near_linear():
    """Blocks nested as deep as the block limit (each dominating the next) and a chain at the
    op limit verify quickly."""
    n = limits.MAX_BLOCKS - 1
    b = KernelBuilder("deep", params=[("n", i32)])
    blocks = [b.block(f"b{i}") for i in range(n)]
    exit_ = b.block("exit")
    v = b.params[0]
    for i, blk in enumerate(blocks):
        b.set_block(blk)
        v = b.add(v, b.params[0])
        c = b.icmp("slt", v, b.params[0])
        b.cbr(c, blocks[i + 1] if i + 1 < n else exit_, exit_)
    b.set_block(exit_)
    b.ret()
    start = time.perf_counter()
    verify(Module("deep", [b.kernel]))
    deep_s = time.perf_counter() - start
    m = parse(big_kernel_text(limits.MAX_OPS_PER_KERNEL))
    start = time.perf_counter()
    verify(m)
    chain_s = time.perf_counter() - start
    assert deep_s < 1.0 and chain_s < 1.0, (deep_s, chain_s)


def test_thousand_op_kernel_verifies_in_milliseconds():
    m = parse(big_kernel_text(1000))
    seconds, _ = best_time(lambda: verify(m))
    assert seconds < 0.05


def test_builder_module_verifies():
    verify(build_saxpy())


def _naive_dominators(k: Kernel) -> dict[int, set[int]]:
    """Textbook data-flow dominators (quadratic; for cross-checking on small graphs)."""
    index = {id(b): i for i, b in enumerate(k.blocks)}
    succs = {i: [index[id(s)] for s in b.successor_blocks()] for i, b in enumerate(k.blocks)}
    reach, stack = {0}, [0]
    while stack:
        for s in succs[stack.pop()]:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    preds = {i: [p for p in reach if i in succs[p]] for i in reach}
    dom = {i: set(reach) for i in reach}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for i in reach - {0}:
            new = set.intersection(*(dom[p] for p in preds[i])) | {i} if preds[i] else {i}
            if new != dom[i]:
                dom[i], changed = new, True
    return dom


def test_dominators_match_the_textbook_definition_on_random_graphs():
    import random

    rng = random.Random(1234)
    for trial in range(300):
        n = rng.randint(1, 14)
        k = Kernel("k")
        blocks = [k.add_block(Block(f"b{i}")) for i in range(n)]
        for b in blocks:
            kind = rng.random()
            if kind < 0.2 or n == 1:
                b.append(Op("ret"))
            elif kind < 0.55:
                b.append(Op("br", successors=[Successor(rng.choice(blocks))]))
            else:
                c = Op("const", type=i32, imm=0)
                b.append(c)
                b.append(Op("cbr", [c.result], successors=[Successor(rng.choice(blocks)),
                                                          Successor(rng.choice(blocks))]))
        naive = _naive_dominators(k)
        dom = Dominators(k)
        for i, bi in enumerate(blocks):
            for j, bj in enumerate(blocks):
                expect = i in naive.get(j, set()) if j in naive else False
                assert dom.dominates(bi, bj) == expect, (trial, i, j)
