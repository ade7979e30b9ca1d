"""Parsing of ``vxpu ir run`` launch shapes and kernel arguments, and printing of buffers.

The syntax (also in ``vxpu ir run --help``): one ``NAME=VALUE`` per kernel parameter. Scalars
are numbers parsed for the parameter's type (``0x`` hex, ``inf``, ``nan``); pointer parameters
get a buffer spec ``KIND:TYPE:SHAPE[:EXTRA]`` (zeros, ones, rand, arange, fill, list) or
``npy:PATH``. Every problem raises :class:`vxpu.errors.ConfigError` naming the argument and
the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vxpu.errors import ConfigError

from .model import Kernel
from .samples import Buf

__all__ = [
    "DTYPES",
    "MAX_BUFFER_BYTES",
    "buffer_json",
    "format_buffer",
    "parse_args",
    "parse_buffer",
    "parse_dims",
]

DTYPES = {"i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64, "f16": np.float16,
          "f32": np.float32, "f64": np.float64}
#: Largest buffer the CLI creates (the interpreter's arena holds all of them).
MAX_BUFFER_BYTES = 1 << 30


def parse_dims(text: str, what: str) -> tuple[int, int, int]:
    """``"4"``, ``"4x2"``, ``"4,2,1"`` → (x, y, z).

    Raises:
        ConfigError: not 1-3 positive integers.
    """
    parts = text.replace(",", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{what} {text!r} must be X, XxY or XxYxZ positive integers") from None
    if not 1 <= len(dims) <= 3 or any(d < 1 or d > 0x7FFFFFFF for d in dims):
        raise ConfigError(f"{what} {text!r} must be 1 to 3 integers in 1..2^31-1")
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def parse_args(kernel: Kernel, tokens: Sequence[str]) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Turn ``NAME=VALUE`` tokens into launch values (buffers as :class:`Buf`) and the buffers.

    Raises:
        ConfigError: a token without ``=``, an unknown or repeated name, a missing parameter,
            or a value that does not parse.
    """
    given: dict[str, str] = {}
    for tok in tokens:
        name, sep, value = tok.partition("=")
        if not sep or not name:
            raise ConfigError(f"argument {tok!r} must be NAME=VALUE (see vxpu ir run --help)")
        if name in given:
            raise ConfigError(f"argument {name} is given twice")
        given[name] = value
    names = [p.name or str(p.index) for p in kernel.params]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"kernel @{kernel.name} has no parameter {', '.join(unknown)}; "
                          f"its parameters are {', '.join(names)}")
    missing = [n for n in names if n not in given]
    if missing:
        raise ConfigError(f"missing argument(s) {', '.join(missing)} for kernel @{kernel.name}")
    values: list[Any] = []
    buffers: dict[str, np.ndarray] = {}
    for p, name in zip(kernel.params, names):
        if p.type.is_ptr:
            buffers[name] = parse_buffer(given[name], name)
            values.append(Buf(name))
        else:
            values.append(_scalar(given[name], p.type.is_float, name))
    return values, buffers


def _scalar(text: str, is_float: bool, name: str) -> int | float:
    try:
        if is_float:
            return float(text)
        return int(text, 0)
    except ValueError:
        kind = "a number" if is_float else "an integer"
        raise ConfigError(f"argument {name}={text!r} must be {kind}") from None


def _shape(text: str, name: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split("x"))
    except ValueError:
        raise ConfigError(f"argument {name}: shape {text!r} must be N or NxM...") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"argument {name}: shape {text!r} must be positive")
    return shape


def parse_buffer(spec: str, name: str) -> np.ndarray:
    """A buffer from its spec (see the module docstring).

    Raises:
        ConfigError: the spec does not parse, or the buffer is larger than MAX_BUFFER_BYTES.
    """
    kind, _, rest = spec.partition(":")
    if kind == "npy":
        try:
            arr = np.load(Path(rest), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"argument {name}: cannot load {rest!r}: {exc}") from None
        return np.ascontiguousarray(arr)
    tname, _, rest = rest.partition(":")
    dtype = DTYPES.get(tname)
    if dtype is None:
        raise ConfigError(f"argument {name}={spec!r}: element type must be one of {', '.join(DTYPES)}")
    if kind == "list":
        return _list(rest, dtype, name)
    shape_text, _, extra = rest.partition(":")
    shape = _shape(shape_text, name)
    count = math.prod(shape)
    if count * np.dtype(dtype).itemsize > MAX_BUFFER_BYTES:
        raise ConfigError(f"argument {name}: {count} elements exceed the CLI's {MAX_BUFFER_BYTES}-byte limit")
    return _make(kind, dtype, shape, extra, name, spec)


def _make(kind: str, dtype: Any, shape: tuple[int, ...], extra: str, name: str, spec: str) -> np.ndarray:
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if kind == "ones":
        return np.ones(shape, dtype)
    if kind == "arange":
        return np.arange(math.prod(shape)).astype(dtype).reshape(shape)
    if kind == "fill":
        value = _scalar(extra, np.dtype(dtype).kind == "f", name)
        return np.full(shape, value).astype(dtype)
    if kind == "rand":
        seed = int(_scalar(extra, False, name)) if extra else 0
        rng = np.random.default_rng(seed)
        if np.dtype(dtype).kind == "f":
            return rng.random(shape).astype(dtype)
        return rng.integers(0, 100, size=shape).astype(dtype)
    raise ConfigError(f"argument {name}={spec!r}: unknown buffer kind {kind!r}; "
                      "use zeros, ones, rand, arange, fill, list or npy")


def _list(text: str, dtype: Any, name: str) -> np.ndarray:
    is_float = np.dtype(dtype).kind == "f"
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"argument {name}: list needs at least one value (list:TYPE:1,2,3)")
    values = [_scalar(t.strip(), is_float, name) for t in items]
    try:
        return np.array(values).astype(dtype) if is_float else np.array(values, dtype=np.int64).astype(dtype)
    except OverflowError:
        raise ConfigError(f"argument {name}: a value does not fit {np.dtype(dtype).name}") from None


def _fmt(x: Any) -> str:
    if isinstance(x, np.floating):
        return str(x)            # shortest text that round-trips in the element's own type
    return str(int(x))


def format_buffer(name: str, arr: np.ndarray, limit: int | None) -> str:
    """``name: f32[1000] = [0.1, 0.2, ...]`` showing at most ``limit`` elements (None: all)."""
    flat = arr.reshape(-1)
    shown = flat if limit is None else flat[:limit]
    body = ", ".join(_fmt(v) for v in shown)
    if limit is not None and flat.size > limit:
        body += f", ... ({flat.size - limit} more)"
    tname = next((k for k, v in DTYPES.items() if np.dtype(v) == arr.dtype), str(arr.dtype))
    shape = "x".join(str(d) for d in arr.shape)
    return f"{name}: {tname}[{shape}] = [{body}]"


def buffer_json(arr: np.ndarray) -> dict[str, Any]:
    """A JSON-ready description of a buffer (NaN and infinities as the strings "nan", "inf", "-inf")."""
    if arr.dtype.kind == "f":
        data: list[Any] = [float(v) if math.isfinite(v) else str(float(v)) for v in arr.reshape(-1).tolist()]
    else:
        data = [int(v) for v in arr.reshape(-1).tolist()]
    tname = next((k for k, v in DTYPES.items() if np.dtype(v) == arr.dtype), str(arr.dtype))
    return {"dtype": tname, "shape": list(arr.shape), "data": data}
