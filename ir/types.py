"""IR types: sign-agnostic integers, IEEE floats and opaque pointers with an address space.

Every type is an interned, immutable :class:`Type`; compare types with ``is`` or ``==`` (the
same thing). The whole set is closed and small::

    i1 i8 i16 i32 i64          integers; signedness lives in the ops (sdiv/udiv, slt/ult ...)
    f16 f32 f64                IEEE-754 binary16/32/64
    ptr<global> ptr<shared>    opaque 64-bit pointers; the address space is part of the type,
    ptr<local>  ptr<constant>  what a pointer points at is given by each load/store/offset

Memory holds ``i8 i16 i32 i64 f16 f32 f64`` ("memory types"); ``i1`` and pointers are register
values only (zext an i1 to i8 to store it). Each type has a stable one-byte ``code`` used by the
binary encoding.
"""

from __future__ import annotations

from enum import Enum

from .errors import IRError

__all__ = [
    "ALL_TYPES",
    "FLOAT_TYPES",
    "INT_TYPES",
    "MEMORY_TYPES",
    "PARAM_TYPES",
    "PTR_TYPES",
    "AddressSpace",
    "Type",
    "f16",
    "f32",
    "f64",
    "i1",
    "i8",
    "i16",
    "i32",
    "i64",
    "parse_type",
    "ptr",
    "ptr_constant",
    "ptr_global",
    "ptr_local",
    "ptr_shared",
    "type_from_code",
]


class AddressSpace(Enum):
    """Where a pointer points. Values are the spellings used in ``ptr<...>``."""

    GLOBAL = "global"      # device memory, visible to all threads of the launch
    SHARED = "shared"      # per-block scratch (shared arrays), visible to the block's threads
    LOCAL = "local"        # per-thread scratch (local arrays)
    CONSTANT = "constant"  # read-only device memory (no stores, no atomics)


class Type:
    """An interned IR type. Do not construct directly: use the module constants or :func:`ptr`."""

    __slots__ = ("bits", "code", "kind", "name", "space")

    kind: str  # "int" | "float" | "ptr"
    bits: int
    space: AddressSpace | None
    name: str
    code: int

    def __init__(self, kind: str, bits: int, space: AddressSpace | None, name: str, code: int) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "space", space)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "code", code)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("IR types are immutable")

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (type_from_code, (self.code,))

    @property
    def is_int(self) -> bool:
        """True for i1..i64."""
        return self.kind == "int"

    @property
    def is_float(self) -> bool:
        """True for f16, f32, f64."""
        return self.kind == "float"

    @property
    def is_ptr(self) -> bool:
        """True for every ``ptr<...>``."""
        return self.kind == "ptr"

    @property
    def is_memory(self) -> bool:
        """True for the types that loads, stores and arrays may use."""
        return self in _MEMORY_SET

    @property
    def size(self) -> int:
        """Size in bytes in memory (pointers: 8; i1: 1, though i1 is never stored)."""
        return max(1, self.bits // 8)

    @property
    def min_signed(self) -> int:
        """Smallest value of an integer type read as signed."""
        return -(1 << (self.bits - 1))

    @property
    def max_unsigned(self) -> int:
        """Largest value of an integer type read as unsigned."""
        return (1 << self.bits) - 1


_CODES: dict[int, Type] = {}
_NAMES: dict[str, Type] = {}


def _make(kind: str, bits: int, space: AddressSpace | None, name: str, code: int) -> Type:
    t = Type(kind, bits, space, name, code)
    _CODES[code] = t
    _NAMES[name] = t
    return t


i1 = _make("int", 1, None, "i1", 1)
i8 = _make("int", 8, None, "i8", 2)
i16 = _make("int", 16, None, "i16", 3)
i32 = _make("int", 32, None, "i32", 4)
i64 = _make("int", 64, None, "i64", 5)
f16 = _make("float", 16, None, "f16", 6)
f32 = _make("float", 32, None, "f32", 7)
f64 = _make("float", 64, None, "f64", 8)
ptr_global = _make("ptr", 64, AddressSpace.GLOBAL, "ptr<global>", 9)
ptr_shared = _make("ptr", 64, AddressSpace.SHARED, "ptr<shared>", 10)
ptr_local = _make("ptr", 64, AddressSpace.LOCAL, "ptr<local>", 11)
ptr_constant = _make("ptr", 64, AddressSpace.CONSTANT, "ptr<constant>", 12)

INT_TYPES: tuple[Type, ...] = (i1, i8, i16, i32, i64)
FLOAT_TYPES: tuple[Type, ...] = (f16, f32, f64)
PTR_TYPES: tuple[Type, ...] = (ptr_global, ptr_shared, ptr_local, ptr_constant)
ALL_TYPES: tuple[Type, ...] = INT_TYPES + FLOAT_TYPES + PTR_TYPES
MEMORY_TYPES: tuple[Type, ...] = (i8, i16, i32, i64, f16, f32, f64)
#: Types a kernel parameter may have (what the host can pass by value).
PARAM_TYPES: tuple[Type, ...] = (i8, i16, i32, i64, f16, f32, f64, ptr_global, ptr_constant)
_MEMORY_SET = frozenset(MEMORY_TYPES)
_PTR_BY_SPACE = {t.space: t for t in PTR_TYPES}


def ptr(space: AddressSpace | str) -> Type:
    """The pointer type for an address space (``ptr("global")`` is ``ptr_global``).

    Raises:
        IRError: unknown address space name.
    """
    try:
        return _PTR_BY_SPACE[AddressSpace(space)]
    except ValueError:
        raise IRError(f"unknown address space {space!r}; use one of global, shared, local, constant") from None


def parse_type(text: str) -> Type:
    """The type spelled ``text`` (``"i32"``, ``"ptr<global>"``).

    Raises:
        IRError: not a type name.
    """
    t = _NAMES.get(text)
    if t is None:
        raise IRError(f"unknown type {text!r}; types are {', '.join(x.name for x in ALL_TYPES)}")
    return t


def lookup_type(text: str) -> Type | None:
    """The type spelled ``text``, or None (no exception; for parsers)."""
    return _NAMES.get(text)


def type_from_code(code: int) -> Type:
    """The type with binary code ``code``.

    Raises:
        IRError: unknown code.
    """
    t = _CODES.get(code)
    if t is None:
        raise IRError(f"unknown type code {code}")
    return t


def lookup_type_code(code: int) -> Type | None:
    """The type with binary code ``code``, or None."""
    return _CODES.get(code)
