"""A pleasant API for building kernels in Python.

Example::

    from vxpu.ir.builder import KernelBuilder
    from vxpu.ir.model import Module
    from vxpu.ir.types import f32, i32, ptr_global

    b = KernelBuilder("saxpy", params=[("n", i32), ("a", f32), ("x", ptr_global), ("y", ptr_global)])
    n, a, x, y = b.params
    entry, body, done = b.block("entry"), b.block("body"), b.block("exit")
    b.set_block(entry)
    i = b.add(b.mul(b.block_id("x"), b.block_dim("x")), b.thread_id("x"), name="i")
    b.cbr(b.icmp("slt", i, n), body, done)
    b.set_block(body)
    px, py = b.offset(x, i, f32), b.offset(y, i, f32)
    b.store(b.fadd(b.fmul(a, b.load(px, f32)), b.load(py, f32)), py)
    b.br(done)
    b.set_block(done)
    b.ret()
    module = Module("saxpy", [b.finish()])

Every method checks operand types against the opcode table at once and raises
:class:`~vxpu.ir.errors.IRError` naming the problem, so mistakes surface where they are made.
Python ints and floats are accepted wherever an operand's type is clear from the other
operands (``b.add(i, 1)``) and become ``const`` ops. :meth:`KernelBuilder.finish` runs the
verifier.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import IRError
from .model import Block, Kernel, LocalArray, Op, Param, SharedArray, Successor, Value
from .ops import OPS, check_types
from .types import Type, i1, i32

__all__ = ["KernelBuilder", "Operand"]

#: What builder methods accept as an operand: a value, or a Python number that becomes a const.
Operand = Value | int | float


class KernelBuilder:
    """Builds one :class:`~vxpu.ir.model.Kernel`, appending ops to the current block.

    Args:
        name: the kernel name (a C identifier).
        params: ``(name, type)`` pairs for the kernel parameters.
    """

    def __init__(self, name: str, params: Sequence[tuple[str, Type]] = ()) -> None:
        self.kernel = Kernel(name, params)
        self._block: Block | None = None

    # --- structure ---------------------------------------------------------------------------
    @property
    def params(self) -> list[Param]:
        """The kernel parameters, in order."""
        return self.kernel.params

    def param(self, name: str) -> Param:
        """The kernel parameter called ``name``.

        Raises:
            IRError: no such parameter.
        """
        return self.kernel.param(name)

    def block(self, name: str | None = None, params: Sequence[tuple[str | None, Type]] = ()) -> Block:
        """Create and append a new block (the first one is the entry block)."""
        return self.kernel.add_block(Block(name, params))

    def set_block(self, block: Block) -> None:
        """Make ``block`` the block that new ops are appended to."""
        if block.kernel is not self.kernel:
            raise IRError(f"block ^{block.name} belongs to another kernel")
        self._block = block

    @property
    def current_block(self) -> Block:
        """The block ops are appended to.

        Raises:
            IRError: no block was set.
        """
        if self._block is None:
            raise IRError("no current block: call set_block(b.block('entry')) first")
        return self._block

    def shared_array(self, name: str, type: Type, count: int) -> SharedArray:
        """Declare a shared (per-block) array of ``count`` elements of ``type``."""
        arr = SharedArray(name, type, count)
        self.kernel.shared.append(arr)
        return arr

    def local_array(self, name: str, type: Type, count: int) -> LocalArray:
        """Declare a local (per-thread) array of ``count`` elements of ``type``."""
        arr = LocalArray(name, type, count)
        self.kernel.local.append(arr)
        return arr

    def finish(self, verify: bool = True) -> Kernel:
        """The finished kernel; with ``verify``, checked by the verifier first.

        Raises:
            VerifyError: the kernel breaks an IR rule (every problem is listed).
        """
        if verify:
            from .verify import verify_kernel

            verify_kernel(self.kernel)
        return self.kernel

    # --- generic emission ----------------------------------------------------------------------
    def emit(self, opcode: str, operands: Sequence[Operand] = (), *, type: Type | None = None,
             name: str | None = None, **attrs: object) -> Op:
        """Append any op; type-checked against the table. Returns the op.

        Raises:
            IRError: unknown op, no current block, or wrong operand types.
        """
        d = OPS.get(opcode)
        if d is None:
            raise IRError(f"unknown op {opcode!r}")
        values = self._coerce_all(list(operands), type, d.operands)
        problems = check_types(d, type, [v.type for v in values])
        if problems:
            raise IRError(f"{opcode}: " + "; ".join(problems))
        op = Op(opcode, values, type=type, name=name, **attrs)  # type: ignore[arg-type]
        return self.current_block.append(op)

    def _value(self, opcode: str, operands: Sequence[Operand], type: Type | None = None,
               name: str | None = None, **attrs: object) -> Value:
        result = self.emit(opcode, operands, type=type, name=name, **attrs).result
        assert result is not None
        return result

    def _coerce_all(self, operands: list[Operand], annotated: Type | None, rules: Sequence[str]) -> list[Value]:
        like = annotated
        if like is None:
            like = next((v.type for v, r in zip(operands, rules) if isinstance(v, Value) and r == "A"), None)
        out = []
        for v, rule in zip(operands, rules):
            if isinstance(v, Value):
                out.append(v)
                continue
            target = {"T": annotated, "A": like, "i1": i1, "idx": i32}.get(rule)
            if target is None:
                raise IRError(f"cannot infer a type for the constant {v!r}; build it with const()")
            out.append(self.const(v, target))
        if len(operands) != len(out):
            raise IRError(f"expected {len(rules)} operands, got {len(operands)}")
        return out

    @staticmethod
    def _type_of(*operands: Operand) -> Type:
        for v in operands:
            if isinstance(v, Value):
                return v.type
        raise IRError("at least one operand must be an IR value (constants need a type: use const())")

    def _binary(self, opcode: str, a: Operand, b: Operand, name: str | None) -> Value:
        return self._value(opcode, (a, b), self._type_of(a, b), name)

    def _unary(self, opcode: str, a: Value, name: str | None) -> Value:
        return self._value(opcode, (a,), a.type, name)

    # --- constants and geometry ----------------------------------------------------------------
    def const(self, value: float, type: Type, name: str | None = None) -> Value:
        """A constant of ``type``."""
        return self._value("const", (), type, name, imm=value)

    def thread_id(self, dim: str = "x", name: str | None = None) -> Value:
        """Thread index in the block along ``dim`` (i32)."""
        return self._value("thread_id", (), None, name, dim=dim)

    def block_id(self, dim: str = "x", name: str | None = None) -> Value:
        """Block index in the grid along ``dim`` (i32)."""
        return self._value("block_id", (), None, name, dim=dim)

    def block_dim(self, dim: str = "x", name: str | None = None) -> Value:
        """Threads per block along ``dim`` (i32)."""
        return self._value("block_dim", (), None, name, dim=dim)

    def grid_dim(self, dim: str = "x", name: str | None = None) -> Value:
        """Blocks per grid along ``dim`` (i32)."""
        return self._value("grid_dim", (), None, name, dim=dim)

    # --- integer arithmetic ----------------------------------------------------------------------
    def add(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("add", a, b, name)

    def sub(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("sub", a, b, name)

    def mul(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("mul", a, b, name)

    def sdiv(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("sdiv", a, b, name)

    def udiv(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("udiv", a, b, name)

    def srem(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("srem", a, b, name)

    def urem(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("urem", a, b, name)

    def and_(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("and", a, b, name)

    def or_(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("or", a, b, name)

    def xor(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("xor", a, b, name)

    def shl(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("shl", a, b, name)

    def lshr(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("lshr", a, b, name)

    def ashr(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("ashr", a, b, name)

    def smin(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("smin", a, b, name)

    def smax(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("smax", a, b, name)

    def umin(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("umin", a, b, name)

    def umax(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("umax", a, b, name)

    def neg(self, a: Value, name: str | None = None) -> Value:
        return self._unary("neg", a, name)

    def not_(self, a: Value, name: str | None = None) -> Value:
        return self._unary("not", a, name)

    def abs(self, a: Value, name: str | None = None) -> Value:
        return self._unary("abs", a, name)

    # --- float arithmetic --------------------------------------------------------------------------
    def fadd(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("fadd", a, b, name)

    def fsub(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("fsub", a, b, name)

    def fmul(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("fmul", a, b, name)

    def fdiv(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("fdiv", a, b, name)

    def frem(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("frem", a, b, name)

    def fmin(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("fmin", a, b, name)

    def fmax(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("fmax", a, b, name)

    def pow(self, a: Operand, b: Operand, name: str | None = None) -> Value:
        return self._binary("pow", a, b, name)

    def fma(self, a: Operand, b: Operand, c: Operand, name: str | None = None) -> Value:
        """a * b + c with one rounding."""
        return self._value("fma", (a, b, c), self._type_of(a, b, c), name)

    def unary(self, opcode: str, a: Value, name: str | None = None) -> Value:
        """Any one-operand math op by name: fneg fabs sqrt rsqrt exp exp2 log log2 sin cos tanh floor ceil
        rint."""
        return self._unary(opcode, a, name)

    def fneg(self, a: Value, name: str | None = None) -> Value:
        return self._unary("fneg", a, name)

    def fabs(self, a: Value, name: str | None = None) -> Value:
        return self._unary("fabs", a, name)

    def sqrt(self, a: Value, name: str | None = None) -> Value:
        return self._unary("sqrt", a, name)

    def rsqrt(self, a: Value, name: str | None = None) -> Value:
        return self._unary("rsqrt", a, name)

    def exp(self, a: Value, name: str | None = None) -> Value:
        return self._unary("exp", a, name)

    def exp2(self, a: Value, name: str | None = None) -> Value:
        return self._unary("exp2", a, name)

    def log(self, a: Value, name: str | None = None) -> Value:
        return self._unary("log", a, name)

    def log2(self, a: Value, name: str | None = None) -> Value:
        return self._unary("log2", a, name)

    def sin(self, a: Value, name: str | None = None) -> Value:
        return self._unary("sin", a, name)

    def cos(self, a: Value, name: str | None = None) -> Value:
        return self._unary("cos", a, name)

    def tanh(self, a: Value, name: str | None = None) -> Value:
        return self._unary("tanh", a, name)

    def floor(self, a: Value, name: str | None = None) -> Value:
        return self._unary("floor", a, name)

    def ceil(self, a: Value, name: str | None = None) -> Value:
        return self._unary("ceil", a, name)

    def rint(self, a: Value, name: str | None = None) -> Value:
        """Round to the nearest integer, halfway cases to even (the result is a float)."""
        return self._unary("rint", a, name)

    # --- comparisons, select, conversions -----------------------------------------------------
    def icmp(self, pred: str, a: Operand, b: Operand, name: str | None = None) -> Value:
        """Integer comparison (eq ne slt sle sgt sge ult ule ugt uge) → i1."""
        self._check_pred("icmp", pred)
        return self._value("icmp", (a, b), None, name, pred=pred)

    def fcmp(self, pred: str, a: Operand, b: Operand, name: str | None = None) -> Value:
        """Float comparison (oeq one olt ole ogt oge ord ueq une ult ule ugt uge uno) → i1."""
        self._check_pred("fcmp", pred)
        return self._value("fcmp", (a, b), None, name, pred=pred)

    @staticmethod
    def _check_pred(opcode: str, pred: str) -> None:
        allowed = OPS[opcode].predicates
        if pred not in allowed:
            raise IRError(f"{opcode} predicate must be one of {' '.join(allowed)}, not {pred!r}")

    def select(self, cond: Operand, a: Operand, b: Operand, name: str | None = None) -> Value:
        """cond ? a : b."""
        return self._value("select", (cond, a, b), None, name)

    def convert(self, opcode: str, a: Value, to: Type, name: str | None = None) -> Value:
        """Any conversion by name: trunc zext sext fptrunc fpext fptosi fptoui sitofp uitofp bitcast."""
        if OPS.get(opcode) is None or OPS[opcode].conv is None:
            raise IRError(f"{opcode!r} is not a conversion")
        return self._value(opcode, (a,), to, name)

    def trunc(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("trunc", a, to, name)

    def zext(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("zext", a, to, name)

    def sext(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("sext", a, to, name)

    def fptrunc(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("fptrunc", a, to, name)

    def fpext(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("fpext", a, to, name)

    def fptosi(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("fptosi", a, to, name)

    def fptoui(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("fptoui", a, to, name)

    def sitofp(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("sitofp", a, to, name)

    def uitofp(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("uitofp", a, to, name)

    def bitcast(self, a: Value, to: Type, name: str | None = None) -> Value:
        return self.convert("bitcast", a, to, name)

    # --- pointers and memory -------------------------------------------------------------------
    def offset(self, p: Value, index: Operand, elem: Type, name: str | None = None) -> Value:
        """p + sext(index) * sizeof(elem), in p's address space."""
        return self._value("offset", (p, index), elem, name)

    def byte_offset(self, p: Value, index: Operand, name: str | None = None) -> Value:
        """p + sext(index) bytes, in p's address space."""
        return self._value("byte_offset", (p, index), None, name)

    def shared_addr(self, array: SharedArray, name: str | None = None) -> Value:
        """Pointer (ptr<shared>) to the first element of a shared array."""
        return self._value("shared_addr", (), None, name, array=array)

    def local_addr(self, array: LocalArray, name: str | None = None) -> Value:
        """Pointer (ptr<local>) to the first element of a local array."""
        return self._value("local_addr", (), None, name, array=array)

    def load(self, p: Value, type: Type, name: str | None = None) -> Value:
        """Read a ``type`` at ``p``."""
        return self._value("load", (p,), type, name)

    def store(self, value: Value, p: Value) -> Op:
        """Write ``value`` at ``p``."""
        return self.emit("store", (value, p))

    def atomic(self, opcode: str, p: Value, value: Operand, name: str | None = None) -> Value:
        """Any read-modify-write atomic by name (atomic_add, atomic_fadd, atomic_smin, ...); returns the old value."""
        if not opcode.startswith("atomic_") or opcode == "atomic_cas" or opcode not in OPS:
            raise IRError(f"{opcode!r} is not a read-modify-write atomic")
        return self._value(opcode, (p, value), self._type_of(value), name)

    def atomic_add(self, p: Value, value: Operand, name: str | None = None) -> Value:
        return self.atomic("atomic_add", p, value, name)

    def atomic_fadd(self, p: Value, value: Operand, name: str | None = None) -> Value:
        return self.atomic("atomic_fadd", p, value, name)

    def atomic_xchg(self, p: Value, value: Operand, name: str | None = None) -> Value:
        return self.atomic("atomic_xchg", p, value, name)

    def atomic_cas(self, p: Value, cmp: Operand, new: Operand, name: str | None = None) -> Value:
        """If *p == cmp, store new; returns the old value."""
        return self._value("atomic_cas", (p, cmp, new), self._type_of(cmp, new), name)

    def barrier(self) -> Op:
        """Block-wide barrier (and fence for shared and global memory)."""
        return self.emit("barrier")

    # --- terminators ---------------------------------------------------------------------------
    def br(self, target: Block, *args: Operand) -> Op:
        """Jump to ``target`` passing ``args`` to its block parameters.

        Raises:
            IRError: the arguments do not match the target's parameters.
        """
        return self.emit("br", successors=[self._successor(target, args)])

    def cbr(self, cond: Value, if_true: Block, if_false: Block, true_args: Sequence[Operand] = (),
            false_args: Sequence[Operand] = ()) -> Op:
        """Jump to ``if_true`` when ``cond`` (i1) is 1, else to ``if_false``.

        Raises:
            IRError: the arguments do not match the targets' parameters.
        """
        return self.emit("cbr", (cond,), successors=[self._successor(if_true, true_args),
                                                     self._successor(if_false, false_args)])

    def _successor(self, target: Block, args: Sequence[Operand]) -> Successor:
        if target.kernel is not self.kernel:
            raise IRError(f"branch target ^{target.name} belongs to another kernel")
        if len(args) != len(target.params):
            raise IRError(f"^{target.name} takes {len(target.params)} argument(s), got {len(args)}")
        values: list[Value] = []
        for i, (arg, param) in enumerate(zip(args, target.params)):
            v = arg if isinstance(arg, Value) else self.const(arg, param.type)
            if v.type is not param.type:
                raise IRError(f"argument {i} to ^{target.name} has type {v.type}, expected {param.type}")
            values.append(v)
        return Successor(target, values)

    def ret(self) -> Op:
        """End this thread."""
        return self.emit("ret")

    def trap(self) -> Op:
        """Abort the launch with a kernel fault."""
        return self.emit("trap")
