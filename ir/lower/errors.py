"""Errors raised while lowering and compiling IR to native code."""

from __future__ import annotations

from vxpu.errors import Error


class CompileError(Error):
    """The IR could not be compiled for the requested target.

    Attributes:
        log: compiler/linker log text, if any.
    """

    def __init__(self, message: str, *, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class ToolchainError(CompileError):
    """A native tool (LLVM, nvJitLink, LLD) is missing or failed; the message names the fix."""


class UnknownTargetError(ToolchainError):
    """The target kind, architecture or code-object version is not one the toolchain knows."""


class ToolMissingError(ToolchainError):
    """A native tool the target needs (nvJitLink, ld.lld) is not installed or cannot run here."""


class LoweringError(CompileError):
    """The IR uses something the lowering cannot express for this target."""
