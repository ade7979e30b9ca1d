"""Backend registry: turn a spec string such as ``"cuda:1"`` into an opened :class:`Backend`.

Spec grammar: ``NAME[:INDEX][,KEY=VALUE...]``, for example ``cpu``, ``cuda:1``, ``hip:0``,
``npu``, ``cpu,arena=4G,threads=8`` or ``npu,provider=cpu``. ``NAME`` selects the backend
class (:data:`BACKENDS`), ``INDEX`` the device (default 0), and the options are passed to the
backend's constructor as keyword arguments (values stay strings; the backend parses them and
names the bad one). Backend modules are imported lazily, so a missing vendor runtime only
matters when that backend is asked for: it then raises :class:`BackendUnavailable` with the
reason (missing package, no driver, no device ...).
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass

from vxpu.accel.backend import Backend, BackendError, BackendUnavailable

log = logging.getLogger(__name__)

# name -> (module, class). Each class is constructed as Class(index, **options), then opened.
BACKENDS: dict[str, tuple[str, str]] = {
    "cpu": ("vxpu.accel.cpu", "CpuBackend"),
    "cuda": ("vxpu.accel.cuda", "CudaBackend"),
    "hip": ("vxpu.accel.hip", "HipBackend"),
    "npu": ("vxpu.accel.npu", "NpuBackend"),
}

_SPEC = re.compile(r"^(?P<name>[a-z]+)(?::(?P<index>\d{1,4}))?(?P<opts>(?:,[a-z_]+=[^,=\s]+)*)$")


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec."""

    name: str
    index: int = 0
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in self.options)
        return f"{self.name}:{self.index}{opts}"


def parse_spec(spec: str) -> BackendSpec:
    """Parse ``NAME[:INDEX][,KEY=VALUE...]``.

    Raises:
        BackendUnavailable: for a malformed spec or an unknown backend name (the message lists
            the known ones).
    """
    m = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if not m:
        raise BackendUnavailable(f"bad backend spec {spec!r}; expected NAME[:INDEX][,KEY=VALUE...], "
                                 f"e.g. 'cpu', 'cuda:1', 'npu,provider=cpu'")
    name = m.group("name")
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    opts = tuple(tuple(item.split("=", 1)) for item in m.group("opts").split(",") if item)
    return BackendSpec(name, int(m.group("index") or 0), opts)  # type: ignore[arg-type]


def _backend_class(name: str) -> type:
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot be imported: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BackendUnavailable(f"backend module {module_name} has no class {class_name}")
    return cls  # type: ignore[no-any-return]


def open_backend(spec: str) -> Backend:
    """Construct and open the backend named by ``spec``.

    Raises:
        BackendUnavailable: malformed spec, unknown name, missing runtime or device, or bad
            options; the message says which.
    """
    parsed = parse_spec(spec)
    cls = _backend_class(parsed.name)
    try:
        backend = cls(parsed.index, **dict(parsed.options))
    except TypeError as exc:
        raise BackendUnavailable(f"bad options for backend {parsed.name!r}: {exc}") from exc
    except BackendError as exc:
        raise BackendUnavailable(f"backend {parsed}: {exc}") from exc
    try:
        backend.open()
    except BackendUnavailable:
        raise
    except BackendError as exc:
        raise BackendUnavailable(f"backend {parsed} failed to open: {exc}") from exc
    except Exception as exc:  # a vendor runtime raising something of its own
        log.debug("backend %s open failed", parsed, exc_info=True)
        raise BackendUnavailable(f"backend {parsed} failed to open: {type(exc).__name__}: {exc}") from exc
    log.info("opened backend %s", parsed)
    return backend  # type: ignore[no-any-return]


def probe_backends() -> dict[str, str | None]:
    """Try to open device 0 of every known backend; ``{name: None if it opened, else why not}``."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            backend = open_backend(name)
        except BackendError as exc:
            out[name] = str(exc)
            continue
        backend.close()
        out[name] = None
    return out


def available_backends() -> list[str]:
    """Names of the backends whose device 0 can be opened here, in :data:`BACKENDS` order."""
    return [name for name, why in probe_backends().items() if why is None]
