"""The accelerator's native fast lane: the device model's common success path, in C.

The Python device model (:mod:`.commands`, :mod:`.poller`) costs 10-19 us of CPython per
LAUNCH or 64 KiB copy, several times the driver call itself (benchmarks/RESULTS.md, "H200,
issue 8 second round"). ``native/fastlane.c`` takes over the descriptors it can complete
successfully on its own, reading them straight from guest RAM, and the GIL is released while it
runs (a ctypes call), so the serve loop runs freely meanwhile:

* **NOP**, **LAUNCH** through a plan the executor made (:meth:`FastLane.add_plan`: kernel
  handle, dims words and argument bytes as key; the backend's fully packed parameter buffer,
  copied, as value), **MEM_COPY_HTOD / MEM_COPY_DTOH** with one inline SG entry in registered
  guest RAM into one allocation of the session, and **FENCE** (a wait without the guest-RAM
  lock, then the mapped fault record's claim word).
* Python stays the reference. On anything else — another opcode, a plan miss, an address
  outside the tables, the queue-depth quota, a driver error, a claimed fault record — the C
  code stops *before* that descriptor and the executor runs it with its ordinary code (a failed
  driver call had no effect, so doing it again is sound).
* The tables C reads are pushed from Python under :attr:`GuestRam.lock` and dropped whenever
  what they mirror moves: plans with the session's plan generation (checked before every call),
  guest RAM with its generation and registrations, allocations with the session's allocation
  version, the copy stream with the executor's queue.
* A run takes at most what Python validated (``sq_head`` .. ``sq_tail``, the free completion
  slots), plus what the guest posts while it runs: it re-reads ``sq_tail`` (at most 8 times,
  64 descriptors each) and takes more only while it is at most SQ_ENTRIES ahead and within the
  completion room Python validated; an invalid value is left to Python's validation. Its
  completions are written unpublished; the poller (:mod:`.poller_native`) publishes the group
  with one ``cq_tail`` store, after the copies' one wait, or hands it to Python's batch as held
  completions when Python runs the next descriptors, so grouping is the Python path's.
* After a run the poller applies the accounting Python would have done: the session's queue
  depth and statistics, the executor's ``queued``, the backend's launch counters and
  checked-kernel state, the device statistics (commands by opcode when the group is posted).

* The mapped fault record FENCE reads is the backend's: it tells the lane where it is, and
  withdraws it before freeing it, under its own lock and from any thread
  (``GpuBackend.native_watch_record``); C reads the claim word under a lock of its own, so a
  wait still running when the backend closes or resets never reads freed memory.

Only GPU backends with ``native_driver()`` (CUDA: libcuda's entry points; tests: ctypes fakes)
take part. The library is built at first use with the system ``cc`` into vxpu's cache
(``$VXPU_CACHE/native``), keyed by a hash of the source, the flags and the compiler; a cached
file is loaded only when it and its folder belong to this user and nobody else may write them
(a shared cache builds in a private temporary folder instead), and one that does not load is
built again. No compiler, a failed build or another backend leave the Python path alone,
logged once with the reason. ``vxpu serve --fastlane off`` or ``VXPU_FASTLANE=0`` turn it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from vxpu.accel.session import LaunchPlan, Session
from vxpu.vfio_server.xpu.guestram import GuestFault, GuestRam

from vxpu.abi import xpu as abi
from vxpu.paths import cache_dir

log = logging.getLogger(__name__)

ENV = "VXPU_FASTLANE"
POLL_ENV = "VXPU_FASTLANE_POLL"
TRACE_ENV = "VXPU_FASTLANE_TRACE"   # a file: the poll loop's timestamps, written when the lane closes
TRACE_CAP = 1 << 20
CFLAGS = ("-O2", "-shared", "-fPIC", "-std=c11", "-Wall", "-Wextra", "-Werror")
ABI = 11                         # fl_abi() of the source this module speaks to
GROUP = 256                      # FL_GROUP: completions one group holds at most
TAKES = 8                        # FL_TAKES: re-reads of sq_tail per call
MAX_PLANS = 256
MAX_PARAM_BYTES = 65536
MAX_PARAMS = 512

# why fl_run stopped
STOP_END, STOP_OTHER, STOP_MISS, STOP_ROOM, STOP_DRIVER, STOP_FENCE, STOP_SYNC_FIRST, STOP_FULL = range(8)

STOP_NAMES = {STOP_END: "end", STOP_OTHER: "other", STOP_MISS: "plan_miss", STOP_ROOM: "queue_room",
              STOP_DRIVER: "driver_error", STOP_FENCE: "fence", STOP_SYNC_FIRST: "sync_first", STOP_FULL: "full"}
_NAME_LAUNCH, _NAME_NOP, _NAME_HTOD, _NAME_DTOH = (abi.Opcode.LAUNCH.name, abi.Opcode.NOP.name,
                                                  abi.Opcode.MEM_COPY_HTOD.name, abi.Opcode.MEM_COPY_DTOH.name)
_NAME_FENCE = abi.Opcode.FENCE.name
_HTOD, _DTOH, _LAUNCH, _NOP = (int(abi.Opcode.MEM_COPY_HTOD), int(abi.Opcode.MEM_COPY_DTOH),
                               int(abi.Opcode.LAUNCH), int(abi.Opcode.NOP))
_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64


class Batch(ctypes.Structure):
    """``struct fl_batch``: one call's geometry (in), counters (in/out) and results (out)."""

    _fields_ = [("sq", _u64), ("cq", _u64), ("sq_mask", _u32), ("cq_mask", _u32), ("sq_head", _u32),
                ("cq_index", _u32), ("max", _u32), ("depth", _u32), ("pending", _u32), ("queued", _u32),
                ("group", _u32), ("syncs", _u32), ("launches", _u32), ("checked", _u32), ("nops", _u32),
                ("htods", _u32), ("dtohs", _u32), ("irq", _u32), ("g_launches", _u32), ("g_nops", _u32),
                ("g_htods", _u32), ("g_dtohs", _u32), ("bytes_htod", _u64), ("bytes_dtoh", _u64),
                ("consumed", _u32), ("stop", _u32), ("driver_error", ctypes.c_int32), ("python_run", _u32),
                ("stop_tag", _u64), ("stop_flags", _u32), ("pad", _u32), ("hdr", _u64), ("sq_entries", _u32),
                ("cq_room", _u32), ("reread", _u32), ("start", _u32), ("pad2", _u32), ("ntakes", _u32), ("takes", _u32 * TAKES), ("tags", _u64 * GROUP),
                ("ops", ctypes.c_uint16 * GROUP), ("flags", ctypes.c_uint16 * GROUP)]


#: why fl_poll returned (see native/fastpoll.c)
PR_IDLE, PR_QUIESCE, PR_INDEX, PR_POSTED, PR_HANDOFF, PR_GROUP, PR_BUDGET = range(7)
POLL_NAMES = {PR_IDLE: "idle", PR_QUIESCE: "quiesce", PR_INDEX: "index", PR_POSTED: "posted",
              PR_HANDOFF: "handoff", PR_GROUP: "group", PR_BUDGET: "budget"}


class Poll(ctypes.Structure):
    """``struct fl_poll``: one poll's limits (in), the device's ring indices (in/out) and what
    the poller accounts afterwards (out)."""

    _fields_ = [("first_ns", _u64), ("spin_ns", _u64), ("run_ns", _u64), ("cq_entries", _u32), ("irq", _u32),
                ("cq_tail", _u32), ("cq_head", _u32), ("completed", _u64), ("reason", _u32), ("posted", _u32),
                ("forced", _u32), ("batches", _u32), ("max_batch", _u32), ("depth", _u32), ("max_depth", _u32),
                ("waits", _u32), ("checked_after", _u32), ("launches", _u32), ("checked", _u32),
                ("c_launches", _u32), ("c_nops", _u32), ("c_htods", _u32), ("c_dtohs", _u32), ("c_fences", _u32),
                ("runs", _u32), ("taken", _u32), ("fence", _u32), ("pad", _u32), ("bytes_htod", _u64),
                ("bytes_dtoh", _u64), ("busy_ns", _u64), ("idle_ns", _u64), ("stops", _u32 * 8),
                ("trace", _u64), ("trace_cap", _u32), ("trace_len", _u32)]


class Region(ctypes.Structure):
    _fields_ = [("gpa", _u64), ("end", _u64), ("host", _u64), ("writable", _u32), ("registered", _u32)]


class Alloc(ctypes.Structure):
    _fields_ = [("start", _u64), ("size", _u64)]


#: The driver entry points fl_new takes, in order (``struct fl_driver``).
DRIVER_FIELDS = ("launch", "htod", "dtoh", "sync", "query")


class Driver(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in DRIVER_FIELDS]


# -- the library ---------------------------------------------------------------------------------
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_logged = False
_private: set[Path] = set()     # temporary build folders (see build)


#: The C sources of the fast lane (native/): the shared header, the tables and runs, the poll loop.
SOURCES = ("fastlane.h", "fastlane.c", "fastpoll.c")


def sources() -> dict[str, bytes]:
    """The C sources of the fast lane, by file name."""
    folder = importlib.resources.files("vxpu.vfio_server.xpu") / "native"
    return {name: (folder / name).read_bytes() for name in SOURCES}


def _compiler() -> tuple[str, str]:
    """``(path, version line)`` of the system C compiler.

    Raises:
        OSError: no ``cc`` on PATH (or ``$CC``), or it does not run.
    """
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise OSError("no C compiler (cc) on PATH")
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return cc, (out.stdout.splitlines() or [""])[0]


def _trusted(path: Path, folder: bool) -> bool:
    """Is ``path`` (not followed when a file) ours alone: a folder or regular file owned by this
    user that neither group nor others may write? Only such a cache entry is loaded: a library
    anyone else could have put there runs with the server's rights."""
    try:
        st = os.stat(path) if folder else os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def build(directory: Path | None = None, *, fresh: bool = False) -> Path:
    """Build the library (or find it built) under ``directory`` (default: ``$VXPU_CACHE/native``).

    The file name carries a hash of the source, the flags and the compiler, so a changed source
    or compiler builds anew; the build goes to a temporary file renamed into place (two
    processes building at once each rename a whole file). A cached file is used only when it
    and the folder are :func:`_trusted`; an untrusted file is built over, and in a folder
    others may write (a shared ``$VXPU_CACHE``) the build goes to a private temporary folder
    instead (:func:`load` deletes it once loaded). ``fresh``: build even when a file is there.

    Raises:
        OSError: no compiler, or the build failed (the message holds the compiler's output).
    """
    src = sources()
    cc, version = _compiler()
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + src[name] + b"\0")
    key = hashlib.sha256(digest.digest() + "\0".join((cc, version, *CFLAGS)).encode()).hexdigest()[:20]
    folder = directory or cache_dir() / "native"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _trusted(folder, True):
        log.warning("fast lane: the cache folder %s is not this user's alone; building in a private "
                    "temporary folder", folder)
        folder = Path(tempfile.mkdtemp(prefix="vxpu-fastlane-"))
        _private.add(folder)
    target = folder / f"fastlane-{key}.so"
    if not fresh and _trusted(target, False):
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for name, text in src.items():
            (Path(tmp) / name).write_bytes(text)
        out = Path(tmp) / "fastlane.so"
        c_files = [str(Path(tmp) / name) for name in SOURCES if name.endswith(".c")]
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", str(out), *c_files], capture_output=True, text=True,
                                  timeout=120, check=False)
        except subprocess.TimeoutExpired:
            raise OSError(f"{cc} took over 120 s") from None
        if proc.returncode != 0:
            raise OSError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(out, 0o755)
        os.replace(out, target)
    return target


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if (lib.fl_abi() != ABI or lib.fl_batch_size() != ctypes.sizeof(Batch)
            or lib.fl_poll_size() != ctypes.sizeof(Poll)):
        raise OSError(f"library ABI {lib.fl_abi()} / batch {lib.fl_batch_size()} / poll {lib.fl_poll_size()} "
                      f"bytes, expected {ABI} / {ctypes.sizeof(Batch)} / {ctypes.sizeof(Poll)}")
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded library, built at first use; None (and the reason in :func:`unavailable`)
    when it cannot be built or loaded here. A cached file that does not load (corrupt) is
    built again once. Never raises."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        try:
            if sys.byteorder != "little":
                raise OSError("the fast lane reads the little-endian ring layout natively")
            path = build()
            try:
                lib = _open(path)
            except (OSError, AttributeError) as exc:
                log.warning("fast lane: the cached library %s does not load (%s); building it again", path, exc)
                path = build(fresh=True)
                lib = _open(path)
            _lib = lib
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            _lib_error = str(exc)
        finally:
            while _private:
                shutil.rmtree(_private.pop(), ignore_errors=True)     # loaded (mapped) or not needed
        return _lib


def unavailable() -> str | None:
    """Why :func:`load` gave None (None while it has not failed)."""
    return _lib_error


def _declare(lib: ctypes.CDLL) -> None:
    p, vp = ctypes.POINTER, ctypes.c_void_p
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "fl_abi": (ctypes.c_int, []), "fl_batch_size": (ctypes.c_size_t, []), "fl_poll_size": (ctypes.c_size_t, []),
        "fl_new": (vp, [p(Driver)]), "fl_free": (None, [vp]), "fl_plans_clear": (None, [vp]),
        "fl_plan_add": (ctypes.c_int, [vp, p(_u64), ctypes.c_char_p, _u32, vp, vp, p(_u32), ctypes.c_char_p, _u32,
                                       p(_u32), _u32, _u32]),
        "fl_plan_count": (_u32, [vp]), "fl_set_regions": (ctypes.c_int, [vp, p(Region), _u32]),
        "fl_set_allocs": (ctypes.c_int, [vp, p(Alloc), _u32]), "fl_set_copy_stream": (None, [vp, vp, _u32]),
        "fl_set_fence": (None, [vp, _u32, _u64]), "fl_run": (_u32, [vp, vp]),       # (the batch by address)
        "fl_fence": (ctypes.c_int, [vp]), "fl_poll": (_u32, [vp, vp, vp]), "fl_halt": (None, [vp]),
        "fl_quiesce": (None, [vp]), "fl_resume": (None, [vp]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def wanted(setting: bool | None) -> bool:
    """Whether the fast lane should be used: ``setting`` (``vxpu serve --fastlane``) if given,
    else ``$VXPU_FASTLANE`` (``0``/``off`` turn it off), else on."""
    if setting is not None:
        return setting
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def poll_wanted() -> bool:
    """Whether the poller spins in the lane's C loop (:meth:`FastLane.poll`) instead of Python
    while the lane is on: yes, unless ``$VXPU_FASTLANE_POLL`` is ``0``/``off``/``no``/``false``
    (a measurement switch: the lane then runs only inside Python's cycles). Any value other
    than those and ``1``/``on``/``yes``/``true`` is logged (warning) and taken as on."""
    value = os.environ.get(POLL_ENV, "1").strip().lower()
    if value in ("0", "off", "no", "false"):
        return False
    if value not in ("1", "on", "yes", "true"):
        log.warning("%s=%r is not one of on/off, 1/0, yes/no, true/false; the poll loop stays on", POLL_ENV, value)
    return True


def create(backend: Any, setting: bool | None = None) -> FastLane | None:
    """A fast lane for ``backend``, or None (the Python path), logged once with the reason:
    turned off, a backend without native driver entry points, or no library here."""
    global _logged
    reason = None
    driver = None
    if not wanted(setting):
        reason = "turned off (--fastlane off / VXPU_FASTLANE=0)"
    else:
        native = getattr(backend, "native_driver", None)
        driver = native() if callable(native) else None
        if driver is None:
            reason = f"the {getattr(backend, 'name', '?')} backend has no native driver entry points"
        elif load() is None:
            reason = f"the native library is unavailable: {unavailable()}"
    if reason is not None or driver is None:
        if not _logged:
            log.info("accelerator fast lane off, commands run in Python: %s", reason)
            _logged = True
        return None
    assert _lib is not None
    lane = FastLane(_lib, backend, driver)
    if not _logged:
        log.info("accelerator fast lane on (native LAUNCH, NOP, inline copies, FENCE)")
        _logged = True
    return lane


def _count(commands: Counter[str], counts: tuple[tuple[str, int], ...]) -> None:
    for name, n in counts:
        if n:
            commands[name] += n


# -- one device's lane ---------------------------------------------------------------------------
class FastLane:
    """The native tables and calls of one device (see the module docstring). Poller thread only,
    with :attr:`GuestRam.lock` held, except :meth:`fence_wait`.

    Args:
        lib: the loaded library.
        backend: the GPU backend (its ``native_*`` methods).
        driver: the driver entry points, ``{name: address}`` for :data:`DRIVER_FIELDS`.
    """

    def __init__(self, lib: ctypes.CDLL, backend: Any, driver: dict[str, int]) -> None:
        self.lib = lib
        self.backend = backend
        self._driver = Driver(*(driver[name] for name in DRIVER_FIELDS))
        ctx = lib.fl_new(ctypes.byref(self._driver))
        if not ctx:
            raise OSError("fl_new refused the driver table")
        self._ctx = ctypes.c_void_p(ctx)
        self.batch = Batch()
        self._batch_ref = ctypes.addressof(self.batch)    # fl_run takes it as void*
        self._geometry: tuple[Any, ...] = ()               # the rings the batch holds now
        self._plan_key = (-1, -1, -1)      # plan generation (unique per session), queue, executor drops
        self._ram_key: tuple[Any, ...] = ()
        self._alloc_key: tuple[Session | None, int] = (None, -1)
        self._stream_key: tuple[Session | None, int] = (None, -1)
        self._rings_key: tuple[Any, int] | None = None
        self._rings_addr = (0, 0, 0)
        self.record = -1                   # the mapped fault record FENCE reads (0: none; -1: FENCE in Python)
        self.fences = True                 # take FENCEs natively where the record allows it
        self.runs = 0                      # statistics: calls, descriptors taken, hand-offs by reason
        self.taken = 0
        self.stops: dict[int, int] = {}
        self.polls: dict[int, int] = {}    # poll returns by PR_* reason
        self._poll = Poll()
        self._poll_ref = ctypes.addressof(self._poll)
        self._trace_path = os.environ.get(TRACE_ENV) or None
        if self._trace_path is not None:    # a diagnostic: {ns, what, n} entries (native/fastpoll.c TR_*)
            self._trace = (_u64 * (2 * TRACE_CAP))()
            self._poll.trace, self._poll.trace_cap = ctypes.addressof(self._trace), TRACE_CAP
        # The backend tells where its record is under its own lock, and withdraws it (-1) before
        # freeing it from any thread (a server closing while this lane waits in fl_fence).
        self._watch = getattr(backend, "native_watch_record", None)
        self._unwatch = getattr(backend, "native_unwatch_record", None)

    def close(self) -> None:
        """Free the native tables (idempotent); write the poll trace when one was asked for."""
        if self._trace_path is not None:
            self._write_trace(self._trace_path)
            self._trace_path = None
        if self._ctx:
            if callable(self._unwatch):
                self._unwatch(self._set_record)
            self.lib.fl_free(self._ctx)
            self._ctx = ctypes.c_void_p(0)

    def _write_trace(self, path: str) -> None:
        """``[[monotonic ns, what, n], ...]`` as JSON (what: TR_* of native/fastpoll.c)."""
        raw = self._trace
        entries = [[raw[2 * i], raw[2 * i + 1] & 0xFFFF_FFFF, raw[2 * i + 1] >> 32] for i in range(self._poll.trace_len)]
        try:
            with open(path, "w") as fh:
                json.dump(entries, fh)
        except OSError as exc:
            log.warning("fast lane: cannot write the poll trace to %s: %s", path, exc)

    # -- tables (lock held) ----------------------------------------------------------------
    def forget_plans(self) -> None:
        """Drop every native plan (the executor dropped its own)."""
        self.lib.fl_plans_clear(self._ctx)

    def prepare(self, session: Session, queue: int, drops: int, ram: GuestRam) -> bool:
        """Bring the tables up to date for a run on ``session``'s ``queue`` over ``ram``: plans
        are dropped when the plan generation, the queue or the executor's ``drops`` (its
        :attr:`~.commands.Executor.plan_drops`) moved, guest RAM and allocations pushed again
        when they changed. False when the lane cannot run now (a closed or lost session)."""
        try:
            generation = session.plan_generation()
            self.backend.native_ready()
        except Exception:                  # noqa: BLE001 -- closed or lost: the Python path says so
            return False
        if self._plan_key != (generation, queue, drops):
            self.forget_plans()
            self._plan_key = (generation, queue, drops)
        ram_key = (ram.generation, session, ram.unregistered)   # registrations move only with these
        if ram_key != self._ram_key:
            regions = ram.regions()
            table = (Region * max(1, len(regions)))(*(Region(r.addr, r.end, r.host_base, int(r.writable),
                                                             int(r.token is not None)) for r in regions))
            if self.lib.fl_set_regions(self._ctx, table, len(regions)):
                log.debug("fast lane: guest RAM table refused (%d regions)", len(regions))
            self._ram_key = ram_key
        version = session.allocation_version
        if self._alloc_key != (session, version):
            allocs = session.allocation_table()
            table2 = (Alloc * max(1, len(allocs)))(*(Alloc(s, n) for s, n in allocs))
            if self.lib.fl_set_allocs(self._ctx, table2, len(allocs)):
                log.debug("fast lane: allocation table refused (%d allocations)", len(allocs))
            self._alloc_key = (session, version)
        if self._stream_key != (session, queue):
            token = session.queue_token(queue)
            try:
                stream = self.backend.native_stream(token) if token is not None else None
            except Exception as exc:       # noqa: BLE001 -- no native copies: they stay in Python
                log.debug("fast lane: no native stream: %s", exc)
                stream = None
            self.lib.fl_set_copy_stream(self._ctx, stream or 0, int(stream is not None))
            self._stream_key = (session, queue)
        self.refresh_record()
        return True

    def refresh_record(self) -> None:
        """Tell C where the fault record is now (a context reset frees the old one): through
        the backend's :meth:`~vxpu.accel.gpubase.GpuBackend.native_watch_record`, so the
        address is read and pushed under the backend's lock, and withdrawn before it is freed."""
        if not self.fences:
            self._set_record(-1)
        elif callable(self._watch):
            self._watch(self._set_record)
        else:
            self._set_record(-1)           # no way to learn when it goes: FENCE stays in Python

    def _set_record(self, record: int) -> None:
        """The record C reads after a FENCE's wait (-1: none, the FENCE goes to Python)."""
        if not self.fences:
            record = -1
        if record != self.record:
            self.lib.fl_set_fence(self._ctx, int(record >= 0), max(record, 0))
            self.record = record

    def add_plan(self, key: tuple[int, int, int, int, int, bytes], plan: LaunchPlan, drops: int) -> None:
        """Executor hook: the LAUNCH ``key`` (kernel, dims words, queue, argument bytes) got
        ``plan`` (``drops``: the executor's plan drops); push the backend's packed launch for it
        (nothing when the backend has none). Plans of another generation go first."""
        kernel, a1, a2, a3, queue, blob = key
        if self._plan_key != (plan.generation, queue, drops):
            self.forget_plans()
            self._plan_key = (plan.generation, queue, drops)
        try:
            native = self.backend.native_launch(plan.kernel, plan.args, plan.bounds, plan.queue.token)
        except Exception as exc:           # noqa: BLE001 -- no native plan: the LAUNCH stays in Python
            log.debug("fast lane: no native launch for a plan: %s", exc)
            return
        if native is None:
            return
        func, stream, params, offsets, checked = native
        if len(params) > MAX_PARAM_BYTES or len(offsets) > MAX_PARAMS:
            return
        words = (_u64 * 4)(kernel, a1, a2, a3)
        dims = (_u32 * 7)(*plan.grid, *plan.block, plan.shared_bytes)
        offs = (_u32 * max(1, len(offsets)))(*offsets)
        args = (self._ctx, words, blob, len(blob), func, stream, dims, params, len(params), offs, len(offsets),
                int(checked))
        rc = self.lib.fl_plan_add(*args)
        if rc == -2:                       # full: start again, as the executor's own cache does
            self.forget_plans()
            rc = self.lib.fl_plan_add(*args)
        if rc:
            log.debug("fast lane: plan refused (%d)", rc)

    def statistics(self) -> dict[str, float]:
        """Flat metrics for STATS: runs, descriptors taken natively, plans, hand-offs by reason."""
        out: dict[str, float] = {"vxpu_fastlane_runs": self.runs, "vxpu_fastlane_taken": self.taken,
                                 "vxpu_fastlane_plans": self.plan_count}
        for stop, count in dict(self.stops).items():    # a copy: STATS may be read from another thread
            out[f"vxpu_fastlane_stop_{STOP_NAMES.get(stop, stop)}"] = count
        for reason, count in dict(self.polls).items():
            out[f"vxpu_fastlane_poll_{POLL_NAMES.get(reason, reason)}"] = count
        return out

    @property
    def plan_count(self) -> int:
        return int(self.lib.fl_plan_count(self._ctx))

    # -- runs (lock held) ------------------------------------------------------------------
    def ring_addresses(self, cfg: Any, ram: GuestRam) -> tuple[int, int, int] | None:
        """Host addresses of the submission ring, the completion ring and the header of the
        queue ``cfg`` (a :class:`~.queue.QueueConfig` the caller's :class:`~.queue.Rings`
        attached under this guest-RAM generation); None when they are not in guest RAM."""
        key = (cfg, ram.generation)
        if key != self._rings_key:
            try:
                sq, sq_off = ram.find(cfg.sq_base, abi.ring_bytes(cfg.sq_entries, abi.SQ_ENTRY_SIZE), False)
                cq, cq_off = ram.find(cfg.cq_base, abi.ring_bytes(cfg.cq_entries, abi.CQ_ENTRY_SIZE), True)
                hdr, hdr_off = ram.find(cfg.header, abi.QUEUE_HEADER_SIZE, True)
            except GuestFault:
                return None
            self._rings_addr = (sq.host_base + sq_off, cq.host_base + cq_off, hdr.host_base + hdr_off)
            self._rings_key = key
        return self._rings_addr

    def start_group(self, pending: int, queued: int, depth: int) -> None:
        """Start a group: the next :meth:`run` zeroes its counters; ``pending`` (the session
        queue's), ``queued`` (the executor's) and ``depth`` (the quota) are its accounting."""
        b = self.batch
        b.start = 1
        b.pending, b.queued, b.depth = min(pending, 0xFFFF_FFFF), min(queued, 0xFFFF_FFFF), min(depth, 0xFFFF_FFFF)

    def run(self, addrs: tuple[int, int, int], sq_mask: int, cq_mask: int, sq_entries: int, sq_head: int,
            cq_index: int, n: int, cq_room: int, reread: bool) -> Batch:
        """Take up to ``n`` descriptors from ``sq_head`` on (validated by the caller, inside the
        rings at host addresses ``addrs``: submission ring, completion ring, header); their
        completions go from ring index ``cq_index`` (the published ``cq_tail``) + the group's
        count on, unpublished. With ``reread``, also those the guest posts meanwhile while
        ``sq_tail`` is valid, within ``cq_room`` validated free completion slots (``b.max``
        grows; ``b.takes[:b.ntakes]`` are the extra takes). The batch says how many and why it
        stopped."""
        b = self._set_geometry(addrs, sq_mask, cq_mask, sq_entries)
        b.sq_head, b.cq_index, b.max, b.cq_room, b.reread = sq_head, cq_index, n, max(0, cq_room), int(reread)
        self.lib.fl_run(self._ctx, self._batch_ref)
        self.runs += 1
        self.taken += b.consumed
        self.stops[b.stop] = self.stops.get(b.stop, 0) + 1
        return b

    def _set_geometry(self, addrs: tuple[int, int, int], sq_mask: int, cq_mask: int, sq_entries: int) -> Batch:
        """The batch, holding these rings (host addresses, masks, size): set when they change."""
        b = self.batch
        geometry = (addrs, sq_mask, cq_mask, sq_entries)
        if geometry != self._geometry:      # the same queue: set once
            b.sq, b.cq, b.hdr = addrs
            b.sq_mask, b.cq_mask, b.sq_entries = sq_mask, cq_mask, sq_entries
            self._geometry = geometry
        return b

    def poll(self, addrs: tuple[int, int, int], rings: Any, first_s: float, spin_s: float, run_s: float,
             irq: bool) -> Poll:
        """Spin on the running queue ``rings`` (a :class:`~.queue.Rings` attached to the guest
        RAM the tables mirror, ``addrs`` its host addresses) and run what arrives natively,
        whole cycles at a time, without the guest-RAM lock and with the GIL released, until
        something is due in Python (native/fastpoll.c): nothing arrived for
        ``first_s`` (then ``spin_s`` after each batch), ``run_s`` passed, a posted group while
        ``irq``, a descriptor or an outcome for Python, or :meth:`halt` / :meth:`quiesce`. Call
        :meth:`start_group` and :meth:`resume` first, under the lock. Returns the poll (its
        ``reason``, the new ring indices, what to account); with PR_GROUP :attr:`batch` holds
        the open group as :meth:`run` leaves it."""
        cfg, p = rings.cfg, self._poll
        b = self._set_geometry(addrs, rings.sq_mask, rings.cq_mask, cfg.sq_entries)
        b.sq_head = rings.sq_head
        p.first_ns, p.spin_ns, p.run_ns = int(first_s * 1e9), int(spin_s * 1e9), int(run_s * 1e9)
        p.cq_entries, p.irq = cfg.cq_entries, int(irq)
        p.cq_tail, p.cq_head, p.completed = rings.cq_tail, rings.cq_head, rings.completed & 0xFFFF_FFFF_FFFF_FFFF
        self.lib.fl_poll(self._ctx, self._batch_ref, self._poll_ref)
        self.runs += p.runs
        self.taken += p.taken
        stops = self.stops
        for stop, count in enumerate(p.stops):
            if count:
                stops[stop] = stops.get(stop, 0) + count
        self.polls[p.reason] = self.polls.get(p.reason, 0) + 1
        return p

    def halt(self) -> None:
        """Any thread: a running :meth:`poll` returns at its next step (no wait)."""
        if self._ctx:
            self.lib.fl_halt(self._ctx)

    def quiesce(self) -> None:
        """Any thread, with :attr:`GuestRam.lock` held: :meth:`halt`, and wait until a running
        :meth:`poll` touches neither guest memory nor the tables any more (at most one
        descriptor's driver call; a device wait it is in goes on, touching neither). Until the
        poller's next :meth:`resume` nothing native touches them."""
        if self._ctx:
            self.lib.fl_quiesce(self._ctx)

    def resume(self) -> None:
        """The poller, under :attr:`GuestRam.lock`, right before :meth:`poll`."""
        self.lib.fl_resume(self._ctx)

    def fence_wait(self) -> bool:
        """FENCE's wait, without any lock (the GIL is released): True when the device finished
        with no driver error and the fault record is unclaimed (the FENCE then completes OK);
        False hands the FENCE to Python."""
        return not self.lib.fl_fence(self._ctx)

    def held(self, start: int, count: int) -> list[tuple[int, int, int, int, int, int, bool]]:
        """Completions ``start .. start + count`` of the group as the poller's held entries
        (for the rare path that rewrites them: an error or an abort surfaced while they waited)."""
        b = self.batch
        return [(b.tags[i], 0, 0, 0, b.ops[i], b.flags[i], b.ops[i] in (_HTOD, _DTOH))
                for i in range(start, start + count)]

    def count_commands(self, commands: Counter[str]) -> None:
        """Add the group's completions to ``commands`` (by opcode name, as DeviceStats counts)."""
        b = self.batch
        _count(commands, ((_NAME_LAUNCH, b.g_launches), (_NAME_NOP, b.g_nops), (_NAME_HTOD, b.g_htods),
                          (_NAME_DTOH, b.g_dtohs)))

    def count_polled(self, commands: Counter[str]) -> None:
        """Add the completions the last :meth:`poll` posted to ``commands`` (as
        :meth:`count_commands` does for a group)."""
        p = self._poll
        _count(commands, ((_NAME_LAUNCH, p.c_launches), (_NAME_NOP, p.c_nops), (_NAME_HTOD, p.c_htods),
                          (_NAME_DTOH, p.c_dtohs), (_NAME_FENCE, p.c_fences)))
