"""The VXIR wire encoding: round trips, canonical bytes, limits and precise decode errors."""

from __future__ import annotations

import math
import struct

import pytest
from vxpu.ir import binary, limits
from vxpu.ir.binary import MAGIC, VERSION, decode, encode
from vxpu.ir.errors import DecodeError, IRError, VerifyError
from vxpu.ir.model import Module, Op
from vxpu.ir.ops import OPS
from vxpu.ir.text import parse, print_module
from vxpu.ir.types import f16, f32, f64

from .irhelpers import best_time, big_kernel_text, build_saxpy, sample_files

SAMPLES = sample_files()


def _module(path) -> Module:
    return parse(path.read_text())


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_samples_round_trip_and_encoding_is_canonical(path):
    m = _module(path)
    data = encode(m)
    again = decode(data)
    assert again == m
    assert print_module(again) == print_module(m)
    assert encode(again) == data
    bare = encode(m, names=False)
    assert len(bare) < len(data)
    assert encode(decode(bare), names=False) == bare


def test_header_layout():
    data = encode(build_saxpy())
    assert data[:4] == MAGIC == b"VXIR"
    assert int.from_bytes(data[4:6], "little") == VERSION == 1
    assert data[6] == binary.FLAG_NAMES
    assert encode(build_saxpy(), names=False)[6] == 0


def test_without_names_values_are_anonymous_and_arrays_get_default_names():
    m = _module(SAMPLES[0].parent / "reduce.vxir")
    k = decode(encode(m, names=False)).kernels[0]
    assert k.name == "block_sum"
    assert all(v.name is None for v in k.values())
    assert [a.name for a in k.shared] == ["shared0"]


def test_encoding_is_compact():
    m = parse(big_kernel_text(1000))
    data = encode(m, names=False)
    assert len(data) < 5 * 1000, len(data)


def test_constants_survive_exactly():
    text = ("module @m\nkernel @k() {\n^e:\n  %a = const nan : f16\n  %b = const -0.0 : f64\n"
            "  %c = const 5.960464477539063e-08 : f16\n  %d = const -9223372036854775808 : i64\n"
            "  %e = const 1 : i1\n  %f = const 3.4028234663852886e+38 : f32\n  ret\n}\n")
    m = parse(text)
    ops = decode(encode(m)).kernels[0].blocks[0].ops
    assert math.isnan(ops[0].imm)
    assert ops[1].imm == 0.0 and math.copysign(1, ops[1].imm) == -1
    assert ops[2].imm == 2.0 ** -24
    assert ops[3].imm == -(2 ** 63) and ops[4].imm == 1
    assert ops[5].imm == struct.unpack("<f", struct.pack("<f", 3.4028234663852886e+38))[0]


def test_encoder_refuses_malformed_ops():
    m = build_saxpy()
    k = m.kernels[0]
    k.blocks[0].ops[0].operands.append(k.params[0])  # block_id.x with an operand
    with pytest.raises(IRError, match="cannot encode block_id"):
        encode(m)
    m = build_saxpy()
    foreign = build_saxpy().kernels[0].params[0]
    m.kernels[0].blocks[0].ops[2].operands[0] = foreign
    with pytest.raises(IRError, match="not defined in this kernel"):
        encode(m)


def test_encoder_refuses_names_the_wire_cannot_carry():
    m = build_saxpy()
    m.kernels[0].params[0].name = "n\u00e9"
    with pytest.raises(IRError, match="names are ASCII"):
        encode(m)
    m.kernels[0].params[0].name = "n" * 129
    with pytest.raises(IRError, match="a name of 129 characters"):
        encode(m)
    assert len(encode(m, names=False)) > 0  # the hashed form carries no value names


def test_decode_verifies_by_default():
    m = parse("module @m\nkernel @k(%p: ptr<constant>, %v: f32) {\n^e:\n  store %v, %p\n  ret\n}\n")
    data = encode(m)
    with pytest.raises(VerifyError, match="cannot store through ptr<constant>"):
        decode(data)
    assert decode(data, verify=False) == m


def _decode_error(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(data)
    return info.value


def test_bad_magic_version_flags_and_trailing_bytes():
    good = encode(build_saxpy())
    assert "bad magic" in str(_decode_error(b"ELF\x7f" + good[4:]))
    err = _decode_error(good[:4] + (2).to_bytes(2, "little") + good[6:])
    assert "unsupported VXIR version 2" in str(err) and err.offset == 4
    assert "unknown flags" in str(_decode_error(good[:6] + b"\x80" + good[7:]))
    err = _decode_error(good + b"\x00")
    assert "1 trailing bytes" in str(err) and err.offset == len(good)
    assert "truncated" in str(_decode_error(b""))
    assert "truncated" in str(_decode_error(b"VXI"))


def test_every_truncation_is_a_decode_error():
    data = encode(_module(SAMPLES[0].parent / "kitchen_sink.vxir"))
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:cut])


def _header(flags: int = 0) -> bytes:
    return MAGIC + VERSION.to_bytes(2, "little") + bytes([flags])


def _uleb(v: int) -> bytes:
    out = bytearray()
    binary._uleb(out, v)
    return bytes(out)


def _op(name: str) -> bytes:
    return _uleb(OPS[name].code)


def _kernel_prefix(n_params: int = 0) -> bytes:
    return _header() + b"\x01m" + b"\x01" + b"\x01k" + _uleb(n_params)


@pytest.mark.parametrize("data, message", [
    (_header() + b"\x01m" + _uleb(limits.MAX_KERNELS + 1), "kernel count is 257, more than the limit"),
    (_header() + b"\x01m" + _uleb(200), "kernel count is 200, but only 0 bytes remain"),
    (_header() + _uleb(limits.MAX_NAME_LEN + 1), "more than the limit of 128"),
    (_header() + b"\x02m\xff", "not ASCII"),
    (_header() + b"\x021m", "invalid module name"),
    (_kernel_prefix(limits.MAX_PARAMS + 1), "parameter count is 257"),
    (_kernel_prefix(1) + b"\x63", "unknown type code"),
    (_kernel_prefix() + _uleb(limits.MAX_ARRAYS + 1), "array count"),
    (_kernel_prefix() + b"\x01\x07" + _uleb(10 ** 9), "array size is 1000000000"),
    (_kernel_prefix() + b"\x00\x00" + _uleb(limits.MAX_BLOCKS + 1), f"block count is {limits.MAX_BLOCKS + 1}"),
    (_kernel_prefix() + b"\x00\x00" + _uleb(2_000), "block count is 2000, but only"),
    (_kernel_prefix() + b"\x00\x00\x01\x00" + _uleb(limits.MAX_OPS_PER_KERNEL + 1), f"op count is {limits.MAX_OPS_PER_KERNEL + 1}"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _uleb(999), "unknown opcode 999"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "longer than 10 bytes"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01\xa2\x00", "non-canonical integer encoding"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x02" + _op("thread_id") + b"\x09", "invalid dim 9"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("icmp") + b"\x20", "invalid icmp predicate 32"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("shared_addr") + b"\x00", "names array 0, but the kernel declares 0"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("br") + b"\x05", "branch to block 5, but the kernel has 1"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("br") + b"\x00" + _uleb(300), "branch argument count"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("const") + b"\x04\x80\x80\x80\x80\x10", "not canonical for i32"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("const") + b"\x04\xff\x7f", "non-canonical signed"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("const") + b"\x07\x01\x00\xc0\x7f", "non-canonical NaN"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("const") + b"\x09", "constant of type ptr<global>"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x01" + _op("neg") + b"\x04\x07", "uses value 7, but it defines only 1"),
    (_kernel_prefix() + b"\x00\x00\x01\x00\x02" + _op("offset") + b"\x07\x01\x00" + _op("offset") + b"\x07\x00\x00",
     "depends on itself"),
])
def test_hand_built_bad_encodings(data, message):
    assert message in str(_decode_error(data))


def test_oversized_input_is_rejected_before_parsing():
    err = _decode_error(b"VXIR" + bytes(limits.MAX_MODULE_BYTES))
    assert "exceed the limit" in str(err) and err.offset == 0


def test_bad_names_section():
    m = build_saxpy()
    data = bytearray(encode(m))
    good_names_start = len(encode(m, names=False))
    data[good_names_start + 1] = ord("9")  # first param name "n" -> "9"
    assert "invalid parameter name '9'" in str(_decode_error(bytes(data)))


def test_thousand_op_kernel_encodes_and_decodes_in_milliseconds():
    m = parse(big_kernel_text(1000))
    enc_s, data = best_time(lambda: encode(m))
    dec_s, again = best_time(lambda: decode(data))
    assert again == m
    assert enc_s < 0.05 and dec_s < 0.15, (enc_s, dec_s)


def test_all_float_widths_encode_by_width():
    for t, width in ((f16, 2), (f32, 4), (f64, 8)):
        m = Module("m")
        from vxpu.ir.model import Block, Kernel

        k = Kernel("k")
        b = k.add_block(Block("e"))
        b.append(Op("const", type=t, imm=1.5))
        b.append(Op("ret"))
        m.kernels.append(k)
        bare = encode(m, names=False)
        # header 7, "m" 2, kernel count 1, "k" 2, 4 counts, block 2, const (code, type, bits), ret 1
        assert len(bare) == 7 + 2 + 1 + 2 + 4 + 2 + 2 + width + 1
        assert decode(bare) == decode(encode(m, names=False))
