"""Target machines and the native toolchains behind them.

This module is the only place that talks to LLVM's code generators and to the external
assemblers/linkers. Everything here works on LLVM IR *text* (what :mod:`vxpu.ir.lower.common`
prints) and returns bytes:

* :func:`optimize` parses LLVM IR and runs the new-pass-manager pipeline for a target machine;
* :func:`emit_ptx` → PTX text (ISA version fixed by the ``+ptxNN`` feature, ≤ 8.x by default so
  that driver 580 loads it); :func:`ptx_to_cubin` assembles it with nvJitLink (no GPU needed);
* :func:`emit_amdgpu_object` → ELF relocatable; :func:`link_hsaco` links it with LLD
  (``ld.lld -shared`` from the ziglang wheel) into a loadable code object, and
  :func:`check_hsaco` verifies the ELF, each kernel's ``<name>.kd`` descriptor symbol and the
  ``NT_AMDGPU_METADATA`` note (parsed with :mod:`struct`, no extra dependencies);
* :func:`toolchain_versions` names every tool version, for the compile-cache key.

LLVM's global state is not thread-safe for code generation, so every entry point holds
:data:`LLVM_LOCK`. An AMDGPU module may be emitted once only (a second emission on the same
``ModuleRef`` aborts the process), so every emission here works on a fresh clone.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from vxpu.ir.lower.errors import ToolchainError, ToolMissingError, UnknownTargetError

log = logging.getLogger(__name__)

#: Serialises all use of LLVM's (process-global) code generators.
LLVM_LOCK = threading.RLock()

NVPTX_TRIPLE = "nvptx64-nvidia-cuda"
AMDGPU_TRIPLE = "amdgcn-amd-amdhsa"
NVPTX_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")
AMDGPU_ARCHS = ("gfx90a", "gfx942", "gfx1100")
#: PTX ISA 8.0 runs on every driver ≥ 525 (and sm_90a needs ≥ 8.0).
DEFAULT_PTX_FEATURES = "+ptx80"
COV_FLAGS = {4: 400, 5: 500}
NVPTX_DATALAYOUT = "e-p6:32:32-i64:64-i128:128-i256:256-v16:16-v32:32-n16:32:64"
AMDGPU_DATALAYOUT = (
    "e-p:64:64-p1:64:64-p2:32:32-p3:32:32-p4:64:64-p5:32:32-p6:32:32-p7:160:256:256:32-"
    "p8:128:128:128:48-p9:192:256:256:32-i64:64-v16:16-v24:32-v32:32-v48:64-v96:128-v192:256-"
    "v256:256-v512:512-v1024:1024-v2048:2048-n32:64-S32-A5-G1-ni:7:8:9"
)


@dataclass(frozen=True)
class TargetSpec:
    """A fully resolved code-generation target.

    Attributes:
        kind: ``"x86"``, ``"nvptx"`` or ``"amdgpu"``.
        arch: ``sm_90`` / ``gfx942`` / the host CPU name (``znver4``).
        features: the LLVM feature string (``+ptx80`` for NVPTX, host features for x86).
        cov: AMDGPU code-object version (4 or 5); 0 for other targets.
    """

    kind: str
    arch: str
    features: str = ""
    cov: int = 0

    @property
    def triple(self) -> str:
        if self.kind == "nvptx":
            return NVPTX_TRIPLE
        if self.kind == "amdgpu":
            return AMDGPU_TRIPLE
        return llvm_binding().get_process_triple()

    def key(self) -> str:
        """A stable text form for cache keys."""
        return f"{self.kind}|{self.arch}|{self.features}|cov{self.cov}"


@functools.lru_cache(maxsize=64)
def resolve_target(kind: str, arch: str | None = None, *, features: str | None = None,
                   cov: int = 5) -> TargetSpec:
    """Resolve a user-facing target name to a :class:`TargetSpec`.

    Args:
        kind: ``"x86"`` (also ``"cpu"``/``"host"``), ``"nvptx"`` (also ``"cuda"``/``"ptx"``) or
            ``"amdgpu"`` (also ``"hip"``/``"rocm"``).
        arch: the GPU architecture (default sm_90 / gfx942) or, for x86, a CPU name (default:
            the host's, with the host's features).
        features: override the LLVM feature string (e.g. ``+ptx78``).
        cov: AMDGPU code-object version, 4 or 5.

    Raises:
        ToolchainError: unknown target kind, architecture or code-object version.
    """
    k = {"cpu": "x86", "host": "x86", "x86_64": "x86", "cuda": "nvptx", "ptx": "nvptx",
         "hip": "amdgpu", "rocm": "amdgpu", "amdgcn": "amdgpu"}.get(kind, kind)
    if k == "nvptx":
        a = arch or "sm_90"
        if a not in NVPTX_ARCHS:
            raise UnknownTargetError(f"unknown NVPTX arch {a!r}; use one of {', '.join(NVPTX_ARCHS)}")
        return TargetSpec("nvptx", a, features if features is not None else DEFAULT_PTX_FEATURES)
    if k == "amdgpu":
        a = arch or "gfx942"
        if a not in AMDGPU_ARCHS:
            raise UnknownTargetError(f"unknown AMDGPU arch {a!r}; use one of {', '.join(AMDGPU_ARCHS)}")
        if cov not in COV_FLAGS:
            raise UnknownTargetError(f"AMDGPU code object version must be 4 or 5, not {cov!r}")
        return TargetSpec("amdgpu", a, features or "", cov)
    if k == "x86":
        llvm = llvm_binding()
        if arch is None:
            return TargetSpec("x86", llvm.get_host_cpu_name(),
                              features if features is not None else llvm.get_host_cpu_features().flatten())
        return TargetSpec("x86", arch, features or "")
    raise UnknownTargetError(f"unknown target {kind!r}; use 'x86', 'nvptx' or 'amdgpu'")


@functools.lru_cache(maxsize=1)
def llvm_binding() -> Any:
    """``llvmlite.binding`` with every target and asm printer initialised (once per process)."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    return llvm


@functools.lru_cache(maxsize=32)
def target_machine(spec: TargetSpec, opt_level: int = 3) -> Any:
    """The (cached) llvmlite TargetMachine for ``spec``.

    Raises:
        ToolchainError: LLVM does not know the triple/CPU.
    """
    llvm = llvm_binding()
    try:
        target = llvm.Target.from_triple(spec.triple)
        reloc = "pic" if spec.kind == "amdgpu" else "default"
        return target.create_target_machine(cpu=spec.arch, features=spec.features,
                                            opt=min(max(opt_level, 0), 3), reloc=reloc,
                                            codemodel="jitdefault" if spec.kind == "x86" else "default")
    except RuntimeError as exc:
        raise UnknownTargetError(f"LLVM cannot target {spec.key()}: {exc}") from exc


def parse_and_optimize(llvm_ir: str, spec: TargetSpec, opt_level: int) -> Any:
    """Parse LLVM IR text, verify it and run the O-level pipeline for ``spec``.

    Returns the optimized ``ModuleRef``.

    Raises:
        ToolchainError: the text does not parse or verify (a lowering bug: the message has LLVM's).
    """
    llvm = llvm_binding()
    with LLVM_LOCK:
        try:
            mod = llvm.parse_assembly(llvm_ir)
            mod.verify()
        except RuntimeError as exc:
            log.debug("invalid LLVM IR:\n%s", llvm_ir)
            raise ToolchainError(f"generated LLVM IR is invalid (a vxpu bug): {exc}") from exc
        tm = target_machine(spec, opt_level)
        mod.triple = spec.triple
        mod.data_layout = str(tm.target_data)
        if opt_level > 0:
            # x86: O3's extra loop transforms multiply compile time by ~10 on the fissioned
            # barrier drivers (200 ms) for no measurable speed-up; O2 is the JIT-friendly level.
            level = min(opt_level, 2 if spec.kind == "x86" else 3)
            pto = llvm.create_pipeline_tuning_options(speed_level=level)
            pto.loop_vectorization = spec.kind == "x86"
            pto.slp_vectorization = True
            pb = llvm.create_pass_builder(tm, pto)
            pb.getModulePassManager().run(mod, pb)
        return mod


def emit_ptx(mod: Any, spec: TargetSpec, opt_level: int = 3) -> str:
    """Emit PTX text for an optimized NVPTX ``ModuleRef`` (consumes it: emit once)."""
    with LLVM_LOCK:
        return str(target_machine(spec, opt_level).emit_assembly(mod))


def emit_amdgpu_object(mod: Any, spec: TargetSpec, opt_level: int = 3) -> bytes:
    """Emit an AMDGPU ELF relocatable object from a clone of ``mod``."""
    with LLVM_LOCK:
        return bytes(target_machine(spec, opt_level).emit_object(mod.clone()))


# --------------------------------------------------------------------------- nvJitLink


def ptx_to_cubin(ptx: str, arch: str, *, opt_level: int = 3) -> tuple[bytes, str]:
    """Assemble PTX into a cubin for ``arch`` with nvJitLink (works without a GPU).

    Returns ``(cubin, info_log)``.

    Raises:
        ToolchainError: nvJitLink is missing, or ptxas rejected the PTX (the message carries its log).
    """
    try:
        from cuda.bindings import nvjitlink
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ToolMissingError("nvJitLink is not installed: pip install 'vxpu[cuda]'") from exc
    # nvJitLink knows -O0 and -O3 only: ptxas always optimizes fully unless opt_level is 0
    # (opt_level 1-2 only lighten the LLVM side).
    opts = [f"-arch={arch}", "-O0" if opt_level <= 0 else "-O3"]
    try:
        handle = nvjitlink.create(len(opts), opts)
    except Exception as exc:
        raise ToolMissingError(f"nvJitLink unavailable: {exc}") from exc
    try:
        data = ptx.encode() + b"\0"
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "vxpu.ptx")
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            raise ToolchainError(f"ptxas rejected the PTX: {exc}\n{_jitlink_log(handle, error=True)}") from exc
        size = nvjitlink.get_linked_cubin_size(handle)
        cubin = bytearray(size)
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin), _jitlink_log(handle, error=False)
    finally:
        nvjitlink.destroy(handle)


def _jitlink_log(handle: int, *, error: bool) -> str:
    from cuda.bindings import nvjitlink

    size = (nvjitlink.get_error_log_size if error else nvjitlink.get_info_log_size)(handle)
    if size <= 1:
        return ""
    buf = bytearray(size)
    (nvjitlink.get_error_log if error else nvjitlink.get_info_log)(handle, buf)
    return buf.rstrip(b"\0").decode(errors="replace")


@functools.lru_cache(maxsize=1)
def nvjitlink_version() -> str:
    """``"13.5"``, or ``"none"`` when nvJitLink is not installed."""
    try:
        from cuda.bindings import nvjitlink

        major, minor = nvjitlink.version()
        return f"{major}.{minor}"
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return "none"


# --------------------------------------------------------------------------- LLD


@functools.lru_cache(maxsize=1)
def lld_command() -> tuple[str, ...]:
    """The command that runs ``ld.lld``: the ziglang wheel's ``zig ld.lld``, else one on PATH.

    Raises:
        ToolMissingError: no LLD found.
    """
    try:
        import ziglang

        zig = os.path.join(os.path.dirname(ziglang.__file__), "zig")
        if os.access(zig, os.X_OK):
            return (zig, "ld.lld")
    except ImportError:
        pass
    import shutil

    for name in ("ld.lld", "ld.lld-22", "ld.lld-18", "ld.lld-17", "ld.lld-16"):
        path = shutil.which(name)
        if path:
            return (path,)
    raise ToolMissingError("no ld.lld found: pip install ziglang (or 'vxpu[rocm]')")


@functools.lru_cache(maxsize=1)
def lld_version() -> str:
    """LLD's version line, or ``"none"``."""
    try:
        out = subprocess.run([*lld_command(), "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
        return out.stdout.strip() or "unknown"
    except (ToolchainError, OSError, subprocess.TimeoutExpired):
        return "none"


def link_hsaco(obj: bytes) -> bytes:
    """Link an AMDGPU relocatable object into a loadable code object (``ld.lld -shared``).

    Raises:
        ToolchainError: LLD is missing or failed (the message carries its output).
    """
    with tempfile.TemporaryDirectory(prefix="vxpu-lld-") as tmp:
        src = os.path.join(tmp, "k.o")
        dst = os.path.join(tmp, "k.hsaco")
        with open(src, "wb") as f:
            f.write(obj)
        try:
            res = subprocess.run([*lld_command(), "-shared", "--no-undefined", "-o", dst, src],
                                 capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ToolMissingError(f"ld.lld failed to run: {exc}") from exc
        if res.returncode != 0:
            raise ToolchainError(f"ld.lld failed ({res.returncode}): {res.stderr.strip()}")
        with open(dst, "rb") as f:
            return f.read()


# --------------------------------------------------------------------------- ELF checks

EM_AMDGPU = 224
ET_DYN = 3
NT_AMDGPU_METADATA = 32


@dataclass(frozen=True)
class HsacoInfo:
    """What :func:`check_hsaco` found in a code object."""

    symbols: frozenset[str]
    abi_version: int
    e_flags: int
    metadata: bytes


def check_hsaco(image: bytes, kernels: list[str] | tuple[str, ...]) -> HsacoInfo:
    """Validate a linked AMDGPU code object.

    Checks: ELF64 little-endian, ``EM_AMDGPU``, ``ET_DYN``, a symbol table holding ``<k>`` and
    ``<k>.kd`` for every kernel, and an ``NT_AMDGPU_METADATA`` note naming every kernel.

    Raises:
        ToolchainError: with what is wrong.
    """
    if len(image) < 64 or image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ToolchainError("hsaco is not a little-endian ELF64 image")
    e_type, e_machine = struct.unpack_from("<HH", image, 16)
    e_flags = struct.unpack_from("<I", image, 48)[0]
    if e_machine != EM_AMDGPU or e_type != ET_DYN:
        raise ToolchainError(f"hsaco has e_machine={e_machine} e_type={e_type}; want AMDGPU ET_DYN")
    sections = _elf_sections(image)
    symbols = _elf_symbols(image, sections)
    metadata = _elf_amdgpu_note(image, sections)
    for k in kernels:
        if k not in symbols or f"{k}.kd" not in symbols:
            raise ToolchainError(f"hsaco lacks kernel {k!r} or its descriptor {k}.kd")
        if k.encode() not in metadata:
            raise ToolchainError(f"NT_AMDGPU_METADATA does not describe kernel {k!r}")
    return HsacoInfo(frozenset(symbols), image[8], e_flags, metadata)


def _elf_sections(image: bytes) -> list[tuple[int, int, int, int, int]]:
    """``(type, offset, size, link, entsize)`` for each section header, bounds-checked."""
    e_shoff = struct.unpack_from("<Q", image, 40)[0]
    e_shentsize, e_shnum = struct.unpack_from("<HH", image, 58)
    if e_shentsize != 64 or e_shoff + e_shnum * 64 > len(image):
        raise ToolchainError("hsaco section headers are out of bounds")
    out = []
    for i in range(e_shnum):
        _n, sh_type, _f, _a, off, size, link, _i, _al, ent = struct.unpack_from(
            "<IIQQQQIIQQ", image, e_shoff + i * 64)
        if off + size > len(image) and sh_type != 8:  # SHT_NOBITS has no file data
            raise ToolchainError(f"hsaco section {i} is out of bounds")
        out.append((sh_type, off, size, link, ent))
    return out


def _elf_symbols(image: bytes, sections: list[tuple[int, int, int, int, int]]) -> set[str]:
    names: set[str] = set()
    for sh_type, off, size, link, ent in sections:
        if sh_type not in (2, 11) or ent != 24 or link >= len(sections):  # SYMTAB / DYNSYM
            continue
        str_off, str_size = sections[link][1], sections[link][2]
        strtab = image[str_off:str_off + str_size]
        for s in range(off, off + size, 24):
            st_name = struct.unpack_from("<I", image, s)[0]
            end = strtab.find(b"\0", st_name)
            if st_name < len(strtab) and end > st_name:
                names.add(strtab[st_name:end].decode(errors="replace"))
    return names


def _elf_amdgpu_note(image: bytes, sections: list[tuple[int, int, int, int, int]]) -> bytes:
    for sh_type, off, size, _link, _ent in sections:
        if sh_type != 7:  # SHT_NOTE
            continue
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", image, pos)
            name_end = pos + 12 + ((namesz + 3) & ~3)
            desc_end = name_end + ((descsz + 3) & ~3)
            if desc_end > end:
                break
            name = image[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if ntype == NT_AMDGPU_METADATA and name == b"AMDGPU":
                return image[name_end:name_end + descsz]
            pos = desc_end
    raise ToolchainError("hsaco has no NT_AMDGPU_METADATA note")


# --------------------------------------------------------------------------- versions


@functools.lru_cache(maxsize=1)
def toolchain_versions() -> str:
    """Every compiler version that can change generated code, as one line (for cache keys)."""
    import llvmlite

    try:
        from importlib.metadata import version

        vxpu_version = version("vxpu")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        vxpu_version = "dev"
    llvm = llvm_binding()
    llvm_v = ".".join(map(str, llvm.llvm_version_info))
    return (f"vxpu={vxpu_version};lowering={lowering_fingerprint()};llvmlite={llvmlite.__version__};"
            f"llvm={llvm_v};nvjitlink={nvjitlink_version()};lld={lld_version()}")


@functools.lru_cache(maxsize=1)
def lowering_fingerprint() -> str:
    """sha256 (16 hex digits) of the lowering's own source files: a cached entry made by other
    lowering code (a development checkout, an upgrade without a version bump) is never reused."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted([*here.glob("*.py"), here.parent / "compile.py"]):
        try:
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        except OSError:
            h.update(path.name.encode() + b"\0?")
    return h.hexdigest()[:16]


def emit_x86_object(mod: Any, spec: TargetSpec, opt_level: int = 3) -> bytes:
    """Emit a host ELF object (large code model, so MCJIT may place it anywhere)."""
    llvm_binding()
    with LLVM_LOCK:
        tm = _x86_object_machine(spec, opt_level)
        return bytes(tm.emit_object(mod.clone()))


@functools.lru_cache(maxsize=8)
def _x86_object_machine(spec: TargetSpec, opt_level: int) -> Any:
    llvm = llvm_binding()
    target = llvm.Target.from_triple(spec.triple)
    return target.create_target_machine(cpu=spec.arch, features=spec.features, opt=opt_level,
                                        reloc="static", codemodel="large")


def elf_undefined_symbols(image: bytes) -> list[str]:
    """Names of the undefined symbols of an ELF64 object (what it imports).

    Raises:
        ToolchainError: not a valid ELF64 image.
    """
    if len(image) < 64 or image[:4] != b"\x7fELF" or image[4] != 2:
        raise ToolchainError("not an ELF64 image")
    sections = _elf_sections(image)
    names: list[str] = []
    for sh_type, off, size, link, ent in sections:
        if sh_type != 2 or ent != 24 or link >= len(sections):
            continue
        str_off, str_size = sections[link][1], sections[link][2]
        strtab = image[str_off:str_off + str_size]
        for s in range(off + 24, off + size, 24):
            st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", image, s)
            end = strtab.find(b"\0", st_name)
            if st_shndx == 0 and 0 < st_name < len(strtab) and end > st_name:
                names.append(strtab[st_name:end].decode(errors="replace"))
    return names
