"""The NPU backend's runnable objects, shared by :mod:`vxpu.accel.npu` and :mod:`vxpu.accel.npu_graph`.

An :class:`OnnxKernel` is a graph with its I/O signature (:class:`Tensor`) and its sessions
per shape; a :class:`Plan` is one validated launch of it. ONNX modules build kernels in
``npu``; IR kernels that are elementwise maps are lowered to kernels in ``npu_graph``. Both
modules import these types from here, so neither imports the other's internals.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vxpu.accel.backend import KernelInfo

__all__ = ["OnnxKernel", "Plan", "Tensor"]


@dataclass
class Tensor:
    """One graph input or output: its name, dtype and dims (ints, or symbol names)."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int | str, ...]


@dataclass
class OnnxKernel:
    """A runnable graph: the model, its I/O signature and its sessions per shape."""

    info: KernelInfo
    model: Any                         # onnx.ModelProto
    inputs: list[Tensor]
    outputs: list[Tensor]
    symbols: tuple[str, ...]
    lowered: Any = None                # npu_graph.ElementwiseMap for IR kernels
    sessions: collections.OrderedDict[tuple[int, ...], tuple[Any, str]] = field(
        default_factory=collections.OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Plan:
    """A validated launch: concrete shapes and arena offsets."""

    kernel: OnnxKernel
    session: Any
    provider: str
    inputs: list[tuple[str, np.dtype[Any], tuple[int, ...], int]]
    outputs: list[tuple[str, np.dtype[Any], tuple[int, ...], int]]
    feeds: dict[str, np.ndarray] = field(default_factory=dict)   # scalar inputs of IR kernels
