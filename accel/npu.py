"""The NPU backend: ONNX graphs on ONNX Runtime, on the best execution provider present.

NPUs run operator graphs, not SIMT threads (ARCHITECTURE.md, decision 6). Memory, queues,
events and fault recovery are the host arena of :class:`vxpu.accel.hostbase.HostBackend`;
ONNX Runtime reads inputs from and writes outputs to the arena through I/O binding (zero copy).

**Provider choice** (option ``provider=``):

* ``auto`` (default): an NPU if there is one — a plugin EP device of hardware type NPU
  (plugin libraries such as ``onnxruntime-qnn`` are registered at open), else the first
  built-in EP of :data:`PROVIDER_PRIORITY` that this ONNX Runtime build offers — and the CPU EP
  otherwise.
* ``qnn``: the QNN plugin EP with its HTP backend (``onnxruntime-qnn``; on x86 Linux this is
  Qualcomm's HTP simulator, which is how CI exercises the QNN path without Snapdragon hardware).
* ``cpu``: the CPU EP only.

Every session is created inside ``try``: the NPU attempt disables ONNX Runtime's silent CPU
fallback (so "ran on the NPU" means the *whole* graph did), and any failure retries on the CPU
EP. What actually ran (``InferenceSession.get_providers()[0]``) is recorded per kernel
(:attr:`NpuBackend.provider_runs`). ``PREFER_NPU`` selection policies are not used: with the
QNN plugin registered they fail instead of falling back.

**What a "kernel" is.**

* *ONNX modules* (:attr:`ModuleKind.ONNX`, a native opt-in): the module's graph is its only
  kernel, named after the graph (``"main"`` works too). The argument buffer holds one
  little-endian ``u64`` device address per graph input, then one per graph output (in the
  model's declared order), then one ``u64`` value per *symbolic* dimension (``dim_param``), in
  order of first appearance over the inputs then the outputs. Every dimension must be fixed or
  named; output shapes must follow from the inputs'. Launch with ``grid = block = (1, 1, 1)``.
  Each tensor must lie inside the arena and be aligned to its element size (else OUT_OF_RANGE /
  INVALID_ARGUMENT at launch). Outputs that overlap an input are computed into a temporary
  and then copied, so in-place graphs work.
* *IR modules*: only kernels that are elementwise maps ``y[i] = f(x[i], scalars ...)`` guarded
  by ``i < n`` with ``i = block_id.x * block_dim.x + thread_id.x``, optionally with atomic
  sum/min/max reductions into a pointer parameter (see
  :mod:`vxpu.accel.npu_graph`). They take the IR argument layout and any grid/block; the
  element count is ``min(n, grid.x * block.x)``. Anything else is UNSUPPORTED with the reason.

Models must carry all their data inline: tensors with external data (files ONNX Runtime would
read from the *server's* disk) are BAD_MODULE. A graph that fails while running (a runtime shape
error, say) is a KERNEL_FAULT with the usual context reset.

NPU providers want static shapes, so sessions are built per concrete shape (symbolic
dimensions fixed to the launch's values) and cached (:data:`SESSIONS_PER_KERNEL`); with
``provider=cpu`` one dynamic-shape session serves all shapes.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from typing import Any

import numpy as np
from vxpu.accel.backend import BackendError, DeviceProperties, KernelInfo, ModuleKind, Status
from vxpu.accel.hostbase import ARENA_GUARD, DEFAULT_ARENA_BYTES, HostBackend
from vxpu.accel.npu_types import OnnxKernel, Plan, Tensor

log = logging.getLogger(__name__)

#: Built-in NPU execution providers, best first.
PROVIDER_PRIORITY = (
    "QNNExecutionProvider", "CANNExecutionProvider", "CoreMLExecutionProvider", "VitisAIExecutionProvider",
    "OpenVINOExecutionProvider", "RknpuExecutionProvider", "VSINPUExecutionProvider", "NnapiExecutionProvider",
)
CPU_PROVIDER = "CPUExecutionProvider"
#: Options a built-in EP needs to reach the NPU (the QNN EP defaults to its CPU backend).
BUILTIN_OPTIONS: dict[str, dict[str, str]] = {"QNNExecutionProvider": {"backend_path": "libQnnHtp.so"}}
PROVIDER_CHOICES = ("auto", "qnn", "cpu")
SESSIONS_PER_KERNEL = 8
MAX_DIM = (1 << 31) - 1
MAX_ONNX_IO = 256

# ONNX TensorProto element type -> numpy dtype.
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}

_plugin_lock = threading.Lock()
_registered_plugins: set[str] = set()


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError(Status.UNAVAILABLE, f"onnxruntime is not installed ({exc}); pip install 'vxpu[npu]'") from exc
    return ort


def register_plugins(ort: Any) -> dict[str, dict[str, str]]:
    """Register the plugin EP libraries that are installed (once per process).

    Returns ``{ep_name: provider options}`` for each registered plugin.
    """
    plugins: dict[str, dict[str, str]] = {}
    try:
        import onnxruntime_qnn
    except ImportError:
        return plugins
    with _plugin_lock:
        if "qnn" not in _registered_plugins:
            try:
                ort.register_execution_provider_library("qnn", onnxruntime_qnn.get_library_path())
            except Exception as exc:  # noqa: BLE001 - already registered, or a broken install
                if "already registered" not in str(exc):
                    log.warning("QNN plugin EP could not be registered: %s", exc)
                    return plugins
            _registered_plugins.add("qnn")
    plugins["qnn"] = {"backend_path": onnxruntime_qnn.get_qnn_htp_path()}
    return plugins


class NpuBackend(HostBackend):
    """ONNX Runtime on an NPU execution provider, with an explicit CPU fallback.

    Args:
        index: device index (only 0).
        arena: arena size (bytes or a size string such as ``"512M"``).
        provider: ``auto``, ``qnn`` or ``cpu`` (see the module docstring).
    """

    name = "npu"

    def __init__(self, index: int = 0, *, arena: int | str = DEFAULT_ARENA_BYTES, provider: str = "auto") -> None:
        super().__init__(index, arena=arena)
        if provider not in PROVIDER_CHOICES:
            raise BackendError(Status.INVALID_ARGUMENT, f"provider={provider!r}; use one of {PROVIDER_CHOICES}")
        self.provider_choice = provider
        self.provider_runs: collections.Counter[str] = collections.Counter()
        self._ort: Any = None
        self._npu_devices: list[Any] = []
        self._npu_options: dict[str, str] = {}
        self._builtin: list[str] = []

    # -- set-up -----------------------------------------------------------------------
    def _open_hook(self) -> None:
        ort = self._ort = _import_ort()
        try:
            import onnx  # noqa: F401  (needed to parse and build graphs)
        except ImportError as exc:
            raise BackendError(Status.UNAVAILABLE, f"onnx is not installed ({exc}); pip install 'vxpu[npu]'") from exc
        if self.provider_choice == "cpu":
            return
        plugins = register_plugins(ort)
        devices = list(ort.get_ep_devices())
        if self.provider_choice == "qnn":
            self._npu_devices = [d for d in devices if d.ep_name == "qnn"][:1]
            if not self._npu_devices:
                raise BackendError(Status.UNAVAILABLE, "provider=qnn needs the QNN plugin EP: pip install onnxruntime-qnn")
            self._npu_options = plugins.get("qnn", {})
            return
        npu_type = ort.OrtHardwareDeviceType.NPU
        npus = [d for d in devices if d.device.type == npu_type]
        if npus:
            self._npu_devices = npus[:1]
            self._npu_options = plugins.get(npus[0].ep_name, {})
        available = set(ort.get_available_providers())
        self._builtin = [p for p in PROVIDER_PRIORITY if p in available]

    @property
    def target(self) -> str:
        """The provider this backend tries first (what :meth:`properties` reports)."""
        if self._npu_devices:
            return str(self._npu_devices[0].ep_name)
        return self._builtin[0] if self._builtin else CPU_PROVIDER

    def properties(self) -> DeviceProperties:
        vendor = str(self._npu_devices[0].ep_vendor).lower() if self._npu_devices else "host"
        return DeviceProperties(
            backend="npu", name=f"ONNX Runtime {getattr(self._ort, '__version__', '?')} ({self.target})",
            vendor=vendor, architecture=self.target, memory_total=self.arena_size, compute_units=1,
            max_threads_per_block=1024, max_shared_memory_per_block=0,
            features=frozenset({"onnx", "ir-elementwise"}),
        )

    def extra_stats(self) -> dict[str, float]:
        """Launches per execution provider that actually ran them (``vxpu_npu_runs_<provider>``)."""
        return {f"vxpu_npu_runs_{name.lower()}": count for name, count in list(self.provider_runs.items())}

    def create_session(self, blob: bytes) -> tuple[Any, str]:
        """An InferenceSession for ``blob`` on the preferred provider, else on the CPU EP.

        Returns ``(session, provider that runs it)``.

        Raises:
            BackendError: BAD_MODULE when even the CPU EP rejects the model.
        """
        ort = self._ort
        if self._npu_devices or self._builtin:
            try:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
                if self._npu_devices:
                    so.add_provider_for_devices(self._npu_devices, self._npu_options)
                    sess = ort.InferenceSession(blob, so)
                else:
                    providers = [(p, BUILTIN_OPTIONS.get(p, {})) for p in self._builtin] + [CPU_PROVIDER]
                    sess = ort.InferenceSession(blob, so, providers=providers)
                return sess, str(sess.get_providers()[0])
            except Exception as exc:  # noqa: BLE001 - the NPU rejected the graph: fall back explicitly
                log.info("%s cannot run this graph (%s); using the CPU EP", self.target, str(exc).splitlines()[0])
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(blob, so, providers=[CPU_PROVIDER])
        except Exception as exc:
            raise BackendError(Status.BAD_MODULE, f"ONNX Runtime rejected the model: {exc}", log=str(exc)) from exc
        return sess, CPU_PROVIDER

    # -- modules ----------------------------------------------------------------------
    def _load(self, image: bytes, kind: ModuleKind) -> Any:
        if kind is ModuleKind.ONNX:
            kernel = self._onnx_kernel(image)
            return {kernel.info.name: kernel, "main": kernel}
        if kind is ModuleKind.IR:
            from vxpu.accel import npu_graph

            return npu_graph.lower_module(image, self)
        raise BackendError(Status.UNSUPPORTED, f"the NPU backend runs ONNX and elementwise IR, not {kind.value}")

    def _onnx_kernel(self, image: bytes) -> OnnxKernel:
        import onnx

        try:
            model = onnx.load_model_from_string(image)
        except Exception as exc:
            raise BackendError(Status.BAD_MODULE, f"not an ONNX model: {exc}", log=str(exc)) from exc
        _reject_external_data(model)
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise BackendError(Status.BAD_MODULE, f"not a valid ONNX model: {exc}", log=str(exc)) from exc
        graph = model.graph
        init_names = {t.name for t in graph.initializer}
        inputs = [self._tensor(v) for v in graph.input if v.name not in init_names]
        outputs = [self._tensor(v) for v in graph.output]
        if not outputs or len(inputs) + len(outputs) > MAX_ONNX_IO:
            raise BackendError(Status.UNSUPPORTED, f"graph needs 1..{MAX_ONNX_IO} inputs and outputs")
        symbols: list[str] = []
        for t in inputs + outputs:
            symbols += [d for d in t.dims if isinstance(d, str) and d not in symbols]
        in_symbols = {d for t in inputs for d in t.dims if isinstance(d, str)}
        for t in outputs:
            loose = [d for d in t.dims if isinstance(d, str) and d not in in_symbols]
            if loose:
                raise BackendError(Status.UNSUPPORTED, f"output {t.name!r} has data-dependent dimension(s) "
                                   f"{loose}; outputs must be sized by the inputs' dimensions")
        count = len(inputs) + len(outputs) + len(symbols)
        name = graph.name if graph.name and graph.name != "main" else "graph"
        info = KernelInfo(name, (8,) * count, tuple(range(0, 8 * count, 8)), 8 * count, 0)
        kernel = OnnxKernel(info, model, inputs, outputs, tuple(symbols))
        if symbols and self.static_shapes():   # sessions come per shape; validate the graph now
            self._validate_on_cpu(image)
        else:
            self.session(kernel, ())
        return kernel

    def _validate_on_cpu(self, blob: bytes) -> None:
        try:
            so = self._ort.SessionOptions()
            so.log_severity_level = 3
            self._ort.InferenceSession(blob, so, providers=[CPU_PROVIDER])
        except Exception as exc:
            raise BackendError(Status.BAD_MODULE, f"ONNX Runtime rejected the model: {exc}", log=str(exc)) from exc

    @staticmethod
    def _tensor(value: Any) -> Tensor:
        ttype = value.type.tensor_type if value.type.HasField("tensor_type") else None
        if ttype is None or ttype.elem_type not in _ONNX_DTYPES:
            raise BackendError(Status.UNSUPPORTED, f"graph I/O {value.name!r} is not a tensor of a supported type")
        if not ttype.HasField("shape"):
            raise BackendError(Status.UNSUPPORTED, f"graph I/O {value.name!r} has no declared shape")
        dims: list[int | str] = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value") and 0 <= d.dim_value <= MAX_DIM:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(str(d.dim_param))
            else:
                raise BackendError(Status.UNSUPPORTED, f"graph I/O {value.name!r} has an unnamed dynamic dimension")
        return Tensor(value.name, np.dtype(_ONNX_DTYPES[ttype.elem_type]), tuple(dims))

    def static_shapes(self) -> bool:
        """True when sessions are built per concrete shape (an NPU provider wants static shapes)."""
        return bool(self._npu_devices or self._builtin)

    def session(self, kernel: OnnxKernel, values: tuple[int, ...]) -> tuple[Any, str]:
        """The cached session for concrete symbol ``values`` (one for all when shapes may vary)."""
        key = values if kernel.symbols and self.static_shapes() else ()
        with kernel.lock:
            hit = kernel.sessions.get(key)
            if hit is not None:
                kernel.sessions.move_to_end(key)
                self.stats.compile_cache_hits += 1
                return hit
        model = kernel.model if not key else _fix_dims(kernel.model, dict(zip(kernel.symbols, key)))
        built = self.create_session(model.SerializeToString())
        self.stats.compile_cache_misses += 1
        with kernel.lock:
            kernel.sessions[key] = built
            while len(kernel.sessions) > SESSIONS_PER_KERNEL:
                kernel.sessions.popitem(last=False)
        return built

    def _kernel(self, payload: Any, name: str) -> tuple[Any, KernelInfo]:
        kernel = payload.get(name)
        if kernel is None:
            known = ", ".join(sorted(k for k in payload if k != "main")) or "none"
            raise BackendError(Status.NOT_FOUND, f"no kernel {name!r} in the module (it has {known})")
        if isinstance(kernel, str):       # an IR kernel that does not lower: the reason
            raise BackendError(Status.UNSUPPORTED, f"kernel {name!r} cannot run on an NPU: {kernel}")
        return kernel, kernel.info

    # -- launches ---------------------------------------------------------------------
    def _prepare(self, kernel: OnnxKernel, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: bytes, shared_bytes: int, bounds: tuple[tuple[int, int], ...] | None = None) -> Plan:
        if shared_bytes:
            raise BackendError(Status.INVALID_ARGUMENT, "NPU kernels have no shared memory")
        if kernel.lowered is not None:
            return kernel.lowered.plan(self, kernel, grid, block, args)
        if grid != (1, 1, 1) or block != (1, 1, 1):
            raise BackendError(Status.INVALID_ARGUMENT, "launch ONNX graphs with grid = block = (1, 1, 1)")
        words = struct.unpack(f"<{len(args) // 8}Q", args)
        n_io = len(kernel.inputs) + len(kernel.outputs)
        values = tuple(words[n_io:])
        for sym, v in zip(kernel.symbols, values):
            if not 1 <= v <= MAX_DIM:
                raise BackendError(Status.INVALID_ARGUMENT, f"dimension {sym!r} = {v} is out of range 1..{MAX_DIM}")
        bind = dict(zip(kernel.symbols, values))
        tensors = [self.place(t.name, t.dtype, tuple(d if isinstance(d, int) else bind[d] for d in t.dims), addr)
                   for t, addr in zip(kernel.inputs + kernel.outputs, words[:n_io])]
        session, provider = self.session(kernel, values)
        return Plan(kernel, session, provider, tensors[:len(kernel.inputs)], tensors[len(kernel.inputs):])

    def place(self, name: str, dtype: np.dtype[Any], shape: tuple[int, ...],
              address: int) -> tuple[str, np.dtype[Any], tuple[int, ...], int]:
        """Check that a tensor of ``shape`` at ``address`` lies inside the arena, aligned.

        Raises:
            BackendError: OUT_OF_RANGE or INVALID_ARGUMENT (misaligned), naming the tensor.
        """
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
            if nbytes > self.arena_size:
                break
        if not (ARENA_GUARD <= address and address + nbytes <= self.arena_size):
            raise BackendError(Status.OUT_OF_RANGE, f"tensor {name!r} ({nbytes} bytes at {address:#x}) is outside "
                               "device memory")
        if address % dtype.itemsize:
            raise BackendError(Status.INVALID_ARGUMENT, f"tensor {name!r} at {address:#x} is not aligned to "
                               f"{dtype.itemsize} bytes")
        return name, dtype, shape, address

    def _execute(self, runnable: OnnxKernel, plan: Plan) -> None:
        if plan.session is None:          # an elementwise launch with no elements
            return
        base = self.arena_base
        spans = [(a, a + _nbytes(dt, sh)) for _, dt, sh, a in plan.inputs]
        io = plan.session.io_binding()
        for name, dtype, shape, address in plan.inputs:
            io.bind_input(name, "cpu", 0, dtype, list(shape), base + address)
        for name, value in plan.feeds.items():
            io.bind_cpu_input(name, value)
        copies = []
        for name, dtype, shape, address in plan.outputs:
            end = address + _nbytes(dtype, shape)
            if any(lo < end and address < hi for lo, hi in spans):   # in place: compute, then copy
                tmp = np.empty(shape, dtype)
                copies.append((tmp, address))
                io.bind_output(name, "cpu", 0, dtype, list(shape), tmp.ctypes.data)
            else:
                io.bind_output(name, "cpu", 0, dtype, list(shape), base + address)
        try:
            plan.session.run_with_iobinding(io)
        except Exception as exc:
            raise BackendError(Status.KERNEL_FAULT, f"ONNX Runtime failed running {plan.kernel.info.name!r} on "
                               f"{plan.provider}: {str(exc).splitlines()[0]}") from exc
        for tmp, address in copies:
            self.array[address:address + tmp.nbytes] = tmp.reshape(-1).view(np.uint8)
        self.provider_runs[plan.provider] += 1


def _reject_external_data(model: Any) -> None:
    """Refuse tensors stored outside the model: ONNX Runtime would read them from the *server's*
    file system (a guest could name any host file).

    Raises:
        BackendError: BAD_MODULE naming the tensor.
    """
    from onnx import TensorProto, external_data_helper

    tensors = list(external_data_helper._get_all_tensors(model))
    for graph in _graphs(model.graph):
        tensors += [s.values for s in graph.sparse_initializer] + [s.indices for s in graph.sparse_initializer]
    for t in tensors:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise BackendError(Status.BAD_MODULE, f"tensor {t.name!r} refers to external data; "
                               "models must carry all their data inline")


def _graphs(graph: Any) -> list[Any]:
    """``graph`` and every subgraph in node attributes (If/Loop/Scan bodies)."""
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                out += _graphs(attr.g)
            for g in attr.graphs:
                out += _graphs(g)
    return out


def _nbytes(dtype: np.dtype[Any], shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _fix_dims(model: Any, values: dict[str, int]) -> Any:
    """A copy of ``model`` whose graph I/O dimensions named in ``values`` are fixed."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for v in list(fixed.graph.input) + list(fixed.graph.output):
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in values:
                d.dim_value = values[d.dim_param]
    return fixed
