"""The ``vxpu`` command line.

Each layer owns its sub-commands in its own ``cli`` module, which exposes
``register(subparsers) -> None``; the parsers it adds set ``func=callable(args) -> int``.
Layer ``cli`` modules must import heavy dependencies (llvmlite, CUDA, ONNX Runtime) inside
their command functions, never at module level, so that ``vxpu --help`` stays instant.

Errors: a :class:`vxpu.errors.Error` escaping a command prints one line ``vxpu: error: ...``
(the message names the fix) and exits 2; ``--debug`` shows the traceback. A command-line
mistake (unknown option, bad choice, missing value) is one line too, naming the ``--help``
that lists the right spelling, and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from vxpu import __version__, log
from vxpu.errors import Error

# (module, ...) whose register() adds sub-commands. Missing modules are skipped so that a
# partially installed tree still offers what it has.
_COMMAND_MODULES = (
    "vxpu.vfio_server.cli",   # serve
    "vxpu.images.cli",        # image, vm
    "vxpu.images.demo",       # demo
    "vxpu.qmp.cli",           # attach, detach, passthrough
    "vxpu.accel.cli",         # devices
    "vxpu.ir.cli",            # ir
)

_log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (sub-command parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every layer's sub-commands registered."""
    parser = _Parser(prog="vxpu", description="Virtual accelerators for QEMU guests.")
    parser.add_argument("--version", action="version", version=f"vxpu {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--log-format", default="text", choices=("text", "json"), help="log line format")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(args.log_level, args.log_format)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Error as exc:
        if args.debug:
            _log.exception("command failed")
        print(f"vxpu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
