"""Content hashes: stable across runs and sources, blind to debug names, sensitive to semantics."""

from __future__ import annotations

import hashlib

from vxpu.ir import hashing
from vxpu.ir.binary import encode
from vxpu.ir.model import Module
from vxpu.ir.text import parse, print_module

from .irhelpers import HERE, build_saxpy

# Golden values: a change here changes every compile-cache key. Only change them together with a
# VXIR format version bump (vxpu.ir.binary.VERSION) and a note in docs/ir.md.
SAXPY_BODY_HEX = (
    "5658495201000005736178707901057361787079040407090900000300073a003b00030404053900010406072b02080050"
    "090100020000083d0702083d07030841070a1707010c41070b15070d0e420f0b4f0200000151"
)
SAXPY_MODULE_HASH = "c110e7308a8801ea925c6a2b084d96bca962e209f406f773df3a529b32fcd95e"
SAXPY_KERNEL_HASH = "48043f301802f3e8a37a3898fcd30d3ac5f940102f3e2e529da55780a71f4331"


def test_hash_is_sha256_of_the_canonical_encoding_without_names():
    m = build_saxpy()
    body = encode(m, names=False)
    assert body.hex() == SAXPY_BODY_HEX
    assert hashing.module_hash(m) == hashlib.sha256(body).hexdigest() == SAXPY_MODULE_HASH
    assert hashing.kernel_hash(m.kernels[0]) == SAXPY_KERNEL_HASH


def test_builder_text_and_wire_give_the_same_hash():
    m = build_saxpy()
    from_text = parse(print_module(m))
    assert hashing.module_hash(from_text) == SAXPY_MODULE_HASH
    assert hashing.encoded_hash(encode(m)) == SAXPY_MODULE_HASH
    assert hashing.encoded_hash(encode(m, names=False)) == SAXPY_MODULE_HASH


def test_debug_names_do_not_change_the_hash():
    text = (HERE / "samples" / "reduce.vxir").read_text()
    renamed = (text.replace("%tid", "%thread").replace("^stage", "^phase2").replace("@buf", "@scratchpad")
               .replace("%x", "%input"))
    a, b = parse(text), parse(renamed)
    assert a != b
    assert hashing.module_hash(a) == hashing.module_hash(b)
    assert [hashing.kernel_hash(k) for k in a.kernels] == [hashing.kernel_hash(k) for k in b.kernels]


def test_anonymous_and_named_values_hash_alike():
    named = "module @m\nkernel @k(%n: i32) {\n^entry:\n  %x = add %n, %n : i32\n  ret\n}\n"
    anon = "module @m\nkernel @k(%0: i32) {\n^0:\n  %1 = add %0, %0 : i32\n  ret\n}\n"
    assert hashing.module_hash(parse(named)) == hashing.module_hash(parse(anon))


def test_semantic_changes_change_the_hash():
    base = "module @m\nkernel @k(%n: i32) {\n^entry:\n  %x = add %n, %n : i32\n  ret\n}\n"
    variants = [
        base.replace("add", "sub"),
        base.replace("%n: i32", "%n: i64").replace(": i32", ": i64"),
        base.replace("module @m", "module @other"),
        base.replace("kernel @k", "kernel @k2"),
        base.replace("  ret", "  trap"),
        base.replace("^entry:\n", "^entry:\n  barrier\n"),
    ]
    hashes = {hashing.module_hash(parse(v)) for v in variants} | {hashing.module_hash(parse(base))}
    assert len(hashes) == len(variants) + 1


def test_constants_hash_by_bits():
    def h(literal: str, t: str = "f32") -> str:
        return hashing.module_hash(parse(f"module @m\nkernel @k() {{\n^e:\n  %c = const {literal} : {t}\n  ret\n}}\n"))

    assert h("0.0") != h("-0.0")
    assert h("nan") == h("-nan")
    assert h("0.1") == h("0.10000000149011612")
    assert h("255", "i8") == h("-1", "i8")


def test_kernel_hash_does_not_depend_on_the_module():
    k1 = build_saxpy().kernels[0]
    m2 = build_saxpy()
    m2.name = "renamed_module"
    assert hashing.kernel_hash(k1) == hashing.kernel_hash(m2.kernels[0])
    assert hashing.module_hash(Module("saxpy", [k1])) != hashing.module_hash(m2)
