"""The compile cache: IR → native code, in memory (LRU) and on disk.

A compile is keyed by :func:`cache_key`: a sha256 over the canonical IR bytes, the resolved
target (kind, arch, features, code-object version), the options and every compiler version
that can change the output (vxpu, llvmlite/LLVM, nvJitLink, LLD). Two levels:

* **memory** — an LRU of ready objects (``CompiledModule``), so a hit costs one dict lookup;
* **disk** — one file per key under ``platformdirs.user_cache_dir("vxpu")/jit`` (or a given
  directory), sharded by the key's first byte.

A disk entry is never trusted: it starts with a header ::

    magic "VXPUJIT1" | key (32 bytes) | payload length (u64 LE) | sha256(payload) (32 bytes)

followed by the payload. A short, corrupt or foreign entry (its key differs from the one
asked for) is logged once at WARNING, deleted and reported as a miss, so the caller rebuilds
it. Writes go to a temporary file in the same directory and are published with
:func:`os.replace`, so readers see either nothing or a whole entry, also across processes.
The disk level is capped in bytes; the oldest entries (by modification time, refreshed on
every hit) are evicted first. All methods are thread-safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"VXPUJIT1"
_HEADER = struct.Struct("<8s32sQ32s")
HEADER_SIZE = _HEADER.size
DEFAULT_MEMORY_ENTRIES = 512
DEFAULT_DISK_BYTES = 1 << 30
#: A disk entry larger than this is refused (a cubin/hsaco/object of a kernel module is far smaller).
MAX_ENTRY_BYTES = 256 << 20


def cache_key(ir_digest: bytes, target: str, options: Iterable[tuple[str, object]], versions: str) -> bytes:
    """The 32-byte key of one compile.

    Args:
        ir_digest: sha256 of the canonical IR bytes.
        target: the resolved target's stable text (``TargetSpec.key()``).
        options: ``(name, value)`` pairs of compile options (opt level, features ...).
        versions: every relevant tool version (``toolchain_versions()``).
    """
    h = hashlib.sha256()
    h.update(b"vxpu-compile-v1\0")
    h.update(ir_digest)
    for part in (target, ";".join(f"{k}={v}" for k, v in sorted(options)), versions):
        data = part.encode()
        h.update(struct.pack("<I", len(data)))
        h.update(data)
    return h.digest()


def default_cache_dir() -> Path:
    """``jit/`` under vxpu's cache root (``$VXPU_CACHE`` or ``~/.cache/vxpu``)."""
    from vxpu.paths import cache_dir

    return cache_dir() / "jit"


@dataclass
class CacheStats:
    """Counters since the cache was created."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    stores: int = 0
    rejected: int = 0      # corrupt or foreign disk entries deleted
    evictions: int = 0     # disk entries removed by the size cap

    @property
    def hits(self) -> int:
        return self.memory_hits + self.disk_hits


class CompileCache:
    """A two-level (memory LRU + disk) cache of compiled modules.

    Args:
        directory: where disk entries live; ``None`` = :func:`default_cache_dir`; ``False`` =
            memory only.
        memory_entries: capacity of the in-memory LRU (objects).
        disk_bytes: cap on the total size of disk entries.
    """

    def __init__(self, directory: str | os.PathLike[str] | None | bool = None, *,
                 memory_entries: int = DEFAULT_MEMORY_ENTRIES, disk_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if directory is False:
            self.directory: Path | None = None
        elif directory is None or directory is True:
            self.directory = default_cache_dir()
        else:
            self.directory = Path(directory)
        self.memory_entries = max(0, memory_entries)
        self.disk_bytes = max(0, disk_bytes)
        self.stats = CacheStats()
        self._lru: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._disk_used: int | None = None
        self._building: dict[bytes, threading.Lock] = {}
        self._aliases: dict[bytes, Any] = {}

    # ------------------------------------------------------------------ memory level

    def get_memory(self, key: bytes) -> Any | None:
        """The in-memory object for ``key`` (counts a memory hit), or None (counts nothing)."""
        with self._lock:
            obj = self._lru.get(key)
            if obj is not None:
                self._lru.move_to_end(key)
                self.stats.memory_hits += 1
            return obj

    def get_alias(self, raw_key: bytes) -> Any | None:
        """The object remembered under a secondary key (e.g. a digest of raw wire bytes), or None.
        A hit counts as a memory hit."""
        obj = self._aliases.get(raw_key)
        if obj is not None:
            with self._lock:
                self.stats.memory_hits += 1
        return obj

    def put_alias(self, raw_key: bytes, obj: Any) -> None:
        """Remember ``obj`` under a secondary key (bounded like the LRU; cleared when full)."""
        if self.memory_entries == 0:
            return
        with self._lock:
            if len(self._aliases) >= 8 * self.memory_entries:
                self._aliases.clear()
            self._aliases[raw_key] = obj

    def put_memory(self, key: bytes, obj: Any) -> None:
        """Remember ``obj`` under ``key`` in the LRU (evicting the least recently used)."""
        if self.memory_entries == 0:
            return
        with self._lock:
            self._lru[key] = obj
            self._lru.move_to_end(key)
            while len(self._lru) > self.memory_entries:
                self._lru.popitem(last=False)

    # ------------------------------------------------------------------ both levels

    def get_or_build(self, key: bytes, build: Callable[[], Any], *, dump: Callable[[Any], bytes],
                     load: Callable[[bytes], Any]) -> Any:
        """Return the object for ``key``: from memory, else from disk (``load``), else ``build()``.

        A built object is serialised with ``dump`` and stored on disk. ``load`` may raise any
        exception for a payload it cannot use: the entry is then deleted and rebuilt.
        Exceptions from ``build`` propagate (nothing is cached).
        """
        obj = self.get_memory(key)
        if obj is not None:
            return obj
        # Single flight: concurrent requests for one key wait for the first builder.
        with self._lock:
            gate = self._building.setdefault(key, threading.Lock())
        with gate:
            try:
                return self._get_or_build_locked(key, build, dump, load)
            finally:
                with self._lock:
                    self._building.pop(key, None)

    def _get_or_build_locked(self, key: bytes, build: Callable[[], Any], dump: Callable[[Any], bytes],
                             load: Callable[[bytes], Any]) -> Any:
        with self._lock:
            obj = self._lru.get(key)
        if obj is not None:
            with self._lock:
                self.stats.memory_hits += 1
            return obj
        payload = self.get_disk(key)
        if payload is not None:
            try:
                obj = load(payload)
            except Exception as exc:  # noqa: BLE001 - an unusable entry is rebuilt, never trusted
                log.warning("compile cache entry %s unusable (%s); rebuilding", key.hex()[:16], exc)
                self._delete(key, counted=True)
                obj = None
            if obj is not None:
                with self._lock:
                    self.stats.disk_hits += 1
                self.put_memory(key, obj)
                return obj
        with self._lock:
            self.stats.misses += 1
        obj = build()
        self.put_memory(key, obj)
        self.put_disk(key, dump(obj))
        return obj

    # ------------------------------------------------------------------ disk level

    def _path(self, key: bytes) -> Path:
        assert self.directory is not None
        hx = key.hex()
        return self.directory / hx[:2] / hx

    def get_disk(self, key: bytes) -> bytes | None:
        """The verified payload stored for ``key``, or None (missing, corrupt or foreign)."""
        if self.directory is None or len(key) != 32:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_ENTRY_BYTES + HEADER_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("compile cache entry %s unreadable: %s", path, exc)
            return None
        problem = _check_entry(data, key)
        if problem:
            log.warning("compile cache entry %s rejected (%s); deleting it", path, problem)
            self._delete(key, counted=True)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return data[HEADER_SIZE:]

    def put_disk(self, key: bytes, payload: bytes) -> None:
        """Store ``payload`` under ``key`` atomically; failures are logged, never raised."""
        if self.directory is None or len(key) != 32 or len(payload) > MAX_ENTRY_BYTES:
            return
        path = self._path(key)
        header = _HEADER.pack(MAGIC, key, len(payload), hashlib.sha256(payload).digest())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(header)
                    f.write(payload)
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
        except OSError as exc:
            log.warning("compile cache: cannot write %s: %s", path, exc)
            return
        with self._lock:
            self.stats.stores += 1
            if self._disk_used is not None:
                self._disk_used += HEADER_SIZE + len(payload)
        self._enforce_cap()

    def _delete(self, key: bytes, *, counted: bool) -> None:
        if self.directory is not None:
            _unlink(self._path(key))
        with self._lock:
            self._lru.pop(key, None)
            if counted:
                self.stats.rejected += 1
            self._disk_used = None

    def _entries(self) -> list[tuple[float, int, Path]]:
        out: list[tuple[float, int, Path]] = []
        if self.directory is None or not self.directory.is_dir():
            return out
        for shard in self.directory.iterdir():
            if not shard.is_dir():
                continue
            for p in shard.iterdir():
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def _enforce_cap(self) -> None:
        with self._lock:
            used = self._disk_used
        if used is not None and used <= self.disk_bytes:
            return
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        evicted = 0
        if total > self.disk_bytes:
            for _, size, p in sorted(entries):
                if total <= self.disk_bytes * 0.9:
                    break
                _unlink(p)
                total -= size
                evicted += 1
        with self._lock:
            self._disk_used = total
            self.stats.evictions += evicted

    def clear(self) -> None:
        """Drop every entry, in memory and on disk."""
        with self._lock:
            self._lru.clear()
            self._aliases.clear()
            self._disk_used = None
        for _, _, p in self._entries():
            _unlink(p)


def _check_entry(data: bytes, key: bytes) -> str:
    """Why ``data`` is not a valid entry for ``key`` ('' if it is)."""
    if len(data) < HEADER_SIZE:
        return "truncated header"
    magic, stored_key, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return "bad magic"
    if stored_key != key:
        return "foreign entry (key mismatch)"
    if length != len(data) - HEADER_SIZE:
        return f"length {len(data) - HEADER_SIZE} != header {length}"
    if hashlib.sha256(memoryview(data)[HEADER_SIZE:]).digest() != digest:
        return "payload checksum mismatch"
    return ""


def _unlink(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
