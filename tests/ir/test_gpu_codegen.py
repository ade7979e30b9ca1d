"""GPU code generation without a GPU: PTX assembled by nvJitLink, hsaco linked by LLD.

Every example kernel (and the test samples, which together use every op) must assemble to a
cubin for each supported NVIDIA architecture and link to a loadable AMDGPU code object with a
kernel descriptor per kernel, for each supported AMD architecture.
"""

from __future__ import annotations

import re
import struct

import pytest
from vxpu.ir.compile import compile_module
from vxpu.ir.lower import amdgpu, nvptx, toolchain
from vxpu.ir.lower.errors import ToolchainError
from vxpu.ir.text import parse

from tests.ir.irhelpers import sample_files
from tests.ir.lowerhelpers import needs_lld, needs_nvjitlink

SAMPLES = {p.stem: p for p in sample_files()}




@pytest.fixture(scope="module")
def modules() -> dict:  # type: ignore[type-arg]
    return {name: parse(path.read_text()) for name, path in SAMPLES.items()}


@needs_nvjitlink
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_every_sample_assembles_to_cubin(modules, sample: str, arch: str) -> None:  # type: ignore[no-untyped-def]
    mod = modules[sample]
    cm = compile_module(mod, "nvptx", arch=arch, cache=False)
    assert cm.image[:4] == b"\x7fELF"
    assert re.search(r"^\.version 8\.0$", cm.asm, re.MULTILINE), "PTX ISA must stay <= 8.x for driver 580"
    assert re.search(rf"^\.target {arch}\b", cm.asm, re.MULTILINE)
    for k in mod.kernels:
        assert re.search(rf"\.visible \.entry {k.name}\(", cm.asm), k.name
    assert set(cm.kernels) == {k.name for k in mod.kernels}


@needs_lld
@pytest.mark.parametrize("arch", ["gfx90a", "gfx942", "gfx1100"])
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_every_sample_links_to_hsaco(modules, sample: str, arch: str) -> None:  # type: ignore[no-untyped-def]
    mod = modules[sample]
    cm = compile_module(mod, "amdgpu", arch=arch, cache=False)
    info = toolchain.check_hsaco(cm.image, [k.name for k in mod.kernels])
    assert info.abi_version == 3  # ELFABIVERSION_AMDGPU_HSA_V5
    for k in mod.kernels:
        assert f"{k.name}.kd" in info.symbols
        assert f"amdhsa.target: amdgcn-amd-amdhsa--{arch}".encode() in info.metadata or arch.encode() in info.metadata


@needs_lld
def test_code_object_version_4() -> None:
    mod = parse(SAMPLES["saxpy"].read_text())
    cm = compile_module(mod, "amdgpu", arch="gfx942", cov=4, cache=False)
    assert toolchain.check_hsaco(cm.image, ["saxpy"]).abi_version == 2  # ELFABIVERSION_AMDGPU_HSA_V4
    with pytest.raises(ToolchainError):
        compile_module(mod, "amdgpu", arch="gfx942", cov=3, cache=False)


@needs_lld
def test_hsaco_checker_rejects_bad_images() -> None:
    mod = parse(SAMPLES["saxpy"].read_text())
    image = compile_module(mod, "amdgpu", arch="gfx942", cache=False).image
    with pytest.raises(ToolchainError, match="descriptor"):
        toolchain.check_hsaco(image, ["saxpy", "missing"])
    with pytest.raises(ToolchainError):
        toolchain.check_hsaco(b"\x7fELF" + b"\0" * 10, ["saxpy"])
    broken = bytearray(image)
    struct.pack_into("<Q", broken, 40, len(image) + 1000)  # e_shoff past the end
    with pytest.raises(ToolchainError, match="out of bounds"):
        toolchain.check_hsaco(bytes(broken), ["saxpy"])
    obj = toolchain.emit_amdgpu_object(
        toolchain.parse_and_optimize(str(amdgpu.lower_module(mod)), toolchain.resolve_target("amdgpu"), 2),
        toolchain.resolve_target("amdgpu"))
    with pytest.raises(ToolchainError, match="ET_DYN"):
        toolchain.check_hsaco(obj, ["saxpy"])


@needs_nvjitlink
def test_nvjitlink_reports_ptxas_errors() -> None:
    bad = ".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k() { bogus; }\n"
    with pytest.raises(ToolchainError, match="ptxas"):
        toolchain.ptx_to_cubin(bad, "sm_90")


def test_llvm_ir_has_no_undefined_behaviour_flags(modules) -> None:  # type: ignore[no-untyped-def]
    text = str(nvptx.lower_module(modules["kitchen_sink"]))
    reduce_text = str(nvptx.lower_module(modules["reduce"]))
    for flag in (" nsw ", " nuw ", " exact ", " fast ", " nnan ", " ninf ", " poison", " inbounds "):
        assert flag not in text, flag
    assert "llvm.fptosi.sat" in text and "ptx_kernel" in text and "addrspace(3)" in text
    assert "freeze" in reduce_text  # shared-memory loads never yield undef
    amd = str(amdgpu.lower_module(modules["kitchen_sink"]))
    assert "amdgpu_kernel" in amd and "addrspace(5)" in amd and '"amdhsa_code_object_version", i32 500' in amd
    assert 'syncscope("workgroup")' in amd


def test_unknown_targets_are_rejected() -> None:
    for kind, arch in (("nvptx", "sm_20"), ("amdgpu", "gfx700"), ("spirv", None)):
        with pytest.raises(ToolchainError):
            toolchain.resolve_target(kind, arch)
