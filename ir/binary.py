"""The VXIR wire encoding: compact, versioned, canonical, and safe to decode from a hostile guest.

Layout (all integers LEB128 unless noted; ``str`` = uleb length + ASCII bytes)::

    header   "VXIR"  version:u16 little-endian  flags:u8 (bit 0: a names section follows)
    body     str module_name  uleb n_kernels  kernel*
    kernel   str name
             uleb n_params  type*                        type = u8 type code
             uleb n_shared  (type uleb count)*
             uleb n_local   (type uleb count)*
             uleb n_blocks  block*
    block    uleb n_params  type*  uleb n_ops  op*
    op       uleb opcode  [u8 dim] [u8 pred] [uleb array index] [type] [imm]
             operand*  (succ_block:uleb uleb n_args arg*)*
    names    per kernel: str per param, per shared array, per local array, per block,
             then per block param and op result in canonical order ("" = anonymous)

Which optional fields an op has, how many operands and successors, is given by its row in the
opcode table (``vxpu.ir.ops``). Operands and branch arguments are canonical value numbers
(params, then per block its params and op results); uses may refer forward. Integer constants
are signed LEB128 of the canonical value; float constants are the IEEE bits, little-endian,
of the constant's width. Result types are not encoded: the table determines them.

Canonical: one module has exactly one encoding, and the decoder accepts only canonical bytes
(minimal LEB128, canonical constants and NaN, no trailing bytes), so
``encode(decode(b)) == b``. The body without names (flags 0) is what
``vxpu.ir.hashing`` hashes: value, block, param and array names never change a hash;
module and kernel names do (they are how a host finds a kernel).

Decoding never trusts a count: each is checked against ``vxpu.ir.limits`` and against the
bytes left before anything is built; truncated, oversized or garbage input raises
:class:`~vxpu.ir.errors.DecodeError` carrying the byte offset.
"""

from __future__ import annotations

import logging
import math

from vxpu.log import LogBudget

from .errors import DecodeError, IRError, Location, Problem, VerifyError
from .limits import (
    MAX_ARRAY_COUNT,
    MAX_ARRAYS,
    MAX_BLOCK_PARAMS,
    MAX_BLOCKS,
    MAX_KERNELS,
    MAX_MODULE_BYTES,
    MAX_NAME_LEN,
    MAX_OPS_PER_KERNEL,
    MAX_OPS_PER_MODULE,
    MAX_PARAMS,
)
from .model import (
    CANONICAL_NAN_BITS,
    Block,
    Kernel,
    LocalArray,
    Module,
    Op,
    Param,
    SharedArray,
    Successor,
    Value,
    float_bits,
    float_from_bits,
    is_valid_name,
    is_valid_symbol,
    resolve_derived_types,
)
from .ops import DIMS, OPS_BY_CODE, infer_result
from .types import Type, i1, lookup_type_code

__all__ = ["FLAG_NAMES", "MAGIC", "VERSION", "decode", "encode", "encode_kernel_body"]

log = logging.getLogger(__name__)

MAGIC = b"VXIR"
VERSION = 1
#: Header flag: a names section follows the body.
FLAG_NAMES = 0x01
_HEADER_LEN = 7
_MAX_LEB_BYTES = 10  # 64-bit values
#: Rejected encodings logged at WARNING per process (one server process per guest device);
#: further rejections go to DEBUG, so a guest submitting garbage in a loop cannot flood the log.
REJECT_WARNINGS = 16
_reject_budget = LogBudget(REJECT_WARNINGS, None, "further rejected VXIR encodings are logged at DEBUG")


def _log_rejection(fmt: str, *args: object) -> None:
    """Log a rejected hostile input at WARNING while the budget lasts, then at DEBUG."""
    _reject_budget.log(log, logging.WARNING, fmt, *args)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------

def _uleb(out: bytearray, v: int) -> None:
    if v < 0x80:
        out.append(v)
        return
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _sleb(out: bytearray, v: int) -> None:
    while True:
        b = v & 0x7F
        v >>= 7
        if (v == 0 and not b & 0x40) or (v == -1 and b & 0x40):
            out.append(b)
            return
        out.append(b | 0x80)


def _str(out: bytearray, s: str | None) -> None:
    try:
        data = (s or "").encode("ascii")
    except UnicodeEncodeError:
        raise IRError(f"cannot encode the name {s!r}: names are ASCII; run the verifier") from None
    if len(data) > MAX_NAME_LEN:
        raise IRError(f"cannot encode a name of {len(data)} characters (limit {MAX_NAME_LEN})")
    _uleb(out, len(data))
    out += data


def encode(module: Module, *, names: bool = True) -> bytes:
    """The canonical encoding of ``module`` (with the debug-names section unless ``names=False``).

    The module should be verified first; the encoder needs only its structure to match the
    opcode table (operand and successor counts, attributes).

    Raises:
        IRError: the module cannot be encoded (an op does not match its table row, an operand
            is not a value of its kernel, a name is not ASCII). Run the verifier to see why.
    """
    out = bytearray(MAGIC)
    out += VERSION.to_bytes(2, "little")
    out.append(FLAG_NAMES if names else 0)
    _str(out, module.name)
    _uleb(out, len(module.kernels))
    for k in module.kernels:
        out += encode_kernel_body(k)
    if names:
        for k in module.kernels:
            _encode_names(out, k)
    return bytes(out)


def encode_kernel_body(k: Kernel) -> bytes:
    """The canonical encoding of one kernel (no names except the kernel's own).

    Raises:
        IRError: as :func:`encode`.
    """
    out = bytearray()
    _str(out, k.name)
    _uleb(out, len(k.params))
    for p in k.params:
        out.append(p.type.code)
    for arrays in (k.shared, k.local):
        _uleb(out, len(arrays))
        for a in arrays:
            out.append(a.type.code)
            _uleb(out, a.count)
    numbering = k.numbering()
    blocks = {id(b): i for i, b in enumerate(k.blocks)}
    arrays_index = {id(a): i for i, a in enumerate(k.shared)}
    arrays_index.update({id(a): i for i, a in enumerate(k.local)})
    _uleb(out, len(k.blocks))
    for b in k.blocks:
        _uleb(out, len(b.params))
        for bp in b.params:
            out.append(bp.type.code)
        _uleb(out, len(b.ops))
        for op in b.ops:
            _encode_op(out, op, numbering, blocks, arrays_index)
    return bytes(out)


def _encode_op(out: bytearray, op: Op, numbering: dict[Value, int], blocks: dict[int, int],
               arrays: dict[int, int]) -> None:
    d = op.defn
    bad = _structure_problem(op)
    if bad:
        raise IRError(f"cannot encode {op.opcode}: {bad}; run the verifier for details")
    _uleb(out, d.code)
    if op.dim is not None:
        out.append(DIMS.index(op.dim))
    if op.pred is not None:
        out.append(d.predicates.index(op.pred))
    if op.array is not None:
        _uleb(out, arrays[id(op.array)])
    if op.type is not None:
        out.append(op.type.code)
    if op.imm is not None:
        assert op.type is not None
        if op.type.is_float:
            out += float_bits(op.type, float(op.imm)).to_bytes(op.type.bits // 8, "little")
        else:
            _sleb(out, int(op.imm))
    for v in op.operands:
        _uleb(out, _number(numbering, v))
    for s in op.successors:
        _uleb(out, blocks[id(s.block)])
        _uleb(out, len(s.args))
        for a in s.args:
            _uleb(out, _number(numbering, a))


def _number(numbering: dict[Value, int], v: Value) -> int:
    n = numbering.get(v)
    if n is None:
        raise IRError(f"cannot encode a use of {v!r}: it is not defined in this kernel")
    return n


def _structure_problem(op: Op) -> str | None:
    """Why ``op`` does not have the shape its table row requires (None if it does)."""
    d = op.defn
    if len(op.operands) != len(d.operands):
        return f"{len(op.operands)} operands, the table says {len(d.operands)}"
    if len(op.successors) != d.successors:
        return f"{len(op.successors)} successors, the table says {d.successors}"
    for attr in ("dim", "pred", "array", "imm"):
        if (getattr(op, attr) is not None) != (attr in d.attrs):
            return f"attribute {attr} present/absent against the table"
    if (op.type is not None) != (d.type_class is not None):
        return "type annotation present/absent against the table"
    if op.pred is not None and op.pred not in d.predicates:
        return f"unknown predicate {op.pred!r}"
    if op.imm is not None and op.type is not None and not (op.type.is_int or op.type.is_float):
        return f"constant of type {op.type}"
    if op.array is not None and op.block is not None and op.block.kernel is not None:
        k = op.block.kernel
        if not any(a is op.array for a in (k.shared if op.opcode == "shared_addr" else k.local)):
            return f"array @{op.array.name} is not declared in the kernel"
    return None


def _encode_names(out: bytearray, k: Kernel) -> None:
    for p in k.params:
        _str(out, p.name)
    for a in k.shared:
        _str(out, a.name)
    for la in k.local:
        _str(out, la.name)
    for b in k.blocks:
        _str(out, b.name)
    for b in k.blocks:
        for bp in b.params:
            _str(out, bp.name)
        for op in b.ops:
            if op.result is not None:
                _str(out, op.result.name)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------

class _Fail(Exception):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class _Reader:
    """Bounds-checked cursor over the input bytes."""

    __slots__ = ("data", "end", "ops_left", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.ops_left = MAX_OPS_PER_MODULE

    def fail(self, message: str, at: int | None = None) -> _Fail:
        return _Fail(message, self.pos if at is None else at)

    def u8(self, what: str) -> int:
        if self.pos >= self.end:
            raise self.fail(f"truncated: expected {what}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self, what: str, limit: int) -> int:
        start = self.pos
        data, pos, end = self.data, self.pos, self.end
        if pos < end and data[pos] < 0x80:  # fast path: one byte
            self.pos = pos + 1
            v = data[pos]
        else:
            v, shift = 0, 0
            while True:
                if pos >= end:
                    raise self.fail(f"truncated: expected {what}")
                if pos - start >= _MAX_LEB_BYTES:
                    raise self.fail(f"{what}: integer longer than {_MAX_LEB_BYTES} bytes", start)
                b = data[pos]
                pos += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    if b == 0 and pos - start > 1:
                        raise self.fail(f"{what}: non-canonical integer encoding (trailing zero bytes)", start)
                    break
            self.pos = pos
        if v > limit:
            raise self.fail(f"{what} is {v}, more than the limit of {limit}", start)
        return v

    def count(self, what: str, limit: int, min_bytes_each: int = 1) -> int:
        """A count, checked against ``limit`` and against the bytes that remain."""
        start = self.pos
        n = self.uleb(what, limit)
        if n * min_bytes_each > self.end - self.pos:
            raise self.fail(f"{what} is {n}, but only {self.end - self.pos} bytes remain", start)
        return n

    def sleb(self, what: str) -> int:
        start = self.pos
        v, shift = 0, 0
        while True:
            if self.pos >= self.end:
                raise self.fail(f"truncated: expected {what}")
            if self.pos - start >= _MAX_LEB_BYTES:
                raise self.fail(f"{what}: integer longer than {_MAX_LEB_BYTES} bytes", start)
            b = self.data[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if b & 0x40:
            v -= 1 << shift
        check = bytearray()
        _sleb(check, v)
        if len(check) != self.pos - start:
            raise self.fail(f"{what}: non-canonical signed integer encoding", start)
        return v

    def raw(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise self.fail(f"truncated: expected {n} bytes of {what}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", MAX_NAME_LEN)
        start = self.pos
        raw = self.raw(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not ASCII", start) from None

    def type(self, what: str) -> Type:
        start = self.pos
        t = lookup_type_code(self.u8(what))
        if t is None:
            raise self.fail(f"unknown type code in {what}", start)
        return t


def decode(data: bytes | bytearray | memoryview, *, verify: bool = True) -> Module:
    """Decode a VXIR encoding (from an untrusted source) into a module.

    Args:
        data: the bytes.
        verify: also run the verifier (the default; hostile input must be verified before use).

    Raises:
        DecodeError: truncated, oversized, non-canonical or garbage bytes, or an unknown version
            (with the byte offset).
        VerifyError: the module decoded but breaks IR rules (only with ``verify``).
    """
    if len(data) > MAX_MODULE_BYTES:
        raise DecodeError(Problem(Location(offset=0), f"{len(data)} bytes exceed the limit of {MAX_MODULE_BYTES}"))
    r = _Reader(bytes(data))
    try:
        module = _decode_module(r)
    except _Fail as exc:
        _log_rejection("rejected a VXIR encoding: %s (byte %d)", exc, exc.offset)
        raise DecodeError(Problem(Location(offset=exc.offset), str(exc))) from None
    if verify:
        from .verify import check

        problems = check(module)
        if problems:
            _log_rejection("a decoded VXIR module failed verification (%d problems)", len(problems))
            raise VerifyError(problems)
    return module


def _decode_module(r: _Reader) -> Module:
    if r.raw(4, "magic") != MAGIC:
        raise r.fail("not a VXIR encoding (bad magic; expected b'VXIR')", 0)
    version = int.from_bytes(r.raw(2, "version"), "little")
    if version != VERSION:
        raise r.fail(f"unsupported VXIR version {version}; this vxpu reads version {VERSION}", 4)
    flags = r.u8("flags")
    if flags & ~FLAG_NAMES:
        raise r.fail(f"unknown flags 0x{flags:02x}", 6)
    name = r.string("module name")
    if not is_valid_symbol(name):
        raise r.fail(f"invalid module name {name!r}")
    module = Module(name)
    for _ in range(r.count("kernel count", MAX_KERNELS, 4)):
        module.kernels.append(_decode_kernel(r))
    if flags & FLAG_NAMES:
        for k in module.kernels:
            _decode_names(r, k)
    else:
        for k in module.kernels:
            _default_array_names(k)
    if r.pos != r.end:
        raise r.fail(f"{r.end - r.pos} trailing bytes after the module")
    return module


def _default_array_names(k: Kernel) -> None:
    for i, a in enumerate(k.shared):
        a.name = f"shared{i}"
    for i, la in enumerate(k.local):
        la.name = f"local{i}"


def _decode_kernel(r: _Reader) -> Kernel:
    name = r.string("kernel name")
    if not is_valid_symbol(name):
        raise r.fail(f"invalid kernel name {name!r}")
    k = Kernel(name)
    for i in range(r.count("parameter count", MAX_PARAMS)):
        k.params.append(Param(r.type("parameter type"), None, i))
    for _ in range(r.count("shared array count", MAX_ARRAYS, 2)):
        k.shared.append(SharedArray("", r.type("array element type"), r.uleb("array size", MAX_ARRAY_COUNT)))
    for _ in range(r.count("local array count", MAX_ARRAYS - len(k.shared), 2)):
        k.local.append(LocalArray("", r.type("array element type"), r.uleb("array size", MAX_ARRAY_COUNT)))
    # Every valid block holds at least one op, so blocks share the module's op budget.
    n_blocks = r.count("block count", min(MAX_BLOCKS, r.ops_left), 2)
    blocks = [k.add_block(Block()) for _ in range(n_blocks)]
    values: list[Value] = list(k.params)
    fixups: list[tuple[list[Value], int, int]] = []  # (list to fill, slot, value number)
    pending: list[Op] = []
    kernel_ops = 0
    for b in blocks:
        for _ in range(r.count("block parameter count", MAX_BLOCK_PARAMS)):
            values.append(b.add_param(r.type("block parameter type")))
        n_ops = r.count("op count", min(MAX_OPS_PER_KERNEL - kernel_ops, r.ops_left))
        kernel_ops += n_ops
        r.ops_left -= n_ops
        for _ in range(n_ops):
            op = _decode_op(r, k, blocks, fixups, pending)
            b.append(op)
            if op.result is not None:
                values.append(op.result)
    for target, slot, number in fixups:
        if number >= len(values):
            raise r.fail(f"kernel @{name} uses value {number}, but it defines only {len(values)}")
        target[slot] = values[number]
    for b in blocks:
        for op in b.ops:
            for s in op.successors:
                s.args = tuple(s.args)
    for op, message in resolve_derived_types(pending):
        raise r.fail(f"kernel @{name}: {message}")
    return k


_PLACEHOLDER = Value(i1)


def _decode_op(r: _Reader, k: Kernel, blocks: list[Block], fixups: list[tuple[list[Value], int, int]],
               pending: list[Op]) -> Op:
    start = r.pos
    code = r.uleb("opcode", 0xFFFF)
    d = OPS_BY_CODE.get(code)
    if d is None:
        raise r.fail(f"unknown opcode {code}", start)
    dim = pred = None
    array = None
    if "dim" in d.attrs:
        i = r.u8("dim")
        if i >= len(DIMS):
            raise r.fail(f"invalid dim {i}", r.pos - 1)
        dim = DIMS[i]
    if "pred" in d.attrs:
        i = r.u8("predicate")
        if i >= len(d.predicates):
            raise r.fail(f"invalid {d.name} predicate {i}", r.pos - 1)
        pred = d.predicates[i]
    if "array" in d.attrs:
        arrays: list[SharedArray] | list[LocalArray] = k.shared if d.name == "shared_addr" else k.local
        i = r.uleb("array index", MAX_ARRAYS)
        if i >= len(arrays):
            raise r.fail(f"{d.name} names array {i}, but the kernel declares {len(arrays)}")
        array = arrays[i]
    t = r.type("type annotation") if d.type_class is not None else None
    imm = _decode_imm(r, t) if "imm" in d.attrs else None
    derived = d.result in ("op0", "A")
    result_type = i1 if derived else infer_result(d, t, ())
    try:
        op = Op(d.name, [_PLACEHOLDER] * len(d.operands), type=t, pred=pred, dim=dim, array=array, imm=imm,
                result_type=result_type)
    except IRError as exc:
        raise r.fail(str(exc), start) from None
    for slot in range(len(d.operands)):
        fixups.append((op.operands, slot, r.uleb("operand", 1 << 32)))
    for _ in range(d.successors):
        target = r.uleb("successor block", MAX_BLOCKS)
        if target >= len(blocks):
            raise r.fail(f"branch to block {target}, but the kernel has {len(blocks)}")
        args: list[Value] = [_PLACEHOLDER] * r.count("branch argument count", MAX_BLOCK_PARAMS)
        for slot in range(len(args)):
            fixups.append((args, slot, r.uleb("branch argument", 1 << 32)))
        op.successors.append(Successor(blocks[target]))
        op.successors[-1].args = args  # type: ignore[assignment]  # filled by the fixups, then frozen
    if derived:
        pending.append(op)
    return op


def _decode_imm(r: _Reader, t: Type | None) -> int | float:
    start = r.pos
    if t is None or not (t.is_int or t.is_float):
        raise r.fail(f"constant of type {t}", start)
    if t.is_float:
        bits = int.from_bytes(r.raw(t.bits // 8, "float constant"), "little")
        value = float_from_bits(t, bits)
        if math.isnan(value) and bits != CANONICAL_NAN_BITS[t.bits]:
            raise r.fail("non-canonical NaN constant (use the quiet NaN with no payload)", start)
        return value
    v = r.sleb("integer constant")
    lo, hi = (0, 1) if t is i1 else (t.min_signed, -t.min_signed - 1)
    if not lo <= v <= hi:
        raise r.fail(f"integer constant {v} is not canonical for {t} (range {lo}..{hi})", start)
    return v


def _decode_names(r: _Reader, k: Kernel) -> None:
    for p in k.params:
        p.name = _opt_name(r, "parameter name")
    for arrays in (k.shared, k.local):
        for a in arrays:
            start = r.pos
            name = r.string("array name")
            if not is_valid_name(name):
                raise r.fail(f"invalid array name {name!r}", start)
            a.name = name
    for b in k.blocks:
        b.name = _opt_name(r, "block name")
    for b in k.blocks:
        for bp in b.params:
            bp.name = _opt_name(r, "value name")
        for op in b.ops:
            if op.result is not None:
                op.result.name = _opt_name(r, "value name")


def _opt_name(r: _Reader, what: str) -> str | None:
    start = r.pos
    name = r.string(what)
    if not name:
        return None
    if not is_valid_name(name):
        raise r.fail(f"invalid {what} {name!r}", start)
    return name
