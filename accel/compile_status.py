"""IR compile errors as Backend statuses: one table for every backend, by exception type.

Every backend that compiles IR (CPU, CUDA, HIP, and the NPU's graph lowering) reports a failed
compile the same way. The exception's type decides the status, never its message:

==========================================  ===============  =====================================
exception (``vxpu.ir``)                      status           meaning for the guest
==========================================  ===============  =====================================
``CompileLimitError`` (compile worker)      COMPILE_LIMIT    the compile ran past a sandbox limit
``IRError`` (decode, verify, parse)         BAD_MODULE       the module itself is invalid
``UnknownTargetError``                      UNSUPPORTED      this host's device is no target of it
``ToolMissingError``                        UNAVAILABLE      the host lacks a native tool
other ``ToolchainError``, ``CompileError``  BAD_MODULE       the module does not compile
==========================================  ===============  =====================================

The first matching row wins (subclasses come before their bases).
"""

from __future__ import annotations

from vxpu.accel.backend import BackendError
from vxpu.ir.errors import IRError
from vxpu.ir.lower.errors import CompileError, ToolchainError, ToolMissingError, UnknownTargetError
from vxpu.ir.workers import CompileLimitError

from vxpu.abi.status import Status

__all__ = ["COMPILE_ERRORS", "compile_error", "compile_status"]

#: (exception type, status, what the message says), most specific first.
COMPILE_ERRORS: tuple[tuple[type[Exception], Status, str], ...] = (
    (CompileLimitError, Status.COMPILE_LIMIT, "{target} compile stopped"),
    (IRError, Status.BAD_MODULE, "IR module rejected"),
    (UnknownTargetError, Status.UNSUPPORTED, "{target} code generation is not supported here"),
    (ToolMissingError, Status.UNAVAILABLE, "the {target} toolchain is unavailable"),
    (ToolchainError, Status.BAD_MODULE, "{target} code generation failed"),
    (CompileError, Status.BAD_MODULE, "IR module does not compile for {target}"),
)


def compile_status(exc: Exception) -> Status:
    """The :class:`Status` for an exception raised by :func:`vxpu.ir.compile.compile_module`.

    Raises:
        TypeError: ``exc`` is not an IR or compile error (a bug: let it propagate).
    """
    for cls, status, _ in COMPILE_ERRORS:
        if isinstance(exc, cls):
            return status
    raise TypeError(f"{type(exc).__name__} is not an IR compile error")


def compile_error(exc: Exception, target: str) -> BackendError:
    """The BackendError to raise for ``exc``; its log is the compiler's log (or the message).

    Args:
        exc: an ``IRError`` or ``CompileError``.
        target: what was being compiled for, for the message (``"x86"``, ``"nvptx"`` ...).

    Raises:
        TypeError: as :func:`compile_status`.
    """
    for cls, status, what in COMPILE_ERRORS:
        if isinstance(exc, cls):
            log = getattr(exc, "log", "") or str(exc)
            return BackendError(status, f"{what.format(target=target)}: {exc}", log=log)
    raise TypeError(f"{type(exc).__name__} is not an IR compile error")
