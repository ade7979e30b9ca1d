"""The public compile entry: IR module → native code for x86, NVPTX or AMDGPU, through the cache.

::

    from vxpu.ir.compile import compile_module
    cm = compile_module(wire_bytes, "nvptx", arch="sm_90")      # or a Module; "x86"; "amdgpu"
    cm.image          # cubin (nvptx) | hsaco (amdgpu) | ELF object (x86, see vxpu.ir.cpu_exec)
    cm.asm            # the PTX text (nvptx), else ""
    cm.kernels["saxpy"].param_offsets

Stages (each a function in ``vxpu.ir.lower``): decode + verify (hostile input) → lower to LLVM IR
(``llvmlite.ir``) → parse, verify and optimize (O0-O3) → emit: PTX → nvJitLink cubin; AMDGPU
object → ``ld.lld -shared`` hsaco (kernel descriptors checked); x86 object (sandboxed launch
drivers). The cache key is the IR core's canonical module hash plus target, options and tool
versions (:func:`vxpu.ir.cache.cache_key`); a hit returns the same :class:`CompiledModule`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vxpu.ir.args import KernelSignature, kernel_signature
from vxpu.ir.cache import CompileCache, cache_key
from vxpu.ir.lower.errors import CompileError, LoweringError, ToolchainError
from vxpu.ir.model import Module

if TYPE_CHECKING:
    from vxpu.ir.workers import CompilePool

log = logging.getLogger(__name__)

__all__ = [
    "CompileError",
    "CompiledModule",
    "KernelSignature",
    "LoweringError",
    "ToolchainError",
    "compile_module",
    "compile_verified",
    "default_cache",
    "kernel_signature",
]

_PAYLOAD_MAGIC = b"VXCM"
_PAYLOAD_VERSION = 2


@dataclass(frozen=True)
class CompiledModule:
    """The result of a compile: native code plus what a backend needs to launch it.

    Attributes:
        name: the module name.
        target: ``TargetSpec.key()`` of the target (``"nvptx|sm_90|+ptx80|cov0"``).
        kind: ``"x86"``, ``"nvptx"`` or ``"amdgpu"``.
        arch: the architecture compiled for.
        image: cubin, hsaco or x86 ELF object bytes.
        asm: PTX text for NVPTX ('' otherwise).
        kernels: name → :class:`~vxpu.ir.args.KernelSignature`, in module order.
        extra: target specifics (x86: each kernel's scratch layout); ``extra["checked"]``: the
            code checks every access against its own buffer and takes the hidden bounds
            arguments (docs/ir-lowering.md §7); False only for host-side unchecked builds.
        compile_seconds: wall time of the compile that produced it.
    """

    name: str
    target: str
    kind: str
    arch: str
    image: bytes
    asm: str
    kernels: dict[str, KernelSignature]
    extra: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0

    def to_bytes(self) -> bytes:
        """Serialise for the disk cache (JSON header + image)."""
        meta = {
            "name": self.name, "target": self.target, "kind": self.kind, "arch": self.arch, "asm": self.asm,
            "kernels": [[k.name, list(k.param_sizes), list(k.param_offsets), k.args_size,
                         k.static_shared_bytes, k.uses_global_atomics, k.has_barriers, list(k.param_types),
                         list(k.param_names)]
                        for k in self.kernels.values()],
            "extra": self.extra, "compile_seconds": self.compile_seconds,
        }
        head = json.dumps(meta, separators=(",", ":")).encode()
        return _PAYLOAD_MAGIC + struct.pack("<HI", _PAYLOAD_VERSION, len(head)) + head + self.image

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledModule:
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: not a serialised module of this version.
        """
        if data[:4] != _PAYLOAD_MAGIC or len(data) < 10:
            raise ValueError("not a compiled-module payload")
        version, hlen = struct.unpack_from("<HI", data, 4)
        if version != _PAYLOAD_VERSION or 10 + hlen > len(data):
            raise ValueError("compiled-module payload of another version or truncated")
        meta = json.loads(data[10:10 + hlen])
        kernels = {k[0]: KernelSignature(k[0], tuple(k[1]), tuple(k[2]), k[3], k[4], k[5], k[6],
                                         tuple(k[7]), tuple(k[8]))
                   for k in meta["kernels"]}
        return cls(meta["name"], meta["target"], meta["kind"], meta["arch"], bytes(data[10 + hlen:]),
                   meta["asm"], kernels, meta["extra"], meta["compile_seconds"])


_default_cache: CompileCache | None = None
_default_lock = threading.Lock()


def default_cache() -> CompileCache:
    """The process-wide cache (memory + ``user_cache_dir("vxpu")/jit``)."""
    global _default_cache
    with _default_lock:
        if _default_cache is None:
            _default_cache = CompileCache()
        return _default_cache


def compile_module(module_or_bytes: Module | bytes | bytearray | memoryview, target: str = "x86", *,
                   arch: str | None = None, opt_level: int = 3, cache: CompileCache | None | bool = None,
                   cov: int = 5, features: str | None = None, checked: bool = True,
                   workers: CompilePool | None = None) -> CompiledModule:
    """Compile an IR module for ``target``.

    Args:
        module_or_bytes: a :class:`Module` (verified here) or its VXIR wire encoding (decoded
            and verified here: hostile input is fine).
        target: ``"x86"``, ``"nvptx"`` or ``"amdgpu"`` (aliases: cpu, cuda, hip).
        arch: ``sm_80``/``sm_90``/``sm_90a``, ``gfx90a``/``gfx942``/``gfx1100``, or an x86 CPU name
            (default: sm_90, gfx942, the host CPU).
        opt_level: 0-3.
        cache: a :class:`CompileCache`; ``None`` = the process default; ``False`` = no caching.
        cov: AMDGPU code-object version (4 or 5).
        features: LLVM feature string override (e.g. ``+ptx78``).
        checked: per-buffer bounds checks (the default, and the only choice for guest
            modules). ``False`` builds the unchecked lowering for trusted, host-side modules
            (benchmarks, ``vxpu ir compile --unchecked``); no guest request can select it.
        workers: compile a cache miss in this :class:`~vxpu.ir.workers.CompilePool` instead of
            in this process (what a server does with guest modules: LLVM then runs under the
            workers' memory, CPU and time limits); a cache hit never touches it.

    Raises:
        vxpu.ir.errors.DecodeError / VerifyError: invalid IR (every problem listed).
        ToolchainError: a native tool is missing or failed (message names the fix).
        CompileError: anything else that stops the compile.
        vxpu.ir.workers.CompileLimitError: (with ``workers``) the worker crashed or ran past a
            limit.
    """
    from vxpu.ir.lower.toolchain import resolve_target, toolchain_versions

    spec = resolve_target(target, arch, features=features, cov=cov)
    opt = min(max(int(opt_level), 0), 3)
    store = default_cache() if cache is None or cache is True else (cache or None)
    raw_key = None
    if isinstance(module_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(module_or_bytes)
        raw_key = hashlib.sha256(data + spec.key().encode() + bytes([opt, int(checked)]) + _versions_tag()).digest()
        if store is not None:
            hit = store.get_alias(raw_key)
            if hit is not None:
                return hit
        from vxpu.ir.binary import decode

        module = decode(data)
    else:
        from vxpu.ir.verify import verify

        module = module_or_bytes
        verify(module)
    from vxpu.ir.hashing import module_hash

    key = cache_key(bytes.fromhex(module_hash(module)), spec.key(), [("opt", opt), ("checked", bool(checked))],
                    toolchain_versions())

    def build() -> CompiledModule:
        if workers is not None:
            from vxpu.ir.binary import encode

            wire = data if raw_key is not None else encode(module)
            return workers.compile(wire, spec, opt, bool(checked))  # type: ignore[no-any-return]
        return _build(module, spec, opt, bool(checked))

    if store is None:
        return build()
    result = store.get_or_build(key, build, dump=CompiledModule.to_bytes, load=CompiledModule.from_bytes)
    if raw_key is not None:
        store.put_alias(raw_key, result)
    return result


def compile_verified(module: Module, spec: Any, opt: int, checked: bool = True) -> CompiledModule:
    """Compile a verified ``module`` for a resolved ``spec`` in this process, without the cache
    (what a compile worker runs; :func:`compile_module` is the entry for everyone else).

    Raises:
        ToolchainError, CompileError: as :func:`compile_module`.
    """
    return _build(module, spec, opt, checked)


def _versions_tag() -> bytes:
    from vxpu.ir.lower.toolchain import toolchain_versions

    return toolchain_versions().encode()


def _build(module: Module, spec: Any, opt: int, checked: bool) -> CompiledModule:
    from vxpu.ir.lower import toolchain as tc

    t0 = time.perf_counter()
    sigs = {k.name: kernel_signature(k) for k in module.kernels}
    extra: dict[str, Any] = {"checked": checked}
    asm = ""
    try:
        if spec.kind == "nvptx":
            from vxpu.ir.lower import nvptx

            mod = tc.parse_and_optimize(str(nvptx.lower_module(module, checked)), spec, opt)
            asm = tc.emit_ptx(mod, spec, opt)
            image, info = tc.ptx_to_cubin(asm, spec.arch, opt_level=opt)
            extra["ptxas_info"] = info
        elif spec.kind == "amdgpu":
            from vxpu.ir.lower import amdgpu

            mod = tc.parse_and_optimize(str(amdgpu.lower_module(module, spec.cov, checked)), spec, opt)
            image = tc.link_hsaco(tc.emit_amdgpu_object(mod, spec, opt))
            tc.check_hsaco(image, list(sigs))
        else:
            from vxpu.ir.lower import x86

            llmod, layouts = x86.lower_module(module, checked)
            mod = tc.parse_and_optimize(str(llmod), spec, opt)
            image = tc.emit_x86_object(mod, spec, opt)
            extra["layouts"] = {lay.name: x86.layout_to_json(lay) for lay in layouts}
    except CompileError:
        raise
    except Exception as exc:
        log.debug("compile of %s for %s failed", module.name, spec.key(), exc_info=True)
        raise CompileError(f"compiling module {module.name!r} for {spec.key()} failed: {exc}") from exc
    dt = time.perf_counter() - t0
    log.debug("compiled %s for %s in %.1f ms", module.name, spec.key(), dt * 1e3)
    return CompiledModule(module.name, spec.key(), spec.kind, spec.arch, image, asm, sigs, extra, dt)
