"""The in-memory IR: Module → Kernel → Block → Op, with SSA values and block parameters.

* A :class:`Module` has a name and kernels (no device-function calls in v1).
* A :class:`Kernel` has typed :class:`Param` s, static :class:`SharedArray` s (per block),
  :class:`LocalArray` s (per thread) and :class:`Block` s; the first block is the entry.
* A :class:`Block` has typed :class:`BlockParam` s (instead of phi nodes) and a list of
  :class:`Op` s; the last op is its terminator (``br``/``cbr`` pass arguments to the
  successor's params through :class:`Successor`).
* Every SSA value is a :class:`Value`: a kernel :class:`Param`, a :class:`BlockParam` or an
  :class:`OpResult`. Values are compared by identity; names are for people only.

The model is deliberately permissive: it can hold invalid IR (wrong types, missing
terminators), because parsers and decoders build it from untrusted input and the verifier
(``vxpu.ir.verify``) then reports *every* problem at once. Constructors only reject what cannot
be represented at all (unknown opcodes, constants out of range).

Structural equality: ``Module.__eq__`` compares the whole structure, names included, with
values matched by position (canonical numbering: kernel params, then per block its params
and then its op results, in order). :meth:`Kernel.numbering` gives that numbering.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator, Sequence

from .errors import IRError, Location
from .limits import MAX_NAME_LEN
from .ops import DIMS, OPS, OpDef, infer_result
from .types import Type, f64, i1

__all__ = [
    "NAME_RE",
    "SYMBOL_RE",
    "Array",
    "Block",
    "BlockParam",
    "Kernel",
    "LocalArray",
    "Module",
    "Op",
    "OpResult",
    "Param",
    "SharedArray",
    "Successor",
    "Value",
    "float_bits",
    "is_valid_name",
    "is_valid_symbol",
    "normalize_imm",
]

#: Value, block and array names: ``[A-Za-z_][A-Za-z0-9_.]*`` (numeric names mean "anonymous").
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
#: Module and kernel names (linker symbols): C identifiers.
SYMBOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def is_valid_name(name: str) -> bool:
    """True if ``name`` may name a value, block or array."""
    return len(name) <= MAX_NAME_LEN and NAME_RE.match(name) is not None


def is_valid_symbol(name: str) -> bool:
    """True if ``name`` may name a module or kernel."""
    return len(name) <= MAX_NAME_LEN and SYMBOL_RE.match(name) is not None


_FLOAT_FORMATS = {16: "<e", 32: "<f", 64: "<d"}
_INT_FORMATS = {16: "<H", 32: "<I", 64: "<Q"}
#: The one NaN bit pattern per width that the IR keeps (positive quiet NaN).
CANONICAL_NAN_BITS = {16: 0x7E00, 32: 0x7FC00000, 64: 0x7FF8000000000000}


def normalize_imm(t: Type, value: object) -> int | float:
    """The canonical constant of type ``t`` for ``value``.

    Integers become their signed value (``i1``: 0 or 1); ``value`` may be given signed or
    unsigned. Floats are rounded to ``t`` (nearest even); every NaN becomes the canonical NaN.

    Raises:
        IRError: wrong kind of value, integer out of range, or a finite float that overflows ``t``.
    """
    if t.is_int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise IRError(f"constant of type {t} must be an integer, got {value!r}")
        if not t.min_signed <= value <= t.max_unsigned:
            raise IRError(f"constant {value} does not fit {t} (range {t.min_signed}..{t.max_unsigned})")
        value &= t.max_unsigned
        if t is i1:
            return value
        return value - (1 << t.bits) if value >> (t.bits - 1) else value
    if t.is_float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise IRError(f"constant of type {t} must be a number, got {value!r}")
        x = float(value)
        if math.isnan(x):
            return math.nan
        if t is f64 or math.isinf(x):
            return x
        try:
            return struct.unpack(_FLOAT_FORMATS[t.bits], struct.pack(_FLOAT_FORMATS[t.bits], x))[0]
        except (OverflowError, struct.error):
            raise IRError(f"constant {value!r} overflows {t}; write inf or -inf") from None
    raise IRError(f"constants of type {t} do not exist (only integers and floats)")


def float_bits(t: Type, value: float) -> int:
    """The IEEE bit pattern of a float constant of type ``t`` (canonical NaN for every NaN)."""
    if math.isnan(value):
        return CANONICAL_NAN_BITS[t.bits]
    fmt = _FLOAT_FORMATS[t.bits]
    return int(struct.unpack(_INT_FORMATS[t.bits], struct.pack(fmt, value))[0])


def float_from_bits(t: Type, bits: int) -> float:
    """The float of type ``t`` whose IEEE bit pattern is ``bits`` (which must fit the width)."""
    return float(struct.unpack(_FLOAT_FORMATS[t.bits], struct.pack(_INT_FORMATS[t.bits], bits))[0])


class Value:
    """An SSA value: a type and an optional name (None = anonymous, printed as %N)."""

    __slots__ = ("name", "type")

    def __init__(self, type: Type, name: str | None = None) -> None:
        self.type = type
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} %{self.name if self.name is not None else '?'}: {self.type}>"


class Param(Value):
    """A kernel parameter (passed by value by the host at launch)."""

    __slots__ = ("index",)

    def __init__(self, type: Type, name: str | None = None, index: int = 0) -> None:
        super().__init__(type, name)
        self.index = index


class BlockParam(Value):
    """A block parameter: receives the matching argument of each branch to its block."""

    __slots__ = ("block", "index")

    def __init__(self, type: Type, name: str | None, block: Block, index: int) -> None:
        super().__init__(type, name)
        self.block = block
        self.index = index


class OpResult(Value):
    """The value an op defines."""

    __slots__ = ("op",)

    def __init__(self, type: Type, name: str | None, op: Op) -> None:
        super().__init__(type, name)
        self.op = op


class _ArrayBase:
    """A static array of ``count`` elements of a memory type."""

    __slots__ = ("count", "loc", "name", "type")
    space = ""

    def __init__(self, name: str, type: Type, count: int) -> None:
        self.name = name
        self.type = type
        self.count = count
        self.loc: Location | None = None

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.type.size * self.count

    def __repr__(self) -> str:
        return f"<{type(self).__name__} @{self.name}: {self.type} x {self.count}>"


class SharedArray(_ArrayBase):
    """Per-block memory shared by the threads of one block (``shared_addr @name``)."""

    __slots__ = ()
    space = "shared"


class LocalArray(_ArrayBase):
    """Per-thread private memory (``local_addr @name``)."""

    __slots__ = ()
    space = "local"


Array = SharedArray | LocalArray


class Successor:
    """A branch target: a block and the arguments for its block parameters."""

    __slots__ = ("args", "block")

    def __init__(self, block: Block, args: Sequence[Value] = ()) -> None:
        self.block = block
        self.args: tuple[Value, ...] = tuple(args)

    def __repr__(self) -> str:
        return f"<Successor ^{self.block.name} ({len(self.args)} args)>"


class Op:
    """One operation. Which fields are meaningful is given by its row in ``vxpu.ir.ops.OPS``.

    Args:
        opcode: an op name from the table.
        operands: the SSA operands.
        type: the type annotation (``: T``), if the op has one.
        pred: comparison predicate (icmp/fcmp).
        dim: "x", "y" or "z" (thread geometry ops).
        array: the shared/local array (shared_addr/local_addr).
        imm: the constant (const); normalized with :func:`normalize_imm`.
        successors: branch targets (br/cbr).
        result_type: the result type; inferred from the table when omitted.
        name: the result's name.
        loc: source location (set by the text parser).

    Raises:
        IRError: unknown opcode, bad dim, or a constant that cannot be represented.
    """

    __slots__ = (
        "array",
        "block",
        "defn",
        "dim",
        "imm",
        "loc",
        "opcode",
        "operands",
        "pred",
        "result",
        "successors",
        "type",
    )

    def __init__(self, opcode: str, operands: Sequence[Value] = (), *, type: Type | None = None,
                 pred: str | None = None, dim: str | None = None, array: Array | None = None,
                 imm: float | None = None, successors: Sequence[Successor] = (),
                 result_type: Type | None = None, name: str | None = None,
                 loc: Location | None = None) -> None:
        d = OPS.get(opcode)
        if d is None:
            raise IRError(f"unknown op {opcode!r}")
        if dim is not None and dim not in DIMS:
            raise IRError(f"dim must be one of x, y, z, not {dim!r}")
        self.opcode = opcode
        self.defn: OpDef = d
        self.operands: list[Value] = list(operands)
        self.type = type
        self.pred = pred
        self.dim = dim
        self.array = array
        self.imm = normalize_imm(type, imm) if imm is not None and type is not None else imm
        self.successors: list[Successor] = list(successors)
        self.block: Block | None = None
        self.loc = loc
        self.result: OpResult | None = None
        if d.has_result:
            if result_type is None:
                result_type = infer_result(d, type, [v.type for v in self.operands])
            if result_type is None:
                raise IRError(f"cannot infer the result type of {opcode}; give result_type")
            self.result = OpResult(result_type, name, self)

    def uses(self) -> Iterator[Value]:
        """Every value this op reads: operands, then successor arguments."""
        yield from self.operands
        for s in self.successors:
            yield from s.args

    def __repr__(self) -> str:
        res = f"%{self.result.name} = " if self.result is not None else ""
        return f"<Op {res}{self.opcode}>"


class Block:
    """A basic block ("IR block"): parameters, then ops ending with one terminator."""

    __slots__ = ("kernel", "loc", "name", "ops", "params")

    def __init__(self, name: str | None = None, params: Sequence[tuple[str | None, Type]] = ()) -> None:
        self.name = name
        self.params: list[BlockParam] = []
        self.ops: list[Op] = []
        self.kernel: Kernel | None = None
        self.loc: Location | None = None
        for pname, ptype in params:
            self.add_param(ptype, pname)

    def add_param(self, type: Type, name: str | None = None) -> BlockParam:
        """Append a block parameter and return it."""
        p = BlockParam(type, name, self, len(self.params))
        self.params.append(p)
        return p

    def append(self, op: Op) -> Op:
        """Append ``op`` to this block and return it."""
        op.block = self
        self.ops.append(op)
        return op

    @property
    def terminator(self) -> Op | None:
        """The last op if it is a terminator, else None."""
        if self.ops and self.ops[-1].defn.terminator:
            return self.ops[-1]
        return None

    def successor_blocks(self) -> list[Block]:
        """The blocks the terminator may jump to (empty without a terminator)."""
        term = self.terminator
        return [s.block for s in term.successors] if term is not None else []

    def __repr__(self) -> str:
        return f"<Block ^{self.name} ({len(self.ops)} ops)>"


class Kernel:
    """A kernel: the unit a host launches over a grid of blocks of threads."""

    __slots__ = ("blocks", "loc", "local", "name", "params", "shared")

    def __init__(self, name: str, params: Sequence[Param | tuple[str | None, Type]] = (),
                 shared: Sequence[SharedArray] = (), local: Sequence[LocalArray] = (),
                 blocks: Sequence[Block] = ()) -> None:
        self.name = name
        self.params: list[Param] = []
        for p in params:
            if isinstance(p, Param):
                p.index = len(self.params)
                self.params.append(p)
            else:
                self.params.append(Param(p[1], p[0], len(self.params)))
        self.shared: list[SharedArray] = list(shared)
        self.local: list[LocalArray] = list(local)
        self.blocks: list[Block] = []
        self.loc: Location | None = None
        for b in blocks:
            self.add_block(b)

    def add_block(self, block: Block) -> Block:
        """Append ``block`` and return it."""
        block.kernel = self
        self.blocks.append(block)
        return block

    @property
    def entry(self) -> Block | None:
        """The entry block (the first one), or None if there are no blocks."""
        return self.blocks[0] if self.blocks else None

    def param(self, name: str) -> Param:
        """The parameter called ``name``.

        Raises:
            IRError: no such parameter.
        """
        for p in self.params:
            if p.name == name:
                return p
        raise IRError(f"kernel @{self.name} has no parameter %{name}")

    def values(self) -> Iterator[Value]:
        """Every value the kernel defines, in canonical order."""
        yield from self.params
        for b in self.blocks:
            yield from b.params
            for op in b.ops:
                if op.result is not None:
                    yield op.result

    def numbering(self) -> dict[Value, int]:
        """Canonical value numbers: params, then per block its params and op results, in order."""
        return {v: i for i, v in enumerate(self.values())}

    def ops(self) -> Iterator[Op]:
        """Every op, block by block."""
        for b in self.blocks:
            yield from b.ops

    def structural_key(self) -> tuple[object, ...]:
        """A comparable tuple of the whole kernel (names included; values by canonical number)."""
        num = self.numbering()
        blocks = {id(b): i for i, b in enumerate(self.blocks)}
        arrays = {id(a): ("s", i) for i, a in enumerate(self.shared)}
        arrays.update({id(a): ("l", i) for i, a in enumerate(self.local)})

        def ref(v: Value) -> object:
            return num.get(v, ("foreign", id(v)))

        def op_key(op: Op) -> tuple[object, ...]:
            imm: object = op.imm
            if isinstance(imm, float) and op.type is not None and op.type.is_float:
                imm = ("f", float_bits(op.type, imm))
            res = (op.result.name, op.result.type) if op.result is not None else None
            succ = tuple((blocks.get(id(s.block), ("foreign", id(s.block))), tuple(ref(a) for a in s.args))
                         for s in op.successors)
            arr = arrays.get(id(op.array), ("foreign", id(op.array))) if op.array is not None else None
            return (op.opcode, op.type, op.pred, op.dim, arr, imm, tuple(ref(v) for v in op.operands),
                    res, succ)

        return (
            self.name,
            tuple((p.name, p.type) for p in self.params),
            tuple((a.name, a.type, a.count) for a in self.shared),
            tuple((a.name, a.type, a.count) for a in self.local),
            tuple((b.name, tuple((p.name, p.type) for p in b.params), tuple(op_key(o) for o in b.ops))
                  for b in self.blocks),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Kernel):
            return NotImplemented
        return self.structural_key() == other.structural_key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Kernel @{self.name} ({len(self.params)} params, {len(self.blocks)} blocks)>"


class Module:
    """A named collection of kernels: the unit of compilation, transfer and caching."""

    __slots__ = ("kernels", "name")

    def __init__(self, name: str, kernels: Sequence[Kernel] = ()) -> None:
        self.name = name
        self.kernels: list[Kernel] = list(kernels)

    def kernel(self, name: str) -> Kernel:
        """The kernel called ``name``.

        Raises:
            IRError: no such kernel.
        """
        for k in self.kernels:
            if k.name == name:
                return k
        raise IRError(f"module @{self.name} has no kernel @{name}; it has "
                      f"{', '.join('@' + k.name for k in self.kernels) or 'none'}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Module):
            return NotImplemented
        return self.name == other.name and self.kernels == other.kernels

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Module @{self.name} ({len(self.kernels)} kernels)>"



def derived_type_source(op: Op) -> Value | None:
    """For ops whose result type copies an operand's type (offset, byte_offset, select): that operand."""
    rule = op.defn.result
    if rule == "op0":
        idx = 0
    elif rule == "A":
        idx = op.defn.operands.index("A")
    else:
        return None
    return op.operands[idx] if len(op.operands) > idx else None


def resolve_derived_types(pending: Sequence[Op]) -> list[tuple[Op, str]]:
    """Set the result types of ops built before their operands' types were known.

    Parsers and decoders create ops first (with a placeholder result type) and resolve operands
    afterwards, because a use may precede its definition. For the ops whose result type copies
    an operand (offset, byte_offset, select) this follows chains of such ops iteratively, in
    O(len(pending)) total.

    Returns:
        ``(op, message)`` for every op whose type cannot be determined (missing operand, or a
        cyclic chain of definitions); empty on success.
    """
    state: dict[int, int] = {id(op): 0 for op in pending}  # 0 unresolved, 1 on the stack, 2 done
    problems: list[tuple[Op, str]] = []
    for start in pending:
        chain: list[Op] = []
        cur: Op | None = start
        while cur is not None and state.get(id(cur), 2) != 2:
            if state[id(cur)] == 1:
                problems.append((cur, f"the type of {cur.opcode}'s result depends on itself (cyclic definition)"))
                for op in chain:
                    state[id(op)] = 2
                chain = []
                break
            state[id(cur)] = 1
            chain.append(cur)
            src = derived_type_source(cur)
            cur = src.op if isinstance(src, OpResult) else None
        for link in reversed(chain):
            src = derived_type_source(link)
            if src is None:
                problems.append((link, f"cannot determine the result type of {link.opcode} (missing operand)"))
            elif link.result is not None:
                link.result.type = src.type
            state[id(link)] = 2
    return problems
