"""IR kernels of the conformance suite, in .vxir text, and helpers to build their images."""

from __future__ import annotations

import struct

from vxpu.ir import binary, text

# i = block_id.x * block_dim.x + thread_id.x, guarded by i < n
_INDEX = """
  %bid = block_id.x
  %bdim = block_dim.x
  %base = mul %bid, %bdim : i32
  %tid = thread_id.x
  %i = add %base, %tid : i32
  %ok = icmp slt %i, %n
  cbr %ok, ^body, ^exit
"""

VADD = f"""
module @vadd

kernel @vadd(%n: i32, %a: ptr<global>, %b: ptr<global>, %c: ptr<global>) {{
^entry:{_INDEX}
^body:
  %pa = offset %a, %i : f32
  %pb = offset %b, %i : f32
  %pc = offset %c, %i : f32
  %x = load %pa : f32
  %y = load %pb : f32
  %z = fadd %x, %y : f32
  store %z, %pc
  br ^exit
^exit:
  ret
}}
"""

# Each block reverses its 256 elements through shared memory: needs the barrier.
BLOCK_REVERSE = """
module @reverse

kernel @block_reverse(%x: ptr<global>, %y: ptr<global>) {
  shared @buf: f32[256]
^entry:
  %bid = block_id.x
  %bdim = block_dim.x
  %base = mul %bid, %bdim : i32
  %t = thread_id.x
  %i = add %base, %t : i32
  %px = offset %x, %i : f32
  %v = load %px : f32
  %sb = shared_addr @buf
  %ps = offset %sb, %t : f32
  store %v, %ps
  barrier
  %one = const 1 : i32
  %last = sub %bdim, %one : i32
  %r = sub %last, %t : i32
  %pr = offset %sb, %r : f32
  %w = load %pr : f32
  %py = offset %y, %i : f32
  store %w, %py
  ret
}
"""

# Global atomics: a float sum (order-sensitive) and an integer count.
ATOMIC_SUM = f"""
module @atomics

kernel @atomic_sum(%n: i32, %x: ptr<global>, %sum: ptr<global>, %count: ptr<global>) {{
^entry:{_INDEX}
^body:
  %px = offset %x, %i : f32
  %v = load %px : f32
  %old = atomic_fadd %sum, %v : f32
  %one = const 1 : i32
  %oldc = atomic_add %count, %one : i32
  br ^exit
^exit:
  ret
}}
"""

# Stores 4 GB past its argument: outside any device memory.
OOB_STORE = """
module @oob

kernel @oob_store(%x: ptr<global>) {
^entry:
  %far = const 1000000000 : i32
  %p = offset %x, %far : f32
  %v = const 1.0 : f32
  store %v, %p
  ret
}
"""

# Parses, but fadd on i32 operands fails verification.
ILL_TYPED = """
module @bad

kernel @bad(%a: i32, %b: i32) {
^entry:
  %z = fadd %a, %b : f32
  ret
}
"""


def image(source: str) -> bytes:
    """The wire image of a .vxir module."""
    return binary.encode(text.parse(source), names=False)


def vadd_args(n: int, a: int, b: int, c: int) -> bytes:
    return struct.pack("<i4xQQQ", n, a, b, c)

# Parameters (ptr, i32): the packed size rounds up to the largest alignment (16, not 12).
DOUBLE_IN_PLACE = f"""
module @dbl

kernel @double(%x: ptr<global>, %n: i32) {{
^entry:{_INDEX}
^body:
  %px = offset %x, %i : f32
  %v = load %px : f32
  %w = fadd %v, %v : f32
  store %w, %px
  br ^exit
^exit:
  ret
}}
"""
