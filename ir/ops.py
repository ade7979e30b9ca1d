"""The opcode table: one row per op, the single source of truth for every IR consumer.

The verifier, the text printer and parser, the binary codec, the reference interpreter and the
LLVM lowering all read :data:`OPS` instead of hard-coding op knowledge. A row (:class:`OpDef`)
says:

* ``code``: the stable opcode number used on the wire (never reuse or renumber);
* ``operands``: one *operand rule* per operand (see :data:`OPERAND_RULES`);
* ``type_class``: whether the op carries a type annotation (``: T`` in text) and which types
  it may be (see :data:`TYPE_CLASSES`); its meaning per op is in ``doc``;
* ``result``: the *result rule* (see :data:`RESULT_RULES`), or None for ops without a result;
* ``attrs``: which extra attributes the op has: ``pred`` (comparison predicate), ``dim``
  (x/y/z), ``array`` (a shared or local array of the kernel), ``imm`` (a constant);
* ``successors``: how many successor blocks a terminator names (with block arguments);
* flags: ``terminator``, ``side_effects``, ``reads_memory``, ``writes_memory``,
  ``commutative``; ``pure`` is derived (no side effects and no memory access);
* ``conv``: for conversions, the source/target rule (see :data:`CONVERSIONS`).

:func:`check_types` applies a row to concrete types and returns every problem as a message;
:func:`infer_result` computes the result type. Exact semantics of every op (overflow, shifts,
division by zero, saturation, NaN) are specified in docs/ir.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from .types import (
    FLOAT_TYPES,
    INT_TYPES,
    MEMORY_TYPES,
    AddressSpace,
    Type,
    f32,
    f64,
    i1,
    i8,
    i16,
    i32,
    i64,
    ptr_local,
    ptr_shared,
)

__all__ = [
    "CONVERSIONS",
    "DIMS",
    "FCMP_PREDICATES",
    "ICMP_PREDICATES",
    "OPERAND_RULES",
    "OPS",
    "OPS_BY_CODE",
    "RESULT_RULES",
    "TYPE_CLASSES",
    "OpDef",
    "check_types",
    "infer_result",
    "opdef",
    "type_in_class",
]

ICMP_PREDICATES: tuple[str, ...] = ("eq", "ne", "slt", "sle", "sgt", "sge", "ult", "ule", "ugt", "uge")
#: o* are false if either operand is NaN; u* are true if either is NaN; ord/uno test for NaN.
FCMP_PREDICATES: tuple[str, ...] = (
    "oeq", "one", "olt", "ole", "ogt", "oge", "ord",
    "ueq", "une", "ult", "ule", "ugt", "uge", "uno",
)
DIMS: tuple[str, ...] = ("x", "y", "z")

#: Operand rules: what each operand's type must be.
OPERAND_RULES: Mapping[str, str] = MappingProxyType({
    "T": "the op's annotated type",
    "int": "any integer type",
    "float": "any float type",
    "i1": "i1",
    "idx": "an integer index i8/i16/i32/i64 (sign-extended to 64 bits)",
    "ptr": "any pointer",
    "ptr_store": "a pointer that may be stored through (not ptr<constant>)",
    "ptr_atomic": "ptr<global> or ptr<shared>",
    "A": "any type; all 'A' operands of the op have the same type",
    "src": "the conversion's source (checked by the conversion rule)",
    "mem": "a memory type (i8..i64, f16..f64)",
})

#: Type classes for the ``: T`` annotation.
TYPE_CLASSES: Mapping[str, tuple[Type, ...]] = MappingProxyType({
    "int": INT_TYPES,
    "float": FLOAT_TYPES,
    "wint": (i8, i16, i32, i64),
    "mem": MEMORY_TYPES,
    "scalar": INT_TYPES + FLOAT_TYPES,
    "atomic_int": (i32, i64),
    "atomic_float": (f32, f64),
    "atomic_any": (i32, i64, f32, f64),
})

#: Result rules: how the result type follows from the annotation and the operands.
RESULT_RULES: Mapping[str, str] = MappingProxyType({
    "T": "the annotated type",
    "i1": "i1",
    "i32": "i32",
    "ptr_shared": "ptr<shared>",
    "ptr_local": "ptr<local>",
    "op0": "the type of operand 0",
    "A": "the type of the 'A' operands",
})

#: Conversion rules (``conv``): source operand kind, target (annotation) kind, size relation.
CONVERSIONS: Mapping[str, str] = MappingProxyType({
    "trunc": "int -> narrower int",
    "ext": "int -> wider int",
    "fptrunc": "float -> narrower float",
    "fpext": "float -> wider float",
    "f2i": "float -> int i8..i64 (saturating; NaN -> 0)",
    "i2f": "int -> float (round to nearest even)",
    "bitcast": "int/float -> int/float of the same bit width (not i1)",
})


@dataclass(frozen=True)
class OpDef:
    """One row of the opcode table. See the module docstring for the meaning of each field."""

    name: str
    code: int
    operands: tuple[str, ...]
    type_class: str | None
    result: str | None
    doc: str
    attrs: tuple[str, ...] = ()
    successors: int = 0
    terminator: bool = False
    side_effects: bool = False
    reads_memory: bool = False
    writes_memory: bool = False
    commutative: bool = False
    conv: str | None = None

    @property
    def pure(self) -> bool:
        """No side effects and no memory access: may be removed if unused, hoisted, CSE'd."""
        return not (self.side_effects or self.reads_memory or self.writes_memory or self.terminator)

    @property
    def has_result(self) -> bool:
        """True if the op defines a value."""
        return self.result is not None

    @property
    def predicates(self) -> tuple[str, ...]:
        """Allowed predicates for ``pred`` (empty if the op has none)."""
        if self.name == "icmp":
            return ICMP_PREDICATES
        if self.name == "fcmp":
            return FCMP_PREDICATES
        return ()


_ROWS: list[OpDef] = []


def _row(name: str, code: int, operands: Sequence[str], type_class: str | None, result: str | None,
         doc: str, **flags: object) -> None:
    _ROWS.append(OpDef(name, code, tuple(operands), type_class, result, doc, **flags))  # type: ignore[arg-type]


def _int_binary(name: str, code: int, doc: str, commutative: bool = False) -> None:
    _row(name, code, ("T", "T"), "int", "T", doc, commutative=commutative)


def _float_binary(name: str, code: int, doc: str, commutative: bool = False) -> None:
    _row(name, code, ("T", "T"), "float", "T", doc, commutative=commutative)


def _unary(name: str, code: int, cls: str, doc: str) -> None:
    _row(name, code, ("T",), cls, "T", doc)


def _conversion(name: str, code: int, target: str, conv: str, doc: str) -> None:
    _row(name, code, ("src",), target, "T", doc, conv=conv)


def _atomic(name: str, code: int, cls: str, doc: str) -> None:
    _row(name, code, ("ptr_atomic", "T"), cls, "T", doc, side_effects=True, reads_memory=True,
         writes_memory=True)


# --- integer arithmetic (wrapping; see docs/ir.md for division and shifts) -----------------------
_int_binary("add", 1, "a + b, wrapping", commutative=True)
_int_binary("sub", 2, "a - b, wrapping")
_int_binary("mul", 3, "a * b, wrapping (low bits)", commutative=True)
_int_binary("sdiv", 4, "signed quotient toward zero; b == 0 -> 0; MIN / -1 -> MIN")
_int_binary("udiv", 5, "unsigned quotient; b == 0 -> 0")
_int_binary("srem", 6, "signed remainder (sign of a); b == 0 -> a; MIN % -1 -> 0")
_int_binary("urem", 7, "unsigned remainder; b == 0 -> a")
_int_binary("and", 8, "bitwise and", commutative=True)
_int_binary("or", 9, "bitwise or", commutative=True)
_int_binary("xor", 10, "bitwise xor", commutative=True)
_int_binary("shl", 11, "a << b (b unsigned); b >= width -> 0")
_int_binary("lshr", 12, "logical a >> b (b unsigned); b >= width -> 0")
_int_binary("ashr", 13, "arithmetic a >> b (b unsigned); b >= width -> sign fill (0 or -1)")
_int_binary("smin", 14, "signed minimum", commutative=True)
_int_binary("smax", 15, "signed maximum", commutative=True)
_int_binary("umin", 16, "unsigned minimum", commutative=True)
_int_binary("umax", 17, "unsigned maximum", commutative=True)
_unary("neg", 18, "int", "0 - a, wrapping (neg MIN = MIN)")
_unary("not", 19, "int", "bitwise complement")
_unary("abs", 20, "int", "signed absolute value, wrapping (abs MIN = MIN)")
# --- float arithmetic (IEEE-754, round to nearest even) ------------------------------------------
_float_binary("fadd", 21, "a + b", commutative=True)
_float_binary("fsub", 22, "a - b")
_float_binary("fmul", 23, "a * b", commutative=True)
_float_binary("fdiv", 24, "a / b")
_float_binary("frem", 25, "fmod(a, b): remainder with the sign of a (C fmod)")
_float_binary("fmin", 26, "IEEE minNum: the non-NaN operand if one is NaN", commutative=True)
_float_binary("fmax", 27, "IEEE maxNum: the non-NaN operand if one is NaN", commutative=True)
_float_binary("pow", 28, "a ** b (C pow)")
_unary("fneg", 29, "float", "-a (flips the sign bit, also of NaN)")
_unary("fabs", 30, "float", "|a| (clears the sign bit)")
_unary("sqrt", 31, "float", "square root (correctly rounded)")
_unary("rsqrt", 32, "float", "1 / sqrt(a) (may be approximate, <= 2 ulp)")
_unary("exp", 33, "float", "e ** a")
_unary("exp2", 34, "float", "2 ** a")
_unary("log", 35, "float", "natural logarithm")
_unary("log2", 36, "float", "base-2 logarithm")
_unary("sin", 37, "float", "sine (radians)")
_unary("cos", 38, "float", "cosine (radians)")
_unary("tanh", 39, "float", "hyperbolic tangent")
_unary("floor", 40, "float", "round toward -inf")
_unary("ceil", 41, "float", "round toward +inf")
_row("fma", 42, ("T", "T", "T"), "float", "T", "a * b + c with a single rounding")
# --- comparisons and select -----------------------------------------------------------------------
_row("icmp", 43, ("A", "A"), None, "i1", "integer comparison by predicate", attrs=("pred",))
_row("fcmp", 44, ("A", "A"), None, "i1", "float comparison by predicate (ordered/unordered)",
     attrs=("pred",))
_row("select", 45, ("i1", "A", "A"), None, "A", "c ? a : b (both evaluated; no side effects)")
# --- conversions ----------------------------------------------------------------------------------
_conversion("trunc", 46, "int", "trunc", "keep the low bits")
_conversion("zext", 47, "int", "ext", "zero-extend")
_conversion("sext", 48, "int", "ext", "sign-extend")
_conversion("fptrunc", 49, "float", "fptrunc", "round to the narrower float (nearest even)")
_conversion("fpext", 50, "float", "fpext", "exact widening")
_conversion("fptosi", 51, "wint", "f2i", "toward zero, saturating to the signed range; NaN -> 0")
_conversion("fptoui", 52, "wint", "f2i", "toward zero, saturating to [0, 2^n-1]; NaN -> 0")
_conversion("sitofp", 53, "float", "i2f", "signed int to float, nearest even")
_conversion("uitofp", 54, "float", "i2f", "unsigned int to float, nearest even")
_conversion("bitcast", 55, "scalar", "bitcast", "reinterpret the bits (same width, int/float)")
# --- constants and thread geometry ----------------------------------------------------------------
_row("const", 56, (), "scalar", "T", "a constant of the annotated type", attrs=("imm",))
_row("thread_id", 57, (), None, "i32", "thread index within the block, per dim", attrs=("dim",))
_row("block_id", 58, (), None, "i32", "block index within the grid, per dim", attrs=("dim",))
_row("block_dim", 59, (), None, "i32", "threads per block, per dim", attrs=("dim",))
_row("grid_dim", 60, (), None, "i32", "blocks per grid, per dim", attrs=("dim",))
# --- pointers -------------------------------------------------------------------------------------
_row("offset", 61, ("ptr", "idx"), "mem", "op0", "p + sext(i) * sizeof(T); same address space")
_row("byte_offset", 62, ("ptr", "idx"), None, "op0", "p + sext(i) bytes; same address space")
_row("shared_addr", 63, (), None, "ptr_shared", "address of a shared array of the kernel",
     attrs=("array",))
_row("local_addr", 64, (), None, "ptr_local", "address of a local (per-thread) array of the kernel",
     attrs=("array",))
# --- memory ---------------------------------------------------------------------------------------
_row("load", 65, ("ptr",), "mem", "T", "read a T at p (naturally aligned)", reads_memory=True)
_row("store", 66, ("mem", "ptr_store"), None, None, "write value v (operand 0) at p (operand 1)",
     side_effects=True, writes_memory=True)
_atomic("atomic_add", 67, "atomic_int", "atomically *p += v (wrapping); returns the old value")
_atomic("atomic_fadd", 68, "atomic_float", "atomically *p += v (float); returns the old value")
_atomic("atomic_smin", 69, "atomic_int", "atomically *p = smin(*p, v); returns the old value")
_atomic("atomic_smax", 70, "atomic_int", "atomically *p = smax(*p, v); returns the old value")
_atomic("atomic_umin", 71, "atomic_int", "atomically *p = umin(*p, v); returns the old value")
_atomic("atomic_umax", 72, "atomic_int", "atomically *p = umax(*p, v); returns the old value")
_atomic("atomic_and", 73, "atomic_int", "atomically *p &= v; returns the old value")
_atomic("atomic_or", 74, "atomic_int", "atomically *p |= v; returns the old value")
_atomic("atomic_xor", 75, "atomic_int", "atomically *p ^= v; returns the old value")
_atomic("atomic_xchg", 76, "atomic_any", "atomically *p = v; returns the old value")
_row("atomic_cas", 77, ("ptr_atomic", "T", "T"), "atomic_int", "T",
     "atomically: old = *p; if old == cmp: *p = new; returns old", side_effects=True, reads_memory=True,
     writes_memory=True)
_row("barrier", 78, (), None, None,
     "block-wide barrier; also a fence for shared and global memory", side_effects=True,
     reads_memory=True, writes_memory=True)
# --- terminators ----------------------------------------------------------------------------------
_row("br", 79, (), None, None, "jump to the successor, passing block arguments", successors=1,
     terminator=True)
_row("cbr", 80, ("i1",), None, None, "if c jump to successor 0 else successor 1", successors=2,
     terminator=True)
_row("ret", 81, (), None, None, "end this thread", terminator=True)
_row("trap", 82, (), None, None, "abort the launch with a kernel fault", terminator=True,
     side_effects=True)
# --- added after version 1's first 82 codes (append only) -----------------------------------------
_unary("rint", 83, "float", "round to the nearest integer, halfway cases to even")

#: All ops by name, in table order.
OPS: Mapping[str, OpDef] = MappingProxyType({row.name: row for row in _ROWS})
#: All ops by wire code.
OPS_BY_CODE: Mapping[int, OpDef] = MappingProxyType({row.code: row for row in _ROWS})
assert len(OPS) == len(_ROWS) == len(OPS_BY_CODE), "duplicate op name or code"


def opdef(name: str) -> OpDef | None:
    """The row for an op name, or None."""
    return OPS.get(name)


def type_in_class(t: Type, cls: str) -> bool:
    """True if ``t`` belongs to the type class ``cls`` (a key of :data:`TYPE_CLASSES`)."""
    return t in TYPE_CLASSES[cls]


def _check_operand(rule: str, t: Type, annotated: Type | None) -> str | None:
    """Why ``t`` breaks ``rule`` (None if it does not). 'A' and 'src' are checked elsewhere."""
    if rule == "T":
        ok = t is annotated
    elif rule == "int":
        ok = t.is_int
    elif rule == "float":
        ok = t.is_float
    elif rule == "i1":
        ok = t is i1
    elif rule == "idx":
        ok = t.is_int and t is not i1
    elif rule == "ptr":
        ok = t.is_ptr
    elif rule == "ptr_store":
        if t.space is AddressSpace.CONSTANT:
            return "cannot store through ptr<constant>"
        ok = t.is_ptr
    elif rule == "ptr_atomic":
        if t.is_ptr and t.space not in (AddressSpace.GLOBAL, AddressSpace.SHARED):
            return f"atomics need ptr<global> or ptr<shared>, not {t}"
        ok = t.is_ptr
    elif rule == "mem":
        ok = t.is_memory
    else:
        return None
    if ok:
        return None
    want = str(annotated) if rule == "T" else OPERAND_RULES[rule]
    return f"expected {want}, got {t}"


def _check_conversion(conv: str, src: Type, dst: Type) -> str | None:
    """Why converting ``src`` to ``dst`` breaks the conversion rule ``conv`` (None if fine)."""
    if conv == "trunc":
        ok = src.is_int and dst.is_int and src.bits > dst.bits
    elif conv == "ext":
        ok = src.is_int and dst.is_int and src.bits < dst.bits
    elif conv == "fptrunc":
        ok = src.is_float and dst.is_float and src.bits > dst.bits
    elif conv == "fpext":
        ok = src.is_float and dst.is_float and src.bits < dst.bits
    elif conv == "f2i":
        ok = src.is_float and dst.is_int
    elif conv == "i2f":
        ok = src.is_int and dst.is_float
    elif conv == "bitcast":
        ok = (src.is_int or src.is_float) and src is not i1 and src.bits == dst.bits
    else:
        raise AssertionError(conv)
    return None if ok else f"cannot convert {src} to {dst} ({CONVERSIONS[conv]})"


def check_types(d: OpDef, annotated: Type | None, operand_types: Sequence[Type]) -> list[str]:
    """Every type problem of one op, as messages (empty if the types are right).

    Checks the operand count, the annotation against ``d.type_class``, each operand against its
    rule, the 'A' operands against each other and conversions against ``d.conv``.
    """
    problems: list[str] = []
    if len(operand_types) != len(d.operands):
        return [f"{d.name} takes {len(d.operands)} operand(s), got {len(operand_types)}"]
    if d.type_class is None:
        if annotated is not None:
            problems.append(f"{d.name} takes no type annotation")
    elif annotated is None:
        problems.append(f"{d.name} needs a type annotation")
    elif not type_in_class(annotated, d.type_class):
        allowed = ", ".join(t.name for t in TYPE_CLASSES[d.type_class])
        problems.append(f"{d.name} cannot have type {annotated}; allowed: {allowed}")
        annotated = None
    a_type: Type | None = None
    for idx, (rule, t) in enumerate(zip(d.operands, operand_types)):
        if rule == "T" and annotated is None:
            continue
        if rule == "A":
            if a_type is None:
                a_type = t
            elif t is not a_type:
                problems.append(f"operand {idx} of {d.name}: expected {a_type} like the other operand, got {t}")
            continue
        if rule == "src":
            if annotated is not None and d.conv is not None:
                msg = _check_conversion(d.conv, t, annotated)
                if msg:
                    problems.append(msg)
            continue
        msg = _check_operand(rule, t, annotated)
        if msg:
            problems.append(f"operand {idx} of {d.name}: {msg}")
    if a_type is not None:
        problems.extend(_check_a_class(d, a_type))
    return problems


def _check_a_class(d: OpDef, t: Type) -> list[str]:
    if d.name == "icmp" and not t.is_int:
        return [f"icmp compares integers, got {t} (use fcmp for floats)"]
    if d.name == "fcmp" and not t.is_float:
        return [f"fcmp compares floats, got {t} (use icmp for integers)"]
    return []


def infer_result(d: OpDef, annotated: Type | None, operand_types: Sequence[Type]) -> Type | None:
    """The result type of an op from its annotation and operand types (None: no result, or unknown).

    Does not check the types; call :func:`check_types` for that.
    """
    rule = d.result
    if rule is None:
        return None
    if rule == "T":
        return annotated
    if rule == "i1":
        return i1
    if rule == "i32":
        return i32
    if rule == "ptr_shared":
        return ptr_shared
    if rule == "ptr_local":
        return ptr_local
    if rule == "op0":
        return operand_types[0] if operand_types else None
    if rule == "A":
        idx = d.operands.index("A")
        return operand_types[idx] if len(operand_types) > idx else None
    raise AssertionError(rule)

