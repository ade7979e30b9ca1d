"""Hostile input: mutated wire encodings and text must fail cleanly, fast, and in bounded memory.

Every mutant must either decode into a valid module, whose canonical encoding is exactly the
mutant, or raise DecodeError/VerifyError (ParseError/VerifyError for text). Anything else (an
IndexError, RecursionError, MemoryError, a hang) is a bug. Seeds are fixed so failures reproduce.
"""

from __future__ import annotations

import random
import resource
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vxpu.ir import binary, limits
from vxpu.ir.binary import MAGIC, VERSION, decode, encode
from vxpu.ir.errors import DecodeError, ParseError, VerifyError
from vxpu.ir.text import parse, print_module
from vxpu.ir.verify import check

from .irhelpers import best_time, build_saxpy, sample_files

SEEDS = [encode(parse(p.read_text())) for p in sample_files()] + [encode(build_saxpy(), names=False)]
#: Largest acceptable growth of the process's peak RSS over a whole fuzz run.
MAX_RSS_GROWTH_KB = 200 * 1024
#: Longest acceptable time for one decode (a hostile input must never make the host spin).
MAX_DECODE_S = 1.0


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        pos = rng.randrange(len(b)) if b else 0
        if kind == 0 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and b:
            b[pos] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 2:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 3:
            del b[pos:pos + rng.randint(1, 16)]
        elif kind == 4:
            del b[pos:]
        elif kind == 5 and b:
            start = rng.randrange(len(b))
            b[pos:pos] = b[start:start + rng.randint(1, 64)]
        elif kind == 6:
            b[pos:pos + 1] = rng.choice((b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                                         b"\xff\xff\x03"))
        else:
            other = rng.choice(SEEDS)
            cut = rng.randrange(len(other))
            b[pos:] = other[cut:]
    return bytes(b)


def _check_one(data: bytes) -> str:
    start = time.perf_counter()
    try:
        module = decode(data)
    except DecodeError:
        outcome = "decode"
    except VerifyError:
        outcome = "verify"
    else:
        outcome = "ok"
        assert encode(module, names=data[6] == binary.FLAG_NAMES) == data, "accepted a non-canonical encoding"
        assert parse(print_module(module)) == module
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_DECODE_S, f"decode took {elapsed:.2f}s on {data[:64].hex()}..."
    return outcome


@pytest.mark.parametrize("seed", range(4))
def test_mutated_encodings_fail_cleanly(seed):
    rng = random.Random(seed)
    before = _maxrss_kb()
    outcomes: dict[str, int] = {}
    deadline = time.perf_counter() + 10
    for _ in range(800):
        mutant = _mutate(rng, rng.choice(SEEDS))
        outcome = _check_one(mutant)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert time.perf_counter() < deadline, "fuzzing took too long"
    assert _maxrss_kb() - before < MAX_RSS_GROWTH_KB
    # The mutations must reach past the header into the decoder and the verifier.
    assert outcomes.get("decode", 0) > 50 and outcomes.get("verify", 0) + outcomes.get("ok", 0) > 0, outcomes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bodies_after_a_valid_header(body):
    _check_one(MAGIC + VERSION.to_bytes(2, "little") + bytes([body[0] & 1 if body else 0]) + body[1:])


def _decode_error(data: bytes) -> DecodeError | None:
    try:
        decode(data)
    except DecodeError as exc:
        return exc
    return None


def test_amplification_is_bounded():
    """A small message claiming huge counts is rejected before anything large is allocated."""
    claims = [
        MAGIC + b"\x01\x00\x00\x01m" + b"\xff\xff\xff\xff\x0f",  # 4 billion kernels
        MAGIC + b"\x01\x00\x00\x01m\x01\x01k\x00\x00\x00" + b"\x80\x80\x01",  # 16384 blocks in 3 bytes
        MAGIC + b"\x01\x00\x00\x01m\x01\x01k\x00\x01\x07\xff\xff\xff\xff\x0f",  # a 4G-element array
    ]
    before = _maxrss_kb()
    for data in claims:
        with pytest.raises(DecodeError):
            decode(data)
        seconds, _ = best_time(lambda d=data: _decode_error(d), repeat=3)
        assert seconds < 0.01
    assert _maxrss_kb() - before < 10 * 1024


def test_a_module_at_the_op_limit_decodes_in_bounded_time():
    """The largest accepted module (every op a 1-byte barrier) decodes in about a second."""
    from vxpu.ir.ops import OPS

    n = limits.MAX_OPS_PER_KERNEL
    out = bytearray()
    binary._uleb(out, n)
    kernel = (b"\x01k\x00\x00\x00\x01\x00" + bytes(out) + bytes([OPS["barrier"].code]) * (n - 1)
              + bytes([OPS["ret"].code]))
    data = MAGIC + b"\x01\x00\x00\x01m\x01" + kernel
    start = time.perf_counter()
    module = decode(data)
    assert time.perf_counter() - start < 5
    assert sum(len(b.ops) for b in module.kernels[0].blocks) == n
    too_many = MAGIC + b"\x01\x00\x00\x01m\x05" + kernel * 5
    with pytest.raises(DecodeError, match=r"(op|block) count is \d+, more than the limit"):
        decode(too_many)


def _mutate_text(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        line = lines[i]
        kind = rng.randrange(5)
        if kind == 0:
            del lines[i]
        elif kind == 1:
            lines.insert(i, rng.choice(lines))
        elif kind == 2 and line:
            pos = rng.randrange(len(line))
            lines[i] = line[:pos] + line[pos + rng.randint(1, 6):]
        elif kind == 3 and line:
            pos = rng.randrange(len(line))
            lines[i] = line[:pos] + rng.choice(["%", "^", "@", ",", ":", "(", ")", "{", "}", "x", "0", " ", "nan",
                                                "ptr<", "-", "i1", "%tid", "^entry"]) + line[pos:]
        else:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        if not lines:
            lines = [""]
    return "\n".join(lines)


def test_mutated_text_fails_cleanly():
    texts = [p.read_text() for p in sample_files()]
    rng = random.Random(99)
    outcomes: dict[str, int] = {}
    for _ in range(800):
        mutant = _mutate_text(rng, rng.choice(texts))
        try:
            module = parse(mutant)
        except ParseError as exc:
            assert all(p.location.line is not None for p in exc.problems)
            outcome = "parse"
        else:
            outcome = "verify" if check(module) else "ok"
            printed = print_module(module)
            assert print_module(parse(printed)) == printed
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("parse", 0) > 50 and outcomes.get("verify", 0) > 20, outcomes


def test_text_kernel_and_block_counts_are_bounded():
    kernels = "".join(f"kernel @k{i}() {{\n^e:\n  ret\n}}\n" for i in range(limits.MAX_KERNELS + 1))
    with pytest.raises(ParseError, match=f"more than {limits.MAX_KERNELS} kernels"):
        parse("module @m\n" + kernels)
    blocks = "".join(f"^b{i}:\n" for i in range(limits.MAX_BLOCKS + 1))
    with pytest.raises(ParseError, match=f"more than {limits.MAX_BLOCKS} blocks"):
        parse("module @m\nkernel @k() {\n" + blocks + "}\n")


def test_rejections_do_not_flood_the_log(caplog):
    """A guest can submit garbage modules in a loop: each is refused, but only a bounded number
    of WARNING lines reach the log (the rest go to DEBUG), so it cannot flood the host's log."""
    import logging

    caplog.set_level(logging.DEBUG, logger="vxpu.ir.binary")
    bad_bytes = MAGIC + VERSION.to_bytes(2, "little") + b"\x00\x05ab"     # truncated module name
    for _ in range(500):
        with pytest.raises(DecodeError):
            decode(bad_bytes)
    warnings = [r for r in caplog.records if r.name == "vxpu.ir.binary" and r.levelno >= logging.WARNING]
    debug = [r for r in caplog.records if r.name == "vxpu.ir.binary" and r.levelno == logging.DEBUG]
    assert len(warnings) <= 32, f"{len(warnings)} warnings for 500 rejections"
    assert len(warnings) + len(debug) >= 500, "every rejection is still logged (at DEBUG past the budget)"


def test_problem_count_is_bounded():
    """A module at the op limit where every op is invalid must not produce one Problem per use
    (hundreds of thousands of objects, seconds of CPU): the verifier stops after a bounded
    number, like the parser does, and says so."""
    from vxpu.ir.ops import OPS
    from vxpu.ir.types import i32
    from vxpu.ir.verify import MAX_VERIFY_PROBLEMS

    n = limits.MAX_OPS_PER_KERNEL
    out = bytearray()
    binary._str(out, "k")
    out += b"\x00\x00\x00"                       # no params, shared or local arrays
    binary._uleb(out, 1)                         # one block
    out += b"\x00"                               # no block params
    binary._uleb(out, n)
    add = OPS["add"].code
    for i in range(n - 1):                       # %i = add %i, %i: each op uses itself
        binary._uleb(out, add)
        out.append(i32.code)
        binary._uleb(out, i)
        binary._uleb(out, i)
    out.append(OPS["ret"].code)
    module = decode(MAGIC + b"\x01\x00\x00\x01m\x01" + bytes(out), verify=False)
    start = time.perf_counter()
    problems = check(module)
    seconds = time.perf_counter() - start
    assert 0 < len(problems) <= MAX_VERIFY_PROBLEMS + 1, len(problems)
    assert "not listed" in problems[-1].message
    assert seconds < 1.0
    with pytest.raises(VerifyError) as info:
        decode(MAGIC + b"\x01\x00\x00\x01m\x01" + bytes(out))
    assert len(info.value.problems) <= MAX_VERIFY_PROBLEMS + 1
