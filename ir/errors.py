"""Errors of the IR layer: every failure names where it happened.

The tree (the root, :class:`vxpu.errors.Error`, lives in ``vxpu/errors.py``)::

    vxpu.errors.Error
     └── IRError                 any IR failure (also: misuse of the builder API)
          ├── ParseError         text that is not valid .vxir; problems carry line:col
          ├── DecodeError        wire bytes that are not a valid VXIR encoding; carries the byte offset
          └── VerifyError        a well-formed module that breaks an IR rule; carries *every* problem

Each problem is a :class:`Problem` with a :class:`Location` (kernel, block, op index within the
block, and line:col when the module came from text). ``str(error)`` lists all of them, one per
line, so a guest sees every mistake at once instead of fixing them one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

from vxpu.errors import Error

__all__ = ["DecodeError", "IRError", "Location", "ParseError", "Problem", "VerifyError"]

#: At most this many problems are rendered into an error message (all stay in ``.problems``).
MAX_RENDERED_PROBLEMS = 50


@dataclass(frozen=True)
class Location:
    """Where a problem is: any field may be unknown (None).

    ``op`` is the index of the op inside its block (0-based); ``line``/``col`` are 1-based
    positions in .vxir text; ``offset`` is a byte offset into a binary encoding.
    """

    kernel: str | None = None
    block: str | None = None
    op: int | None = None
    line: int | None = None
    col: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        parts = []
        if self.line is not None:
            parts.append(f"{self.line}:{self.col if self.col is not None else 1}")
        if self.offset is not None:
            parts.append(f"byte {self.offset}")
        if self.kernel is not None:
            parts.append(f"kernel @{self.kernel}")
        if self.block is not None:
            parts.append(f"block ^{self.block}")
        if self.op is not None:
            parts.append(f"op {self.op}")
        return ", ".join(parts) if parts else "module"


@dataclass(frozen=True)
class Problem:
    """One problem: a location and a message that says what is wrong."""

    location: Location
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class IRError(Error):
    """Root of the IR errors. Raised directly for builder misuse and bad API arguments."""


class _ProblemsError(IRError):
    """An error that carries one or more located problems."""

    what = "IR error"

    def __init__(self, problems: list[Problem] | Problem) -> None:
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        shown = [str(p) for p in self.problems[:MAX_RENDERED_PROBLEMS]]
        hidden = len(self.problems) - len(shown)
        if hidden > 0:
            shown.append(f"... and {hidden} more")
        count = len(self.problems)
        head = f"{self.what}: {count} problem{'s' if count != 1 else ''}"
        super().__init__(head + "\n  " + "\n  ".join(shown))

    @property
    def messages(self) -> list[str]:
        """The bare messages, in order (handy in tests)."""
        return [p.message for p in self.problems]


class ParseError(_ProblemsError):
    """The text is not valid .vxir. Each problem carries ``line:col``; fix the text there."""

    what = "parse error"

    @property
    def line(self) -> int | None:
        """Line of the first problem."""
        return self.problems[0].location.line if self.problems else None

    @property
    def col(self) -> int | None:
        """Column of the first problem."""
        return self.problems[0].location.col if self.problems else None


class DecodeError(_ProblemsError):
    """The bytes are not a valid VXIR encoding (truncated, oversized, garbage or a newer version).

    Re-encode the module with this version of vxpu.ir (``vxpu.ir.binary.encode``).
    """

    what = "decode error"

    @property
    def offset(self) -> int | None:
        """Byte offset of the first problem."""
        return self.problems[0].location.offset if self.problems else None


class VerifyError(_ProblemsError):
    """A module that parsed or decoded fine breaks one or more IR rules; every one is listed."""

    what = "verification failed"
