"""The .vxir text format: a printer and a parser that round-trip exactly.

``print_module(parse(print_module(m))) == print_module(m)`` and ``parse(print_module(m)) == m``
for every module ``m`` whose names are valid. The grammar (one statement per line; ``;`` starts a
comment)::

    module   := 'module' SYMBOL NL kernel*
    kernel   := 'kernel' SYMBOL '(' [param {',' param}] ')' '{' NL array* block* '}' NL
    param    := VALUE ':' TYPE
    array    := ('shared' | 'local') SYMBOL ':' TYPE '[' INT ']' NL
    block    := BLOCK ['(' [param {',' param}] ')'] ':' NL op*
    op       := [VALUE '='] OPCODE ['.' DIM] [PRED] [SYMBOL] [item {',' item}] [':' TYPE] NL
    item     := VALUE | NUMBER | BLOCK ['(' [VALUE {',' VALUE}] ')']

    VALUE = %name   BLOCK = ^name   SYMBOL = @name   TYPE = i32 | f32 | ptr<global> | ...

Items are operands (values), the constant (a number, ``const`` only) and successors (blocks with
their arguments, ``br``/``cbr``), printed in that order. Numeric names (``%7``, ``^3``) are
anonymous: the parser gives them no name and the printer numbers anonymous values and blocks
from 0 in canonical order. Uses may come before definitions in the text (blocks need not be in
dominance order); the parser resolves them after reading the whole kernel.

The parser does not verify (``vxpu.ir.verify``) but records ``line:col`` on kernels, blocks and
ops so the verifier's problems point into the text. It reports every syntax problem it finds
(one per line at most) in one :class:`~vxpu.ir.errors.ParseError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from .errors import IRError, Location, ParseError, Problem
from .limits import (
    MAX_BLOCK_PARAMS,
    MAX_BLOCKS,
    MAX_KERNELS,
    MAX_OPERANDS,
    MAX_OPS_PER_KERNEL,
    MAX_OPS_PER_MODULE,
    MAX_PARAMS,
    MAX_SUCCESSORS,
    MAX_TEXT_BYTES,
)
from .model import (
    Block,
    Kernel,
    LocalArray,
    Module,
    Op,
    Param,
    SharedArray,
    Successor,
    Value,
    is_valid_name,
    normalize_imm,
    resolve_derived_types,
)
from .ops import OPS, infer_result
from .types import Type, i1, lookup_type

__all__ = ["MAX_PARSE_PROBLEMS", "parse", "print_kernel", "print_module"]

#: The parser stops after this many problems.
MAX_PARSE_PROBLEMS = 100
_MAX_NUMBER_LEN = 64


# ---------------------------------------------------------------------------------------------
# Printer
# ---------------------------------------------------------------------------------------------

def print_module(module: Module) -> str:
    """The .vxir text of ``module`` (ends with a newline)."""
    parts = [f"module @{module.name}\n"]
    for k in module.kernels:
        parts.append("\n")
        parts.append(print_kernel(k))
    return "".join(parts)


def format_imm(t: Type | None, imm: float) -> str:
    """How a constant is spelled: integers in decimal; floats as the shortest decimal that reads
    back to the same value of their type (``0.1`` for f32 0.1, not ``0.10000000149011612``)."""
    if not isinstance(imm, float):
        return str(imm)
    if math.isnan(imm):
        return "nan"
    if math.isinf(imm) or t is None or t.bits == 64:
        return repr(imm)
    text = repr(imm)
    for digits in range(1, 18):
        candidate = format(imm, f".{digits}g")
        try:
            exact = normalize_imm(t, float(candidate)) == imm
        except IRError:  # rounded up past the largest finite value
            continue
        if exact:
            shortest = repr(float(candidate))  # "1500.0" rather than "1.5e+03"
            if len(shortest) < len(text):  # the exact value when it is as short ("65504.0")
                text = shortest
            break
    if not any(c in text for c in ".en"):
        text += ".0"
    return text


class _Names:
    """Printed names of a kernel's values and blocks (anonymous ones numbered from 0)."""

    def __init__(self, k: Kernel) -> None:
        self.values: dict[Value, str] = {}
        n = 0
        for v in k.values():
            if v.name is not None:
                self.values[v] = "%" + v.name
            else:
                self.values[v] = f"%{n}"
                n += 1
        self.blocks: dict[int, str] = {}
        n = 0
        for b in k.blocks:
            if b.name is not None:
                self.blocks[id(b)] = "^" + b.name
            else:
                self.blocks[id(b)] = f"^{n}"
                n += 1

    def value(self, v: Value) -> str:
        return self.values.get(v, "%<undefined>")

    def block(self, b: Block) -> str:
        return self.blocks.get(id(b), "^<undefined>")


def print_kernel(k: Kernel) -> str:
    """The .vxir text of one kernel."""
    names = _Names(k)
    params = ", ".join(f"{names.value(p)}: {p.type}" for p in k.params)
    lines = [f"kernel @{k.name}({params}) {{"]
    for a in k.shared:
        lines.append(f"  shared @{a.name}: {a.type}[{a.count}]")
    for la in k.local:
        lines.append(f"  local @{la.name}: {la.type}[{la.count}]")
    for b in k.blocks:
        head = names.block(b)
        if b.params:
            head += "(" + ", ".join(f"{names.value(p)}: {p.type}" for p in b.params) + ")"
        lines.append(head + ":")
        for op in b.ops:
            lines.append("  " + _print_op(op, names))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _print_op(op: Op, names: _Names) -> str:
    out = []
    if op.result is not None:
        out.append(names.value(op.result) + " = ")
    out.append(op.opcode)
    if op.dim is not None:
        out.append("." + op.dim)
    if op.pred is not None:
        out.append(" " + op.pred)
    if op.array is not None:
        out.append(" @" + op.array.name)
    items = [names.value(v) for v in op.operands]
    if op.imm is not None:
        items.append(format_imm(op.type, op.imm))
    for s in op.successors:
        target = names.block(s.block)
        if s.args:
            target += "(" + ", ".join(names.value(a) for a in s.args) + ")"
        items.append(target)
    if items:
        out.append(" " + ", ".join(items))
    if op.type is not None:
        out.append(" : " + op.type.name)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Lexer
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    [ \t\r]*
  (?:
    (?P<comment>;.*)
  | (?P<value>%[A-Za-z0-9_.]+)
  | (?P<block>\^[A-Za-z0-9_.]+)
  | (?P<sym>@[A-Za-z0-9_.]+)
  | (?P<type>ptr<[A-Za-z]*>)
  | (?P<num>[-+]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|(?:inf|nan)\b))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[(){}\[\],:=])
  | (?P<bad>.)
  )
""", re.VERBOSE)


class _Tok(NamedTuple):
    kind: str
    text: str
    col: int


class _Syntax(Exception):
    """A syntax problem on the current line (converted to a located Problem)."""

    def __init__(self, message: str, col: int) -> None:
        super().__init__(message)
        self.col = col


def _tokenize(line: str) -> list[_Tok]:
    toks: list[_Tok] = []
    for m in _TOKEN.finditer(line.rstrip(" \t\r")):
        kind = m.lastgroup or "bad"
        if kind == "comment":
            break
        start = m.start(kind)
        if kind == "bad":
            raise _Syntax(f"unexpected character {line[start]!r}", start + 1)
        toks.append(_Tok(kind, m.group(kind), start + 1))
    return toks


class _Cursor:
    """Token stream of one line."""

    def __init__(self, toks: list[_Tok], end_col: int) -> None:
        self.toks = toks
        self.i = 0
        self.end_col = end_col

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self, what: str) -> _Tok:
        t = self.peek()
        if t is None:
            raise _Syntax(f"expected {what} at the end of the line", self.end_col)
        self.i += 1
        return t

    def expect(self, kind: str, text: str | None = None, what: str | None = None) -> _Tok:
        t = self.next(what or text or kind)
        if t.kind != kind or (text is not None and t.text != text):
            raise _Syntax(f"expected {what or repr(text) if text else what or kind}, got {t.text!r}", t.col)
        return t

    def accept(self, kind: str, text: str | None = None) -> _Tok | None:
        t = self.peek()
        if t is not None and t.kind == kind and (text is None or t.text == text):
            self.i += 1
            return t
        return None

    def done(self) -> None:
        t = self.peek()
        if t is not None:
            raise _Syntax(f"unexpected {t.text!r}", t.col)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

@dataclass
class _OpRec:
    line: int
    col: int
    opcode: str
    result: _Tok | None = None
    dim: str | None = None
    pred: str | None = None
    array: _Tok | None = None
    operands: list[_Tok] = field(default_factory=list)
    imm: _Tok | None = None
    type: Type | None = None
    successors: list[tuple[_Tok, list[_Tok]]] = field(default_factory=list)


@dataclass
class _BlockRec:
    name: _Tok
    params: list[tuple[_Tok, Type]]
    line: int
    ops: list[_OpRec] = field(default_factory=list)


@dataclass
class _KernelRec:
    name: str
    line: int
    col: int
    params: list[tuple[_Tok, Type]]
    shared: list[tuple[_Tok, Type, int, int]] = field(default_factory=list)  # name, type, count, line
    local: list[tuple[_Tok, Type, int, int]] = field(default_factory=list)
    blocks: list[_BlockRec] = field(default_factory=list)
    n_ops: int = 0


def parse(text: str) -> Module:
    """Parse .vxir text into a module (not verified; run ``vxpu.ir.verify.verify`` next).

    Raises:
        ParseError: listing every syntax and name-resolution problem with its line:col.
    """
    return _Parser(text).run()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.problems: list[Problem] = []
        self.module_name: str | None = None
        self.kernels: list[_KernelRec] = []
        self.current: _KernelRec | None = None
        self.line = 0
        self.module_ops = 0
        self.module_blocks = 0

    def problem(self, message: str, line: int, col: int, kernel: str | None = None) -> None:
        self.problems.append(Problem(Location(kernel=kernel, line=line, col=col), message))
        if len(self.problems) >= MAX_PARSE_PROBLEMS:
            raise ParseError(self.problems)

    def run(self) -> Module:
        if len(self.text) > MAX_TEXT_BYTES:
            raise ParseError(Problem(Location(line=1, col=1),
                                     f"text of {len(self.text)} bytes exceeds the limit of {MAX_TEXT_BYTES}"))
        for lineno, raw in enumerate(self.text.split("\n"), start=1):
            self.line = lineno
            try:
                toks = _tokenize(raw)
                if toks:
                    self._statement(_Cursor(toks, len(raw) + 1))
            except _Syntax as exc:
                self.problem(str(exc), lineno, exc.col, self.current.name if self.current else None)
            except _TooBig as exc:
                self.problem(str(exc), lineno, 1, self.current.name if self.current else None)
                raise ParseError(self.problems) from None
        if self.current is not None:
            self.problem(f"kernel @{self.current.name} is not closed with '}}'", self.line, 1, self.current.name)
        if self.module_name is None and not self.problems:
            self.problem("missing 'module @name' line", 1, 1)
        if self.problems:
            raise ParseError(self.problems)
        module = Module(self.module_name or "", [])
        for rec in self.kernels:
            k = _KernelBuilderFromText(rec, self).build()
            if k is not None:
                module.kernels.append(k)
        if self.problems:
            raise ParseError(self.problems)
        return module

    def _statement(self, cur: _Cursor) -> None:
        first = cur.peek()
        assert first is not None
        if self.current is None:
            self._top_level(cur)
        elif first.kind == "punct" and first.text == "}":
            cur.next("}")
            cur.done()
            self.kernels.append(self.current)
            self.current = None
        elif first.kind == "ident" and first.text in ("shared", "local") and _is_array_decl(cur):
            self._array(cur, self.current)
        elif first.kind == "block":
            self._block_header(cur, self.current)
        else:
            if not self.current.blocks:
                raise _Syntax("op outside a block: start a block with '^name:' first", first.col)
            self.current.n_ops += 1
            self.module_ops += 1
            if self.current.n_ops > MAX_OPS_PER_KERNEL:
                raise _TooBig(f"kernel @{self.current.name} has more than {MAX_OPS_PER_KERNEL} ops")
            if self.module_ops > MAX_OPS_PER_MODULE:
                raise _TooBig(f"the module has more than {MAX_OPS_PER_MODULE} ops")
            self.current.blocks[-1].ops.append(self._op(cur))

    def _top_level(self, cur: _Cursor) -> None:
        t = cur.next("'module' or 'kernel'")
        if t.kind == "ident" and t.text == "module":
            if self.module_name is not None:
                raise _Syntax("a second 'module' line (one module per file)", t.col)
            if self.kernels:
                raise _Syntax("'module' must come before the kernels", t.col)
            self.module_name = cur.expect("sym", what="@name").text[1:]
            cur.done()
            return
        if t.kind != "ident" or t.text != "kernel":
            raise _Syntax(f"expected 'module' or 'kernel', got {t.text!r}", t.col)
        if self.module_name is None:
            raise _Syntax("missing 'module @name' line before the first kernel", t.col)
        name = cur.expect("sym", what="@name")
        params = self._param_list(cur, required=True, limit=MAX_PARAMS)
        cur.expect("punct", "{")
        cur.done()
        if len(self.kernels) >= MAX_KERNELS:
            raise _TooBig(f"the module has more than {MAX_KERNELS} kernels")
        self.current = _KernelRec(name.text[1:], self.line, name.col, params)

    def _param_list(self, cur: _Cursor, required: bool, limit: int) -> list[tuple[_Tok, Type]]:
        params: list[tuple[_Tok, Type]] = []
        if cur.accept("punct", "(") is None:
            if required:
                t = cur.peek()
                raise _Syntax("expected '('", t.col if t else cur.end_col)
            return params
        if cur.accept("punct", ")"):
            return params
        while True:
            name = cur.expect("value", what="%name")
            if len(params) >= limit:
                raise _Syntax(f"more than {limit} parameters", name.col)
            cur.expect("punct", ":")
            params.append((name, self._type(cur)))
            if cur.accept("punct", ")"):
                return params
            cur.expect("punct", ",", what="',' or ')'")

    def _type(self, cur: _Cursor) -> Type:
        t = cur.next("a type")
        ty = lookup_type(t.text) if t.kind in ("ident", "type") else None
        if ty is None:
            raise _Syntax(f"unknown type {t.text!r}", t.col)
        return ty

    def _array(self, cur: _Cursor, k: _KernelRec) -> None:
        kind = cur.next("shared/local")
        if k.blocks:
            raise _Syntax("arrays must be declared before the first block", kind.col)
        name = cur.expect("sym", what="@name")
        cur.expect("punct", ":")
        ty = self._type(cur)
        cur.expect("punct", "[")
        count = cur.expect("num", what="an element count")
        if not re.fullmatch(r"\d{1,12}", count.text):
            raise _Syntax(f"array size must be a decimal integer, got {count.text!r}", count.col)
        cur.expect("punct", "]")
        cur.done()
        (k.shared if kind.text == "shared" else k.local).append((name, ty, int(count.text), self.line))

    def _block_header(self, cur: _Cursor, k: _KernelRec) -> None:
        name = cur.next("^name")
        params = self._param_list(cur, required=False, limit=MAX_BLOCK_PARAMS)
        cur.expect("punct", ":")
        cur.done()
        if len(k.blocks) >= MAX_BLOCKS:
            raise _TooBig(f"kernel @{k.name} has more than {MAX_BLOCKS} blocks")
        self.module_blocks += 1
        if self.module_blocks > MAX_OPS_PER_MODULE:  # every valid block holds at least one op
            raise _TooBig(f"the module has more than {MAX_OPS_PER_MODULE} blocks")
        k.blocks.append(_BlockRec(name, params, self.line))

    def _op(self, cur: _Cursor) -> _OpRec:
        first = cur.next("an op")
        result = None
        if first.kind == "value":
            cur.expect("punct", "=")
            result = first
            opcode_tok = cur.next("an opcode")
        else:
            opcode_tok = first
        if opcode_tok.kind != "ident":
            raise _Syntax(f"expected an opcode, got {opcode_tok.text!r}", opcode_tok.col)
        opcode, _, dim = opcode_tok.text.partition(".")
        d = OPS.get(opcode)
        if d is None:
            raise _Syntax(f"unknown op {opcode!r}", opcode_tok.col)
        rec = _OpRec(self.line, first.col, opcode, result, dim or None)
        if dim and "dim" not in d.attrs:
            raise _Syntax(f"{opcode} takes no dimension", opcode_tok.col)
        if "dim" in d.attrs and dim not in ("x", "y", "z"):
            raise _Syntax(f"{opcode} needs a dimension: {opcode}.x, {opcode}.y or {opcode}.z", opcode_tok.col)
        t = cur.peek()
        if t is not None and t.kind == "ident":
            cur.next("predicate")
            if "pred" not in d.attrs:
                raise _Syntax(f"unexpected {t.text!r}", t.col)
            rec.pred = t.text
        rec.array = cur.accept("sym")
        self._items(cur, rec)
        if cur.accept("punct", ":"):
            rec.type = self._type(cur)
        cur.done()
        return rec

    def _items(self, cur: _Cursor, rec: _OpRec) -> None:
        t = cur.peek()
        if t is None or t.kind not in ("value", "num", "block"):
            return
        while True:
            t = cur.next("an operand")
            if t.kind == "value":
                if len(rec.operands) >= MAX_OPERANDS:
                    raise _Syntax(f"more than {MAX_OPERANDS} operands", t.col)
                rec.operands.append(t)
            elif t.kind == "num":
                if rec.imm is not None:
                    raise _Syntax("only one constant per op", t.col)
                rec.imm = t
            elif t.kind == "block":
                args: list[_Tok] = []
                if cur.accept("punct", "(") and not cur.accept("punct", ")"):
                    while True:
                        args.append(cur.expect("value", what="%value"))
                        if len(args) > MAX_BLOCK_PARAMS:
                            raise _Syntax(f"more than {MAX_BLOCK_PARAMS} branch arguments", args[-1].col)
                        if cur.accept("punct", ")"):
                            break
                        cur.expect("punct", ",", what="',' or ')'")
                if len(rec.successors) >= MAX_SUCCESSORS:
                    raise _Syntax(f"more than {MAX_SUCCESSORS} successors", t.col)
                rec.successors.append((t, args))
            else:
                raise _Syntax(f"expected an operand, got {t.text!r}", t.col)
            if not cur.accept("punct", ","):
                return


def _is_array_decl(cur: _Cursor) -> bool:
    nxt = cur.toks[1] if len(cur.toks) > 1 else None
    return nxt is not None and nxt.kind == "sym"


class _TooBig(Exception):
    """A limit was exceeded: stop parsing."""


def _local_name(tok: _Tok) -> str | None:
    """The name of a %value / ^block token (None for numeric = anonymous)."""
    name = tok.text[1:]
    if name.isdigit():
        return None
    if not is_valid_name(name):
        raise _Syntax(f"invalid name {tok.text!r}: names start with a letter or '_'", tok.col)
    return name


def parse_number(tok_text: str, t: Type | None) -> int | float:
    """The Python number spelled ``tok_text`` for a constant of type ``t``.

    Raises:
        IRError: not a number of the right kind.
    """
    if len(tok_text) > _MAX_NUMBER_LEN:
        raise IRError(f"number literal longer than {_MAX_NUMBER_LEN} characters")
    if t is not None and t.is_float:
        body = tok_text.lstrip("+-")
        if body.lower().startswith("0x"):
            raise IRError("float constants are decimal (or inf, nan)")
        value = float(tok_text)
        if math.isinf(value) and not body.startswith("inf"):
            raise IRError(f"constant {tok_text} overflows {t}; write inf or -inf")
        return value
    if re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F]+|\d+)", tok_text) is None:
        raise IRError(f"{tok_text!r} is not an integer")
    return int(tok_text, 0) if "x" in tok_text.lower() else int(tok_text, 10)


_V = TypeVar("_V", bound=Value)


class _KernelBuilderFromText:
    """Turns one parsed kernel record into a Kernel, resolving names (forward uses included)."""

    def __init__(self, rec: _KernelRec, parser: _Parser) -> None:
        self.rec = rec
        self.p = parser
        self.values: dict[str, Value] = {}
        self.blocks: dict[str, Block] = {}
        self.ok = True

    def problem(self, message: str, line: int, col: int) -> None:
        self.ok = False
        self.p.problem(message, line, col, self.rec.name)

    def build(self) -> Kernel | None:
        rec = self.rec
        k = Kernel(rec.name)
        k.loc = Location(line=rec.line, col=rec.col)
        for tok, ty in rec.params:
            k.params.append(self._define(Param(ty, self._name(tok, rec.line), len(k.params)), tok, rec.line))
        arrays = self._arrays(k)
        for brec in rec.blocks:
            self._make_block(k, brec)
        pending: list[Op] = []
        ops: list[tuple[_OpRec, Op]] = []
        for brec, block in zip(rec.blocks, k.blocks):
            for orec in brec.ops:
                op = self._make_op(orec, arrays, pending)
                if op is not None:
                    block.append(op)
                    ops.append((orec, op))
        for orec, op in ops:
            self._resolve_uses(orec, op)
        self._resolve_derived_types(pending)
        return k if self.ok else None

    def _name(self, tok: _Tok, line: int) -> str | None:
        try:
            return _local_name(tok)
        except _Syntax as exc:
            self.problem(str(exc), line, exc.col)
            return None

    def _define(self, v: _V, tok: _Tok, line: int) -> _V:
        if tok.text in self.values:
            self.problem(f"{tok.text} is defined twice", line, tok.col)
        else:
            self.values[tok.text] = v
        return v

    def _arrays(self, k: Kernel) -> dict[tuple[str, str], SharedArray | LocalArray]:
        arrays: dict[tuple[str, str], SharedArray | LocalArray] = {}
        seen: set[str] = set()
        for kind, decls in (("shared", self.rec.shared), ("local", self.rec.local)):
            for tok, ty, count, line in decls:
                name = tok.text[1:]
                if name in seen:
                    self.problem(f"array @{name} is declared twice", line, tok.col)
                seen.add(name)
                arr = SharedArray(name, ty, count) if kind == "shared" else LocalArray(name, ty, count)
                (k.shared if kind == "shared" else k.local).append(arr)  # type: ignore[arg-type]
                arr.loc = Location(line=line, col=tok.col)
                arrays[(kind, name)] = arr
        return arrays

    def _make_block(self, k: Kernel, brec: _BlockRec) -> None:
        block = Block(self._name(brec.name, brec.line))
        block.loc = Location(line=brec.line, col=brec.name.col)
        if brec.name.text in self.blocks:
            self.problem(f"block {brec.name.text} is defined twice", brec.line, brec.name.col)
        else:
            self.blocks[brec.name.text] = block
        for tok, ty in brec.params:
            self._define(block.add_param(ty, self._name(tok, brec.line)), tok, brec.line)
        k.add_block(block)

    def _make_op(self, orec: _OpRec, arrays: dict[tuple[str, str], SharedArray | LocalArray],
                 pending: list[Op]) -> Op | None:
        d = OPS[orec.opcode]
        array = None
        if orec.array is not None:
            kind = {"shared_addr": "shared", "local_addr": "local"}.get(orec.opcode)
            array = arrays.get((kind, orec.array.text[1:])) if kind else None
            if array is None:
                what = f"no {kind} array {orec.array.text}" if kind else f"{orec.opcode} takes no array"
                self.problem(what, orec.line, orec.array.col)
                return None
        imm: int | float | None = None
        if orec.imm is not None:
            try:
                imm = parse_number(orec.imm.text, orec.type)
            except (IRError, ValueError) as exc:
                self.problem(str(exc), orec.line, orec.imm.col)
                return None
        result_type: Type | None = None
        if d.result in ("op0", "A"):
            result_type = i1  # placeholder; fixed in _resolve_derived_types
        elif d.result is not None:
            result_type = infer_result(d, orec.type, ())
            if result_type is None:
                self.problem(f"{orec.opcode} needs a type annotation (': T')", orec.line, orec.col)
                return None
        name = self._name(orec.result, orec.line) if orec.result is not None else None
        try:
            op = Op(orec.opcode, (), type=orec.type, pred=orec.pred, dim=orec.dim, array=array, imm=imm,
                    result_type=result_type, name=name, loc=Location(line=orec.line, col=orec.col))
        except IRError as exc:
            col = orec.imm.col if orec.imm is not None else orec.col
            self.problem(str(exc), orec.line, col)
            return None
        if op.result is not None:
            if orec.result is None:
                self.problem(f"{orec.opcode} defines a value: write '%name = {orec.opcode} ...'", orec.line,
                             orec.col)
                return None
            self._define(op.result, orec.result, orec.line)
            if d.result in ("op0", "A"):
                pending.append(op)
        elif orec.result is not None:
            self.problem(f"{orec.opcode} defines no value; remove '{orec.result.text} ='", orec.line, orec.col)
        return op

    def _lookup(self, tok: _Tok, line: int) -> Value | None:
        v = self.values.get(tok.text)
        if v is None:
            self.problem(f"undefined value {tok.text}", line, tok.col)
        return v

    def _resolve_uses(self, orec: _OpRec, op: Op) -> None:
        for tok in orec.operands:
            v = self._lookup(tok, orec.line)
            if v is not None:
                op.operands.append(v)
        for btok, arg_toks in orec.successors:
            block = self.blocks.get(btok.text)
            if block is None:
                self.problem(f"undefined block {btok.text}", orec.line, btok.col)
                continue
            args = [self._lookup(a, orec.line) for a in arg_toks]
            op.successors.append(Successor(block, [a for a in args if a is not None]))

    def _resolve_derived_types(self, pending: list[Op]) -> None:
        """Result types that follow an operand's type (offset, select), through chains of them."""
        for op, message in resolve_derived_types(pending):
            loc = op.loc or Location()
            self.problem(message, loc.line or 0, loc.col or 0)
