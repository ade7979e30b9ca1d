"""Static import reading: the modules a Python source file imports, read with ``ast``, never run.

Two users need the same answer to "what does this module import?": the guest image, which
carries the import closure of the guest package (:func:`vxpu.images.guest.guest_files`), and
the layering test, which checks that no layer imports upward. Both count every import
statement, at module level or inside a function (a lazy import is still an edge), and resolve
relative imports against the importing module's name. Stdlib only.

::

    from vxpu.imports import imports_of
    for ref in imports_of(source, "vxpu.ir.compile"):
        ref.module, ref.names, ref.line, ref.lazy   # "vxpu.ir.cache", ("CompileCache", ...), 27, False
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

__all__ = ["ImportRef", "imports_of"]


@dataclass(frozen=True)
class ImportRef:
    """One imported module.

    Attributes:
        module: the absolute module name (``import a.b`` and ``from a.b import c`` give ``a.b``).
        names: for ``from`` imports, the names taken from it (each may be a submodule).
        line: the source line of the statement.
        lazy: the statement sits inside a function or class body (module-level ``if`` and
            ``try`` blocks are not lazy).
    """

    module: str
    names: tuple[str, ...]
    line: int
    lazy: bool


def imports_of(source: str, module: str, is_package: bool = False) -> list[ImportRef]:
    """Every import in ``source``, the text of module ``module``, in source order.

    Args:
        source: the module's Python source.
        module: its dotted name (relative imports resolve against it).
        is_package: ``source`` is the package's ``__init__.py``.

    Raises:
        SyntaxError: ``source`` does not parse.
        ValueError: a relative import climbs above the top-level package.
    """
    refs: list[ImportRef] = []
    _collect(ast.parse(source), False, module, is_package, refs)
    refs.sort(key=lambda r: r.line)
    return refs


def _collect(node: ast.AST, lazy: bool, module: str, is_package: bool, refs: list[ImportRef]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            refs += [ImportRef(alias.name, (), child.lineno, lazy) for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            target = _resolve(child.module or "", child.level, module, is_package)
            refs.append(ImportRef(target, tuple(a.name for a in child.names), child.lineno, lazy))
        else:
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            _collect(child, inner, module, is_package, refs)


def _resolve(name: str, level: int, module: str, is_package: bool) -> str:
    if level == 0:
        return name
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top-level package in {module}")
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))
