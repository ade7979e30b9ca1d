"""IR modules for the GPU backends: :func:`vxpu.ir.compile.compile_module` behind Backend errors.

The CUDA backend asks for ``("nvptx", "sm_XY")`` and gets a cubin (PTX from LLVM, assembled by
nvJitLink, so the driver never JITs PTX); the HIP backend asks for ``("amdgpu", "gfxNNN")`` and
gets a linked hsaco. Both go through the compile cache (a miss is compiled in a sandboxed
compile worker, :mod:`vxpu.ir.workers`), and both get every kernel's launch
layout as a :class:`~vxpu.accel.backend.KernelInfo` from the IR signature.
"""

from __future__ import annotations

from typing import Any

from vxpu.accel.backend import BackendError, KernelInfo, Status


def resolve_cache(option: Any) -> Any:
    """A backend's ``compile_cache`` option → what ``compile_module`` takes.

    ``None`` (the process default cache), ``False``/``"off"`` (no caching), a directory path
    string (a :class:`vxpu.ir.cache.CompileCache` there, e.g. from ``cuda:0,compile_cache=/var/cache/vxpu``),
    or a ready cache object.

    Raises:
        BackendError: UNAVAILABLE when the IR compiler cannot be imported.
    """
    if not isinstance(option, str):
        return option
    if option.lower() in ("off", "none", "false", "0", "no"):
        return False
    try:
        from vxpu.ir.cache import CompileCache
    except ImportError as exc:
        raise BackendError(Status.UNAVAILABLE, f"the vxpu IR compiler cannot be imported: {exc}") from exc
    return CompileCache(option)


def compile_ir(image: bytes, target: str, arch: str, opt_level: int,
               cache: Any = None) -> tuple[bytes, dict[str, KernelInfo], bool]:
    """Compile an IR wire module; returns ``(binary, {kernel: KernelInfo}, cache_hit)``.

    A cache miss is compiled in the sandboxed compile workers
    (:func:`vxpu.ir.workers.sandbox_pool`), never in this process.

    Raises:
        BackendError: BAD_MODULE for invalid IR or a failed compile (the log carries the
            compiler's message); COMPILE_LIMIT when the compile worker crashed or ran past
            its memory, CPU or time limit; UNSUPPORTED when the IR toolchain does not know ``arch``;
            UNAVAILABLE when a native tool is missing (the one table:
            :mod:`vxpu.accel.compile_status`).
    """
    try:
        from vxpu.accel.compile_status import compile_error
        from vxpu.ir.compile import compile_module, default_cache
        from vxpu.ir.errors import IRError
        from vxpu.ir.lower.errors import CompileError
        from vxpu.ir.workers import sandbox_pool
    except ImportError as exc:
        raise BackendError(Status.UNAVAILABLE, f"the vxpu IR compiler cannot be imported: {exc}") from exc
    store = default_cache() if cache is None else resolve_cache(cache)
    stats = getattr(store, "stats", None)
    before = stats.hits if stats is not None else 0
    try:
        compiled = compile_module(image, target, arch=arch, opt_level=opt_level, cache=store, workers=sandbox_pool())
    except (IRError, CompileError) as exc:
        raise compile_error(exc, target) from exc
    hit = stats is not None and stats.hits > before
    checked = bool(compiled.extra.get("checked", False))
    kernels = {name: KernelInfo.from_signature(sig, checked) for name, sig in compiled.kernels.items()}
    return compiled.image, kernels, hit
