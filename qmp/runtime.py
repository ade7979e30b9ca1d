"""State that outlives the CLI: which vxpu server serves which device of which VM.

Layout, under the runtime directory (``$VXPU_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/vxpu``,
else ``/run/vxpu`` as root, else ``/tmp/vxpu-<uid>``)::

    <runtime>/.locks/<vm>.lock    flock'd by the vxpu command working on this VM (holds its pid)
    <runtime>/<vm>/<id>.json      one :class:`DeviceRecord`, written atomically (tmp + rename)
    <runtime>/<vm>/<id>.sock      the server's vfio-user socket
    <runtime>/<vm>/<id>.log       the server's output
    <runtime>/<vm>/<id>.stats     the server's STATS JSON, rewritten every few seconds (``--stats-file``)

``<vm>`` is derived from the resolved QMP socket path, so every tool that reaches the VM
through the same socket finds the same records. vxpu commands take the VM's lock *before* they
connect to QMP: QEMU serves one QMP client at a time, so concurrent vxpu commands queue on the
lock instead of mistaking each other for a foreign client. Lock files are never deleted (an
unlinked lock file would let two processes hold "the" lock at once). A record stores the server's pid together
with its start time (``/proc/<pid>/stat`` field 22), so a recycled pid is never mistaken for
the server and never signalled.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vxpu.errors import ConfigError

log = logging.getLogger(__name__)

RECORD_VERSION = 1
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the NUL


def runtime_root() -> Path:
    """The runtime directory for sockets, logs and device records (not created here)."""
    if env := os.environ.get("VXPU_RUNTIME_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "vxpu"
    if os.geteuid() == 0:
        return Path("/run/vxpu")
    return Path(f"/tmp/vxpu-{os.geteuid()}")


def check_id(dev_id: str) -> str:
    """Return ``dev_id`` if it is a usable QEMU device id and file name.

    Raises:
        ConfigError: it is not (QEMU ids start with a letter; ours also name files).
    """
    if not _ID.match(dev_id):
        raise ConfigError(f"device id {dev_id!r} is not valid: use a letter followed by up to 63 letters, "
                          "digits, '.', '_' or '-' (e.g. vxpu0)")
    return dev_id


@dataclass
class DeviceRecord:
    """What vxpu knows about one device it attached.

    Attributes:
        id: the QEMU device id.
        qmp: the VM's QMP socket (resolved).
        qemu_pid: the QEMU process behind the QMP socket when attached (None if unknown).
        backend: the accelerator backend spec given to ``vxpu serve``.
        device: the device model (None: the server's default).
        pid: the server's pid; ``pid_start`` its start time in clock ticks since boot.
        socket: the server's vfio-user socket; ``log`` its output.
        state: ``starting`` (server spawned, not yet in the VM) or ``attached``.
        slot: the guest-visible PCI address (``bus:slot.fn``) once attached.
        bus: the QEMU bus it was plugged into.
        created: wall-clock time of the attach.
    """

    id: str
    qmp: str
    qemu_pid: int | None
    backend: str
    device: str | None
    pid: int
    pid_start: int | None
    socket: str
    log: str
    state: str = "starting"
    slot: str | None = None
    bus: str | None = None
    created: float = field(default_factory=time.time)
    version: int = RECORD_VERSION

    def to_json(self) -> dict[str, object]:
        """The record as a JSON-able dict."""
        return asdict(self)


class VmState:
    """The records of one VM, keyed by its QMP socket.

    Args:
        qmp_path: the VM's QMP socket.
        root: the runtime directory (default :func:`runtime_root`).
    """

    def __init__(self, qmp_path: str | Path, root: Path | None = None) -> None:
        self.qmp = str(Path(qmp_path).resolve())
        digest = hashlib.sha256(self.qmp.encode()).hexdigest()[:12]
        self.dir = (root or runtime_root()) / f"vm-{digest}"

    def paths(self, dev_id: str) -> tuple[Path, Path, Path]:
        """(record, socket, log) paths for ``dev_id``.

        Raises:
            ConfigError: the socket path would not fit in a Unix socket address.
        """
        check_id(dev_id)
        sock = self.dir / f"{dev_id}.sock"
        if len(str(sock)) > _SUN_PATH_MAX:
            raise ConfigError(f"socket path {sock} is longer than {_SUN_PATH_MAX} bytes; set VXPU_RUNTIME_DIR "
                              "to a shorter directory")
        return self.dir / f"{dev_id}.json", sock, self.dir / f"{dev_id}.log"

    def stats_path(self, dev_id: str) -> Path:
        """Where the server of ``dev_id`` writes its STATS document."""
        return self.dir / f"{check_id(dev_id)}.stats"

    def ensure_dir(self) -> None:
        """Create the VM's directory (mode 0700: sockets in it give control of a device)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def lock_path(self) -> Path:
        """This VM's lock file (outside the VM's folder, which goes away with its last device)."""
        return self.dir.parent / ".locks" / f"{self.dir.name}.lock"

    def try_lock(self) -> int | None:
        """Take this VM's lock without waiting: the locked fd (close it to unlock), or None when
        another process holds it. The holder's pid is written into the lock file."""
        self.lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def lock_holder(self) -> int | None:
        """The pid written by the process that holds (or last held) this VM's lock."""
        try:
            return int(self.lock_path.read_text() or "0") or None
        except (OSError, ValueError):
            return None

    def write(self, record: DeviceRecord) -> None:
        """Store ``record`` atomically (a reader sees the old or the new file, never a mix)."""
        path, _, _ = self.paths(record.id)
        self.ensure_dir()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(record.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def read(self, dev_id: str) -> DeviceRecord | None:
        """The record for ``dev_id``, or None. A corrupt record is logged and treated as absent."""
        path, _, _ = self.paths(dev_id)
        try:
            data = json.loads(path.read_text())
            data.pop("version", None)
            return DeviceRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable device record %s: %s", path, exc)
            return None

    def records(self) -> list[DeviceRecord]:
        """Every readable record of this VM, sorted by id."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            rec = self.read(path.stem) if _ID.match(path.stem) else None
            if rec is not None:
                out.append(rec)
        return out

    def remove(self, dev_id: str, keep_log: bool = False) -> None:
        """Delete the record, the socket and (unless ``keep_log``) the log of ``dev_id``."""
        record, sock, logf = self.paths(dev_id)
        for p in (sock, record, self.stats_path(dev_id)) + (() if keep_log else (logf,)):
            p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()  # only when no other device is left
        except OSError:
            pass


def pid_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, start: int | None) -> bool:
    """True while ``pid`` runs and is the process that started at ``start`` (zombies are dead).

    A zombie child of ours is reaped here.
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


def _listening_inodes() -> set[int]:
    inodes: set[int] = set()
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return inodes
    for line in lines:
        parts = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; Flags 0x10000 = __SO_ACCEPTCON (listening)
        if len(parts) >= 7 and int(parts[3], 16) & 0x10000:
            inodes.add(int(parts[6]))
    return inodes


def server_listening(pid: int, path: str | Path) -> bool:
    """True when ``path`` is a socket and process ``pid`` holds a listening Unix socket.

    It looks at /proc instead of connecting, so the server sees no stray client. (The name in
    /proc/net/unix cannot be matched against ``path``: ``vxpu serve`` binds in a private
    directory and renames the socket into place, so it appears already listening.)
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    inodes = _listening_inodes()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False
