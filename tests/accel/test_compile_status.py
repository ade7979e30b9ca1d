"""One mapping from IR compile errors to Status for every backend, decided by exception type."""

from __future__ import annotations

import pytest
from vxpu.accel.compile_status import compile_error, compile_status
from vxpu.ir.errors import IRError, VerifyError
from vxpu.ir.lower.errors import (
    CompileError,
    LoweringError,
    ToolchainError,
    ToolMissingError,
    UnknownTargetError,
)
from vxpu.ir.lower.toolchain import resolve_target
from vxpu.ir.workers import CompileLimitError

from vxpu.abi.status import Status


@pytest.mark.parametrize("exc,status", [
    (CompileLimitError("worker ran past its deadline", "deadline"), Status.COMPILE_LIMIT),
    (IRError("bad"), Status.BAD_MODULE),
    (VerifyError([]), Status.BAD_MODULE),
    (UnknownTargetError("unknown NVPTX arch 'sm_1'"), Status.UNSUPPORTED),
    (ToolMissingError("no ld.lld found"), Status.UNAVAILABLE),
    (ToolchainError("ptxas rejected the PTX"), Status.BAD_MODULE),
    (LoweringError("cannot lower"), Status.BAD_MODULE),
    (CompileError("anything else"), Status.BAD_MODULE),
])
def test_status_by_type(exc: Exception, status: Status) -> None:
    assert compile_status(exc) is status
    err = compile_error(exc, "nvptx")
    assert err.status is status and str(exc) in str(err)


def test_the_message_does_not_decide() -> None:
    # gpu_ir used to read "unknown ... arch" out of the message; the type decides now.
    assert compile_status(ToolchainError("unknown arch")) is Status.BAD_MODULE
    assert compile_status(UnknownTargetError("no words that match")) is Status.UNSUPPORTED


def test_log_is_the_compiler_log() -> None:
    assert compile_error(ToolchainError("failed", log="ptxas: line 3"), "nvptx").log == "ptxas: line 3"
    assert compile_error(IRError("bad op"), "x86").log == "bad op"


def test_resolve_target_raises_unknown_target() -> None:
    for target, arch in (("nvptx", "sm_1"), ("amdgpu", "gfx1"), ("tpu", None)):
        with pytest.raises(UnknownTargetError):
            resolve_target(target, arch)


def test_not_a_compile_error() -> None:
    with pytest.raises(TypeError):
        compile_status(ValueError("x"))
