"""Lowering IR kernels to ONNX graphs, for the kernels that are tensor operations.

An NPU runs operator graphs, so the NPU backend accepts an IR kernel only if it is an
**elementwise map**: one guarded body that reads and writes each array at the thread's own
index. Recognised shape (names are illustrative)::

    ^entry:  %i = add (mul block_id.x, block_dim.x), thread_id.x     (operands in any order)
             %c = icmp slt %i, %n      (or ult; or sgt/ugt %n, %i)    %n: an integer kernel param
             cbr %c, ^body, ^exit
    ^body:   loads   load (offset %x, %i) : T                         %x: a pointer kernel param
             math    pure ops on loaded values, scalar params and constants
             stores  store %v, (offset %y, %i)                        at most one per pointer
             br ^exit
    ^exit:   ret

``offset`` may take ``%i`` or its ``sext``/``zext`` to i64. A global ``atomic_fadd``/``atomic_add``
/``atomic_smin``/``atomic_smax`` on a pointer parameter whose result is unused is a
**reduction**: ``*acc = *acc + sum(v)`` (or min/max) over the N elements (``ReduceSum``/``Min``
/``Max``; float sums in ONNX Runtime's order, which atomics do not fix anyway). Entry and body may also compute
values that do not depend on ``%i`` (from scalar params and constants); they become 0-d tensors
that broadcast. The graph has one 1-D input of length N per loaded pointer, one 0-d input per
scalar param used, and one output per stored pointer; the element count of a launch is
``N = clamp(n, 0, grid.x * block.x)``. A pointer that is both loaded and stored must be loaded
before it is stored (element-wise read-before-write).

Ops lower only where ONNX has the *same* semantics: float arithmetic and math, signed integer
add/sub/mul/min/max, bitwise ops, signed and ordered/unordered comparisons, select, widening
and float conversions. Integer division and shifts (IR defines x/0 and over-wide shifts; ONNX
does not), unsigned comparisons, saturating float→int conversions, other atomics, barriers, shared
and local memory, loops and data-dependent addressing are rejected; :func:`lower_module` then
records *why* for each kernel, and the backend answers UNSUPPORTED with that reason.
Approximations: ``fma`` is a multiply then an add (two roundings), ``exp2``/``log2`` go through
``Pow``/``Log``, ``fmin``/``fmax`` propagate NaN as ONNX ``Min``/``Max`` do.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vxpu.accel.backend import BackendError, KernelInfo, Status
from vxpu.accel.npu_types import OnnxKernel, Plan, Tensor

OPSET = 18
SYMBOL = "n"

_FLOAT_BINARY = {"fadd": "Add", "fsub": "Sub", "fmul": "Mul", "fdiv": "Div", "fmin": "Min", "fmax": "Max",
                 "pow": "Pow"}
_INT_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "smin": "Min", "smax": "Max",
               "and": "BitwiseAnd", "or": "BitwiseOr", "xor": "BitwiseXor"}
_UNARY = {"fneg": "Neg", "fabs": "Abs", "sqrt": "Sqrt", "exp": "Exp", "log": "Log", "sin": "Sin", "cos": "Cos",
          "tanh": "Tanh", "floor": "Floor", "ceil": "Ceil", "neg": "Neg", "abs": "Abs", "not": "BitwiseNot"}
_ICMP = {"eq": ("Equal", False), "ne": ("Equal", True), "slt": ("Less", False), "sle": ("LessOrEqual", False),
         "sgt": ("Greater", False), "sge": ("GreaterOrEqual", False)}
_FCMP = {"oeq": ("Equal", False), "olt": ("Less", False), "ole": ("LessOrEqual", False),
         "ogt": ("Greater", False), "oge": ("GreaterOrEqual", False), "une": ("Equal", True),
         "ult": ("GreaterOrEqual", True), "ule": ("Greater", True), "ugt": ("LessOrEqual", True),
         "uge": ("Less", True)}
# Global atomics whose result is unused become reductions: *acc = combine(*acc, reduce(v[0..N))).
_REDUCE = {"atomic_fadd": ("ReduceSum", "Add"), "atomic_add": ("ReduceSum", "Add"),
           "atomic_smin": ("ReduceMin", "Min"), "atomic_smax": ("ReduceMax", "Max")}
_NP = {"i1": np.bool_, "i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64,
       "f16": np.float16, "f32": np.float32, "f64": np.float64}
_PACK = {"i1": "<B", "i8": "<b", "i16": "<h", "i32": "<i", "i64": "<q", "f16": "<e", "f32": "<f", "f64": "<d"}


class NotElementwise(Exception):
    """The kernel is not an elementwise map; the message says why."""


def param_layout(kernel: Any) -> KernelInfo:
    """The packed argument layout of an IR kernel, exactly as every other backend has it."""
    from vxpu.ir.args import kernel_signature

    return KernelInfo.from_signature(kernel_signature(kernel))


@dataclass
class ElementwiseMap:
    """A recognised elementwise kernel and its ONNX graph (length symbolic: ``n``)."""

    info: KernelInfo
    n_param: Any                                       # the guard's bound (an IR Param)
    n_unsigned: bool = False                           # the guard compares unsigned (ult/ugt)
    inputs: dict[int, str] = field(default_factory=dict)    # pointer param index -> IR type name
    outputs: dict[int, str] = field(default_factory=dict)
    scalars: dict[int, str] = field(default_factory=dict)   # scalar param index -> IR type name
    reductions: dict[int, tuple[str, str]] = field(default_factory=dict)  # param -> (IR type, atomic op)
    needs_shape: bool = False
    model: Any = None

    def plan(self, backend: Any, kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int],
             args: bytes) -> Any:
        """Validate a launch and bind its tensors (see :meth:`NpuBackend._prepare`)."""
        info = self.info

        def arg(index: int, tname: str) -> Any:
            fmt = _PACK.get(tname, "<Q")
            return struct.unpack_from(fmt, args, info.param_offsets[index])[0]

        n = arg(self.n_param.index, self.n_param.type.name)
        if self.n_unsigned and n < 0:
            n += 1 << self.n_param.type.bits
        count = max(0, min(n, grid[0] * block[0]))
        if count == 0:
            return Plan(kernel, None, "", [], [])
        tensors = {}
        for index, tname in list(self.inputs.items()) + list(self.outputs.items()):
            tensors[index] = backend.place(f"p{index}", np.dtype(_NP[tname]), (count,), arg(index, "ptr"))
        for index, (tname, _) in self.reductions.items():
            tensors[index] = backend.place(f"acc{index}", np.dtype(_NP[tname]), (), arg(index, "ptr"))
        session, provider = backend.session(kernel, (count,))
        plan = Plan(kernel, session, provider,
                     [(f"p{i}",) + tensors[i][1:] for i in self.inputs]
                     + [(f"a{i}",) + tensors[i][1:] for i in self.reductions],
                     [(f"o{i}",) + tensors[i][1:] for i in self.outputs]
                     + [(f"r{i}",) + tensors[i][1:] for i in self.reductions])
        for index, tname in self.scalars.items():
            plan.feeds[f"s{index}"] = np.array(arg(index, tname), dtype=_NP[tname])
        if self.needs_shape:
            plan.feeds["__shape"] = np.array([count], dtype=np.int64)
        return plan


class _Lowerer:
    """Classifies every value as index, uniform (0-d) or element (1-D) and emits ONNX nodes."""

    def __init__(self, kernel: Any) -> None:
        from onnx import helper

        self.helper = helper
        self.kernel = kernel
        self.nodes: list[Any] = []
        self.kind: dict[Any, str] = {}      # value -> "index" | "uniform" | "element" | "address"
        self.name: dict[Any, str] = {}      # value -> ONNX tensor name
        self.addr_param: dict[Any, Any] = {}
        self.emap = ElementwiseMap(param_layout(kernel), None)
        self.guard_op: Any = None
        self.used = {v for op in kernel.ops() for v in op.uses()}
        self._n = 0

    def fresh(self) -> str:
        self._n += 1
        return f"t{self._n}"

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.fresh()
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    # -- structure --------------------------------------------------------------------
    def lower(self) -> ElementwiseMap:
        k = self.kernel
        if any(b.params for b in k.blocks):
            raise NotElementwise("has block parameters (loops or merges)")
        if len(k.blocks) != 3:
            raise NotElementwise(f"needs exactly the blocks entry, body, exit (has {len(k.blocks)})")
        if k.shared or k.local:
            raise NotElementwise("uses shared or local memory")
        entry, body, exit_ = k.blocks
        if [op.opcode for op in exit_.ops] != ["ret"]:
            raise NotElementwise("the exit block must only return")
        term = entry.terminator
        if term is None or term.opcode != "cbr" or [s.block for s in term.successors] != [body, exit_]:
            raise NotElementwise("the entry block must end in 'cbr <i < n>, ^body, ^exit'")
        btail = body.terminator
        if btail is None or btail.opcode != "br" or btail.successors[0].block is not exit_:
            raise NotElementwise("the body must end in 'br ^exit'")
        for p in k.params:
            self.kind[p] = "address" if p.type.is_ptr else "uniform"
        self.guard_op = getattr(term.operands[0], "op", None)
        for op in entry.ops[:-1]:
            self.visit(op)
        self.guard(term.operands[0])
        for op in body.ops[:-1]:
            self.visit(op)
        if not self.emap.outputs and not self.emap.reductions:
            raise NotElementwise("stores nothing")
        return self.finish()

    def guard(self, cond: Any) -> None:
        op = getattr(cond, "op", None)
        if op is None or op.opcode != "icmp":
            raise NotElementwise("the branch condition must be 'icmp slt/ult %i, %n'")
        a, b = op.operands
        if op.pred in ("slt", "ult") and self.kind.get(a) == "index":
            bound = b
        elif op.pred in ("sgt", "ugt") and self.kind.get(b) == "index":
            bound = a
        else:
            raise NotElementwise("the branch condition must be 'icmp slt/ult %i, %n'")
        if bound not in self.kernel.params or not bound.type.is_int:
            raise NotElementwise("the bound n of 'i < n' must be an integer kernel parameter")
        self.emap.n_param = bound
        self.emap.n_unsigned = op.pred in ("ult", "ugt")

    # -- ops --------------------------------------------------------------------------
    def visit(self, op: Any) -> None:
        code = op.opcode
        if code in ("block_id", "block_dim", "thread_id", "grid_dim"):
            if op.dim != "x" or code == "grid_dim":
                raise NotElementwise(f"uses {code}.{op.dim}; only the x index i is supported")
            self.kind[op.result] = f"geo:{code}"
        elif code in ("mul", "add") and self._index_step(op):
            return
        elif code in ("sext", "zext") and self.kind.get(op.operands[0]) == "index":
            self.kind[op.result] = "index"
        elif code == "offset":
            self.offset(op)
        elif code == "load":
            self.load(op)
        elif code == "store":
            self.store(op)
        elif code in _REDUCE:
            self.reduce(op)
        elif code == "icmp" and op is self.guard_op:
            self.kind[op.result] = "guard"
        elif op.defn.pure and code not in ("byte_offset", "shared_addr", "local_addr"):
            self.compute(op)
        else:
            raise NotElementwise(f"op {code!r} has no tensor equivalent")

    def _index_step(self, op: Any) -> bool:
        kinds = sorted(self.kind.get(v, "") for v in op.operands)
        if op.opcode == "mul" and kinds == ["geo:block_dim", "geo:block_id"]:
            self.kind[op.result] = "geo:base"
            return True
        if op.opcode == "add" and kinds == ["geo:base", "geo:thread_id"]:
            self.kind[op.result] = "index"
            return True
        return False

    def offset(self, op: Any) -> None:
        ptr, idx = op.operands
        if ptr not in self.kernel.params or self.kind.get(idx) != "index":
            raise NotElementwise("memory must be addressed as 'offset %param, %i' with the thread's index i")
        self.kind[op.result] = "address"
        self.addr_param[op.result] = (ptr, op.type.name)

    def _address(self, p: Any, tname: str) -> int:
        if self.kind.get(p) != "address" or p not in self.addr_param or self.addr_param[p][1] != tname:
            raise NotElementwise("loads and stores must use 'offset %param, %i' of their own element type")
        return int(self.addr_param[p][0].index)

    def load(self, op: Any) -> None:
        index = self._address(op.operands[0], op.type.name)
        if index in self.emap.outputs:
            raise NotElementwise("a pointer is loaded after it is stored")
        if self.emap.inputs.setdefault(index, op.type.name) != op.type.name:
            raise NotElementwise("a pointer is loaded with two element types")
        self.kind[op.result] = "element"
        self.name[op.result] = f"p{index}"

    def store(self, op: Any) -> None:
        value, p = op.operands
        index = self._address(p, value.type.name)
        if index in self.emap.outputs:
            raise NotElementwise("a pointer is stored twice")
        src = self.value(value)
        if self.kind[value] == "uniform":
            self.emap.needs_shape = True
            src = self.node("Expand", [src, "__shape"])
        self.nodes.append(self.helper.make_node("Identity", [src], [f"o{index}"]))
        self.emap.outputs[index] = value.type.name

    def reduce(self, op: Any) -> None:
        ptr, value = op.operands
        if ptr not in self.kernel.params or op.result in self.used:
            raise NotElementwise(f"{op.opcode} must target a pointer parameter and its result must be unused")
        index = int(ptr.index)
        if index in self.emap.reductions or index in self.emap.inputs or index in self.emap.outputs:
            raise NotElementwise("a reduction target is used by another access")
        src = self.value(value)
        if self.kind[value] == "uniform":
            self.emap.needs_shape = True
            src = self.node("Expand", [src, "__shape"])
        reduce_op, combine = _REDUCE[op.opcode]
        total = self.node(reduce_op, [src], keepdims=0)
        self.nodes.append(self.helper.make_node(combine, [f"a{index}", total], [f"r{index}"]))
        self.emap.reductions[index] = (value.type.name, op.opcode)

    def value(self, v: Any) -> str:
        kind = self.kind.get(v)
        if kind not in ("uniform", "element"):
            raise NotElementwise("the thread index or an address is used as a data value")
        if v not in self.name:                      # a scalar kernel parameter
            self.emap.scalars[v.index] = v.type.name
            self.name[v] = f"s{v.index}"
        return self.name[v]

    def compute(self, op: Any) -> None:
        code, t = op.opcode, op.result.type
        if code == "const":
            out = self.node("Constant", [], value=self.helper.make_tensor(
                self.fresh(), _onnx_type(t.name), [], [op.imm]))
            self.kind[op.result], self.name[op.result] = "uniform", out
            return
        ins = [self.value(v) for v in op.operands]
        self.kind[op.result] = "element" if any(self.kind[v] == "element" for v in op.operands) else "uniform"
        self.name[op.result] = self.emit(op, ins)

    def emit(self, op: Any, ins: list[str]) -> str:
        code = op.opcode
        if code in _FLOAT_BINARY:
            return self.node(_FLOAT_BINARY[code], ins)
        if code in _INT_BINARY and op.result.type.name != "i1":
            return self.node(_INT_BINARY[code], ins)
        if code in _UNARY:
            return self.node(_UNARY[code], ins)
        if code == "rsqrt":
            return self.node("Reciprocal", [self.node("Sqrt", ins)])
        if code == "fma":
            return self.node("Add", [self.node("Mul", ins[:2]), ins[2]])
        if code == "frem":
            return self.node("Mod", ins, fmod=1)
        if code in ("exp2", "log2"):
            two = self.node("Constant", [], value=self.helper.make_tensor(
                self.fresh(), _onnx_type(op.result.type.name), [], [2.0]))
            if code == "exp2":
                return self.node("Pow", [two, ins[0]])
            return self.node("Div", [self.node("Log", ins), self.node("Log", [two])])
        if code in ("icmp", "fcmp"):
            table = _ICMP if code == "icmp" else _FCMP
            if op.pred not in table:
                raise NotElementwise(f"{code} {op.pred} has no exact ONNX comparison")
            onnx_op, negate = table[op.pred]
            out = self.node(onnx_op, ins)
            return self.node("Not", [out]) if negate else out
        if code == "select":
            return self.node("Where", ins)
        if code in ("sitofp", "fpext", "fptrunc", "sext") or (code == "zext" and op.operands[0].type.name == "i1"):
            return self.node("Cast", ins, to=_onnx_type(op.result.type.name))
        raise NotElementwise(f"op {code!r} has no ONNX equivalent with the IR's exact semantics")

    # -- graph ------------------------------------------------------------------------
    def finish(self) -> ElementwiseMap:
        from onnx import TensorProto, helper

        e = self.emap
        graph_in = [helper.make_tensor_value_info(f"p{i}", _onnx_type(t), [SYMBOL]) for i, t in e.inputs.items()]
        graph_in += [helper.make_tensor_value_info(f"s{i}", _onnx_type(t), []) for i, t in e.scalars.items()]
        if e.needs_shape:
            graph_in.append(helper.make_tensor_value_info("__shape", TensorProto.INT64, [1]))
        graph_out = [helper.make_tensor_value_info(f"o{i}", _onnx_type(t), [SYMBOL]) for i, t in e.outputs.items()]
        graph_in += [helper.make_tensor_value_info(f"a{i}", _onnx_type(t), []) for i, (t, _) in e.reductions.items()]
        graph_out += [helper.make_tensor_value_info(f"r{i}", _onnx_type(t), []) for i, (t, _) in e.reductions.items()]
        graph = helper.make_graph(self.nodes, self.kernel.name, graph_in, graph_out)
        e.model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        e.model.ir_version = 8
        return e


def _onnx_type(tname: str) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(_NP[tname])))


def lower_module(image: bytes, backend: Any) -> dict[str, Any]:
    """Decode and verify an IR module and lower each kernel that is an elementwise map.

    Returns ``{kernel name: OnnxKernel or the reason it does not lower}``.

    Raises:
        BackendError: BAD_MODULE for IR that does not decode or verify; UNSUPPORTED when no
            kernel of the module lowers (the message gives each kernel's reason).
    """
    from vxpu.accel.compile_status import compile_error
    from vxpu.ir import binary
    from vxpu.ir.errors import IRError

    try:
        module = binary.decode(image, verify=True)
    except IRError as exc:
        raise compile_error(exc, "npu") from exc
    out: dict[str, Any] = {}
    for k in module.kernels:
        try:
            e = _Lowerer(k).lower()
        except NotElementwise as why:
            out[k.name] = f"not an elementwise map y[i] = f(x[i], ...) guarded by i < n: {why}"
            continue
        ins = [Tensor(f"p{i}", np.dtype(_NP[t]), (SYMBOL,)) for i, t in e.inputs.items()]
        ins += [Tensor(f"a{i}", np.dtype(_NP[t]), ()) for i, (t, _) in e.reductions.items()]
        outs = [Tensor(f"o{i}", np.dtype(_NP[t]), (SYMBOL,)) for i, t in e.outputs.items()]
        outs += [Tensor(f"r{i}", np.dtype(_NP[t]), ()) for i, (t, _) in e.reductions.items()]
        kernel = OnnxKernel(e.info, e.model, ins, outs, (SYMBOL,), lowered=e)
        if not backend.static_shapes():
            backend.session(kernel, ())
        out[k.name] = kernel
    if not any(isinstance(v, OnnxKernel) for v in out.values()):
        reasons = "; ".join(f"{name}: {why}" for name, why in out.items()) or "the module has no kernels"
        raise BackendError(Status.UNSUPPORTED, f"no kernel of this module runs on an NPU ({reasons})")
    return out
