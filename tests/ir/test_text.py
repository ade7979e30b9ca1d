"""The .vxir text format: exact round trips, forward references, located parse errors."""

from __future__ import annotations

import math

import pytest
from vxpu.ir.errors import ParseError
from vxpu.ir.text import parse, print_module
from vxpu.ir.types import f16, f32, ptr_global
from vxpu.ir.verify import verify

from .irhelpers import best_time, big_kernel_text, build_saxpy, sample_files

SAMPLES = sample_files()


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_samples_round_trip_exactly(path):
    m = parse(path.read_text())
    verify(m)
    printed = print_module(m)
    again = parse(printed)
    assert again == m
    assert print_module(again) == printed


def test_builder_module_round_trips():
    m = build_saxpy()
    assert parse(print_module(m)) == m


def test_printed_form_is_stable():
    text = (
        "module @m\n\nkernel @k(%n: i32, %p: ptr<global>) {\n  shared @t: f32[4]\n^entry:\n"
        "  %a = const -1 : i32\n  %b = add %n, %a : i32\n  %q = offset %p, %b : f32\n"
        "  %v = load %q : f32\n  store %v, %q\n  ret\n}\n"
    )
    assert print_module(parse(text)) == text


def test_comments_blank_lines_and_spacing_are_not_significant():
    text = """
    ; leading comment
    module   @m   ; trailing
    kernel @k( %n : i32 ) {   ; header comment

    ^entry :
        %x=add %n,%n:i32
        ret ; done
    }
    """
    m = parse(text)
    assert print_module(m) == "module @m\n\nkernel @k(%n: i32) {\n^entry:\n  %x = add %n, %n : i32\n  ret\n}\n"


def test_forward_references_and_derived_types():
    text = """module @m
kernel @k(%i: i32) {
  shared @t: f32[16]
^entry:
  %p = shared_addr @t
  br ^b
^a:
  %v = load %q2 : f32
  ret
^b:
  %q1 = offset %p, %i : f32
  %q2 = byte_offset %q1, %i
  br ^a
}
"""
    m = parse(text)
    k = m.kernels[0]
    load = k.blocks[1].ops[0]
    assert load.operands[0].type.name == "ptr<shared>"
    verify(m)


def test_cyclic_derived_types_are_a_parse_error():
    text = "module @m\nkernel @k(%i: i32) {\n^e:\n  %a = offset %b, %i : f32\n  %b = offset %a, %i : f32\n  ret\n}\n"
    with pytest.raises(ParseError, match="depends on itself"):
        parse(text)


def test_anonymous_values_are_renumbered():
    m = parse("module @m\nkernel @k(%7: i32) {\n^5:\n  %9 = add %7, %7 : i32\n  ret\n}\n")
    k = m.kernels[0]
    assert k.params[0].name is None and k.blocks[0].name is None
    assert "kernel @k(%0: i32) {\n^0:\n  %1 = add %0, %0 : i32" in print_module(m)


@pytest.mark.parametrize("literal, type_, value", [
    ("0.1", f32, 0.10000000149011612),
    ("-0.0", f32, -0.0),
    ("1e+20", f32, 100000002004087734272.0),
    ("inf", f16, math.inf),
    ("-inf", f32, -math.inf),
    ("3", f32, 3.0),
    ("65504", f16, 65504.0),
])
def test_float_constants(literal, type_, value):
    m = parse(f"module @m\nkernel @k() {{\n^e:\n  %c = const {literal} : {type_}\n  ret\n}}\n")
    op = m.kernels[0].blocks[0].ops[0]
    assert op.imm == value and math.copysign(1, op.imm) == math.copysign(1, value)
    assert parse(print_module(m)) == m


def test_nan_and_integer_forms():
    m = parse("module @m\nkernel @k() {\n^e:\n  %a = const nan : f32\n  %b = const 0xff : i8\n"
              "  %c = const 4294967295 : i32\n  %d = const +5 : i64\n  ret\n}\n")
    a, b, c, d = (op.imm for op in m.kernels[0].blocks[0].ops[:4])
    assert math.isnan(a) and b == -1 and c == -1 and d == 5
    assert "%a = const nan : f32" in print_module(m)
    assert parse(print_module(m)) == m


def _errors(text: str) -> list[tuple[int | None, int | None, str]]:
    with pytest.raises(ParseError) as info:
        parse(text)
    return [(p.location.line, p.location.col, p.message) for p in info.value.problems]


def test_parse_errors_carry_line_and_column_and_are_all_reported():
    text = "module @m\nkernel @k(%n: i32) {\n^e:\n  %a = frob %n\n  %b = add %n, %n : i33\n  %c = add %n & %n\n  ret\n}\n"
    errs = _errors(text)
    assert errs[0][:2] == (4, 8) and "unknown op 'frob'" in errs[0][2]
    assert errs[1][:2] == (5, 21) and "unknown type 'i33'" in errs[1][2]
    assert errs[2][:2] == (6, 15) and "unexpected character '&'" in errs[2][2]
    assert len(errs) == 3


@pytest.mark.parametrize("body, line, col, message", [
    ("  %x = add %n, %nope : i32\n  ret", 4, 16, "undefined value %nope"),
    ("  br ^nowhere\n", 4, 6, "undefined block ^nowhere"),
    ("  %x = add %n, %n : i32\n  %x = add %n, %n : i32\n  ret", 5, 3, "%x is defined twice"),
    ("  %x = const 300 : i8\n  ret", 4, 14, "does not fit i8"),
    ("  %x = const 1e39 : f32\n  ret", 4, 14, "overflows f32"),
    ("  %x = const 1.5 : i32\n  ret", 4, 14, "is not an integer"),
    ("  %x = const 1e400 : f64\n  ret", 4, 14, "overflows f64"),
    ("  %x = const " + "9" * 80 + " : i64\n  ret", 4, 14, "longer than"),
    ("  %p = shared_addr @missing\n  ret", 4, 20, "no shared array @missing"),
    ("  %t = thread_id\n  ret", 4, 8, "needs a dimension"),
    ("  %t = thread_id.w\n  ret", 4, 8, "needs a dimension"),
    ("  %t = add.x %n, %n : i32\n  ret", 4, 8, "takes no dimension"),
    ("  %t = add %n, %n\n  ret", 4, 3, "needs a type annotation"),
    ("  thread_id.x\n  ret", 4, 3, "defines a value"),
    ("  %s = store %n, %n\n  ret", 4, 3, "defines no value"),
    ("  %x = add %n, %n : i32 extra\n  ret", 4, 25, "unexpected 'extra'"),
    ("  %x = const 1, 2 : i32\n  ret", 4, 17, "only one constant"),
    ("  %1x = add %n, %n : i32\n  ret", 4, 3, "invalid name '%1x'"),
])
def test_located_parse_errors(body, line, col, message):
    text = f"module @m\nkernel @k(%n: i32) {{\n^e:\n{body}\n}}\n"
    errs = _errors(text)
    assert any(e[0] == line and e[1] == col and message in e[2] for e in errs), errs


@pytest.mark.parametrize("text, message", [
    ("kernel @k() {\n^e:\n  ret\n}\n", "missing 'module @name'"),
    ("", "missing 'module @name'"),
    ("module @m\nmodule @n\n", "a second 'module'"),
    ("module @m\nkernel @k() {\n^e:\n  ret\n", "is not closed"),
    ("module @m\nkernel @k() {\n  ret\n}\n", "op outside a block"),
    ("module @m\nkernel @k() {\n^e:\n  shared @t: f32[4]\n  ret\n}\n", "before the first block"),
    ("module @m\nkernel @k() {\n  shared @t: f32[x]\n^e:\n  ret\n}\n", "element count"),
    ("module @m\nkernel @k {\n", "expected '('"),
    ("module @m\nstore\n", "expected 'module' or 'kernel'"),
])
def test_structural_parse_errors(text, message):
    assert any(message in e[2] for e in _errors(text))


def test_error_message_lists_every_problem():
    text = "module @m\n" + "garbage here\n" * 5
    with pytest.raises(ParseError) as info:
        parse(text)
    assert len(info.value.problems) == 5
    assert str(info.value).count("expected 'module' or 'kernel'") == 5
    assert info.value.line == 2 and info.value.col == 1


def test_parse_stops_after_many_problems():
    with pytest.raises(ParseError) as info:
        parse("module @m\n" + "?\n" * 100_000)
    assert len(info.value.problems) == 100


def test_parser_keeps_locations_for_the_verifier():
    m = parse("module @m\nkernel @k(%p: ptr<constant>, %v: f32) {\n^e:\n  store %v, %p\n  ret\n}\n")
    op = m.kernels[0].blocks[0].ops[0]
    assert (op.loc.line, op.loc.col) == (4, 3)
    assert m.kernels[0].params[0].type is not ptr_global


def test_thousand_op_kernel_parses_and_prints_in_milliseconds():
    text = big_kernel_text(1000)
    parse_s, m = best_time(lambda: parse(text))
    print_s, printed = best_time(lambda: print_module(m))
    assert sum(len(b.ops) for b in m.kernels[0].blocks) == 1000
    assert parse(printed) == m
    assert parse_s < 0.25 and print_s < 0.1, (parse_s, print_s)


def test_per_line_limits():
    many = ", ".join(["%n"] * 5)
    errs = _errors(f"module @m\nkernel @k(%n: i32) {{\n^e:\n  %x = add {many} : i32\n  ret\n}}\n")
    assert any("more than 3 operands" in e[2] for e in errs)
    params = ", ".join(f"%p{i}: i32" for i in range(300))
    errs = _errors(f"module @m\nkernel @k({params}) {{\n^e:\n  ret\n}}\n")
    assert any("more than 256 parameters" in e[2] for e in errs)
    errs = _errors("module @m\nkernel @k(%c: i1) {\n^e:\n  cbr %c, ^e, ^e, ^e\n}\n")
    assert any("more than 2 successors" in e[2] for e in errs)


def test_float_constants_print_short_and_read_back_exactly():
    import random

    from vxpu.ir.model import float_from_bits, normalize_imm
    from vxpu.ir.text import format_imm, parse_number
    from vxpu.ir.types import f64

    assert [format_imm(f32, normalize_imm(f32, x)) for x in (0.1, 1e20, -1500.0, 3.4028234663852886e+38)] == \
        ["0.1", "1e+20", "-1500.0", "3.4028235e+38"]
    assert format_imm(f16, 65504.0) == "65504.0" and format_imm(f16, normalize_imm(f16, 1 / 3)) == "0.3333"

    def same(t, value):
        back = normalize_imm(t, parse_number(format_imm(t, value), t))
        return back == value and math.copysign(1, back) == math.copysign(1, value)

    f16_values = (float_from_bits(f16, bits) for bits in range(1 << 16))
    assert all(same(f16, v) for v in f16_values if not math.isnan(v))
    rng = random.Random(7)
    for t in (f32, f64):
        values = (float_from_bits(t, rng.getrandbits(t.bits)) for _ in range(20_000))
        assert all(same(t, v) for v in values if not math.isnan(v))
