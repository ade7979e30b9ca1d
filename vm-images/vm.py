"""Boot the guest image under QEMU with vfio-user devices, KVM when it works, TCG otherwise.

A :class:`Vm` starts QEMU with shared memfd guest RAM (``memory-backend-memfd,share=on``, so
the vxpu server can DMA straight into it), the serial console in a log file, a QMP socket, and
each device in JSON form. The guest runs one payload command (see :mod:`vxpu.images.guest`).

Acceleration: ``auto`` tries KVM when ``/dev/kvm`` is usable and watches the first seconds of
the boot. On the machines we run on, ``/dev/kvm`` is a nested software hypervisor that fails on
a stock Debian kernel ("KVM internal error", then QEMU hangs paused, or no progress at all), so
a KVM boot that reports an internal error or does not reach ``/init`` within
:data:`KVM_PROBE_S` is killed and the VM restarts under TCG. The verdict is remembered per
host boot, QEMU version and kernel, so later boots go straight to the accelerator that works.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from vxpu.images.cpio import CpioWriter
from vxpu.images.errors import VmError
from vxpu.images.guest import INIT_MARKER, GuestImage, encode_cmd
from vxpu.images.qemu import QemuBinary, cache_dir
from vxpu.qmp.errors import QmpError
from vxpu.qmp.monitor import Monitor

log = logging.getLogger(__name__)

ACCELS = ("auto", "kvm", "tcg")
KVM_PROBE_S = 12.0
_KVM_FAILURE = re.compile(r"KVM internal error|kvm run failed|emulation failure")
_EXIT = re.compile(r"^VXPU-EXIT (\d+)", re.MULTILINE)


def kvm_usable() -> tuple[bool, str]:
    """Whether ``/dev/kvm`` can be opened read-write, with the reason when not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return True, ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _verdict_key(qemu: QemuBinary, image: GuestImage) -> str:
    return f"{_boot_id()}/{qemu.version_str}/{image.base_key}"


def kvm_verdict(qemu: QemuBinary, image: GuestImage) -> dict[str, Any] | None:
    """The remembered KVM outcome for this host boot, QEMU and kernel (None: never tried)."""
    try:
        data = json.loads((cache_dir() / "kvm-verdict.json").read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(_verdict_key(qemu, image))
    return entry if isinstance(entry, dict) else None


def _record_verdict(qemu: QemuBinary, image: GuestImage, ok: bool, reason: str) -> None:
    path = cache_dir() / "kvm-verdict.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data = {k: v for k, v in data.items() if k.startswith(_boot_id())}
    data[_verdict_key(qemu, image)] = {"ok": ok, "reason": reason, "time": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))



def accel_line(accel: str, kvm_note: str) -> str:
    """How a VM's accelerator is shown: ``tcg`` or ``tcg (KVM unusable here: <why>)``."""
    return f"{accel} (KVM unusable here: {kvm_note})" if kvm_note else accel

class Console:
    """The guest's serial console, captured in a file that QEMU appends to.

    :meth:`wait_for` searches from a cursor that advances past each match, so a caller can
    wait for a sequence of lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._text = ""
        self._pos = 0
        self.cursor = 0

    @property
    def text(self) -> str:
        """Everything the guest printed so far (CRs removed)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except OSError:
            return self._text
        self._pos += len(chunk)
        self._text += chunk.decode(errors="replace").replace("\r", "")
        return self._text

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float,
                 alive: Callable[[], str | None] = lambda: None) -> re.Match[str]:
        """Wait until ``pattern`` (multi-line regex) appears after the cursor; advance past it.

        Args:
            pattern: the regex to find.
            timeout: seconds to wait.
            alive: returns a reason string when waiting is pointless (QEMU exited or failed).

        Raises:
            VmError: timeout, or ``alive`` reported a failure; the message has the log tail.
        """
        rx = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.cursor)
            if m:
                self.cursor = m.end()
                return m
            problem = alive()
            if problem:
                m = rx.search(self.text, self.cursor)
                if m:
                    self.cursor = m.end()
                    return m
                raise VmError(f"waiting for {rx.pattern!r}: {problem}", self._text[-3000:])
            if time.monotonic() > deadline:
                raise VmError(f"{rx.pattern!r} did not appear within {timeout:.0f}s", self._text[-3000:])
            time.sleep(0.05)


@dataclass
class VmSpec:
    """What to boot.

    Attributes:
        cmd: the payload shell command (None: an interactive shell on the console).
        memory: guest RAM size (QEMU syntax, e.g. ``512M``).
        accel: ``auto``, ``kvm`` or ``tcg``.
        devices: JSON device descriptions (see :func:`vxpu.qmp.devices.vfio_user_device`).
        reboot: let a guest reboot reset the machine instead of ending QEMU (``-no-reboot`` off).
        kernel_args: extra kernel command-line parameters.
        extra_args: extra QEMU arguments.
        stdio_console: console on the caller's terminal instead of a log file (interactive).
        extra_files: files added to the initramfs for this boot only (path inside the image ->
            bytes, e.g. a test program), appended as a second cpio archive in the workdir.
    """

    cmd: str | None = None
    memory: str = "512M"
    accel: str = "auto"
    devices: list[dict[str, Any]] = field(default_factory=list)
    reboot: bool = False
    kernel_args: str = ""
    extra_args: Sequence[str] = ()
    stdio_console: bool = False
    extra_files: dict[str, bytes] = field(default_factory=dict)


class Vm:
    """A running QEMU with the guest image.

    Args:
        qemu: the QEMU to run.
        image: kernel and initramfs.
        spec: what to boot.
        workdir: where the QMP socket and the logs go.

    Use as a context manager, or call :meth:`start` and :meth:`stop`; stop kills QEMU on
    every path.
    """

    def __init__(self, qemu: QemuBinary, image: GuestImage, spec: VmSpec, workdir: Path) -> None:
        if spec.accel not in ACCELS:
            raise VmError(f"unknown accelerator {spec.accel!r}; use one of {', '.join(ACCELS)}")
        self.qemu, self.image, self.spec, self.workdir = qemu, image, spec, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = workdir / "qmp.sock"
        self.console_path = workdir / "console.log"
        self.qemu_log_path = workdir / "qemu.log"
        self.console = Console(self.console_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitor: Monitor | None = None
        self.accel = ""
        self.kvm_note = ""
        self.started_at = 0.0

    def argv(self, accel: str) -> list[str]:
        """QEMU's command line for ``accel`` (``kvm`` or ``tcg``)."""
        kernel = self.image.kernel if accel == "kvm" or self.image.vmlinux is None else self.image.vmlinux
        append = "console=ttyS0 panic=-1 quiet"
        if self.spec.cmd is not None:
            append += " " + encode_cmd(self.spec.cmd)
        if self.spec.kernel_args:
            append += " " + self.spec.kernel_args
        args = ["-accel", accel, "-cpu", "max", "-m", self.spec.memory,
                "-object", f"memory-backend-memfd,id=mem,size={self.spec.memory},share=on",
                "-machine", "pc,memory-backend=mem", "-nographic", "-nic", "none",
                "-kernel", str(kernel), "-initrd", str(self._initrd()), "-append", append,
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if not self.spec.reboot:
            args.append("-no-reboot")
        for dev in self.spec.devices:
            args += ["-device", json.dumps(dev)]
        return self.qemu.argv(*args, *self.spec.extra_args)

    def _initrd(self) -> Path:
        """The image's initramfs, or a copy with :attr:`VmSpec.extra_files` appended."""
        if not self.spec.extra_files:
            return self.image.initrd
        path = self.workdir / "initrd-extra.cpio"
        if not path.exists():
            with path.open("wb") as f:
                with self.image.initrd.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
                w = CpioWriter(f)
                names = sorted(self.spec.extra_files)
                dirs = sorted({str(p) for n in names for p in Path(n).parents if str(p) != "."})
                for d in dirs:
                    w.directory(d)
                for name in names:
                    w.file(name, self.spec.extra_files[name], 0o755)
                w.close()
        return path

    def _launch(self, accel: str) -> None:
        self.qmp_path.unlink(missing_ok=True)
        self.console_path.write_bytes(b"")
        self.console = Console(self.console_path)
        argv = self.argv(accel)
        log.debug("qemu: %s", " ".join(argv))
        with self.qemu_log_path.open("ab") as err:
            out = None if self.spec.stdio_console else self.console_path.open("wb")
            try:
                self.proc = subprocess.Popen(argv, stdin=None if self.spec.stdio_console else subprocess.DEVNULL,
                                             stdout=out, stderr=err, env=self.qemu.environ(),
                                             start_new_session=not self.spec.stdio_console)
            finally:
                if out is not None:
                    out.close()
        self.accel = accel
        self.started_at = time.monotonic()
        try:
            self.monitor = Monitor(self.qmp_path, timeout=20.0)
        except QmpError as exc:
            try:
                rc: int | None = self.proc.wait(2)  # QEMU closes QMP when it exits on an error
            except subprocess.TimeoutExpired:
                rc = None
            if rc is not None:
                last = (self.qemu_log().strip().splitlines() or ["(no output)"])[-1]
                raise VmError(f"QEMU exited with status {rc} at start-up: {last}", self.log_tail()) from exc
            raise VmError(f"QEMU did not come up: {exc}", self.log_tail()) from exc

    def release_monitor(self) -> Path:
        """Close vxpu's QMP connection so another client (``vxpu attach``) can use the socket,
        which takes one client at a time; returns the socket path."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        return self.qmp_path

    def qemu_log(self) -> str:
        """QEMU's own stderr so far."""
        try:
            return self.qemu_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, limit: int = 3000) -> str:
        """The end of the console and of QEMU's stderr, for error messages."""
        return f"[console]\n{self.console.text[-limit:]}\n[qemu stderr]\n{self.qemu_log()[-limit:]}"

    def problem(self) -> str | None:
        """Why the VM cannot make progress (QEMU exited, KVM failed), or None while healthy."""
        if self.proc is None:
            return "QEMU is not running"
        rc = self.proc.poll()
        if rc is not None:
            return f"QEMU exited with status {rc}"
        if self.accel == "kvm" and _KVM_FAILURE.search(self.qemu_log() + self.console.text[-4000:]):
            return "KVM internal error: this host's KVM cannot run the guest; use --accel tcg"
        return None

    def _probe_kvm(self) -> str | None:
        """Watch a KVM boot until /init runs; returns the failure reason, or None if it works."""
        deadline = time.monotonic() + KVM_PROBE_S
        while time.monotonic() < deadline:
            if INIT_MARKER in self.console.text:
                return None
            reason = self.problem()
            if reason:
                return reason
            try:
                if self.monitor and self.monitor.status() == "internal-error":
                    return "KVM internal error: the VM stopped in state internal-error"
            except QmpError:
                pass
            time.sleep(0.2)
        return f"the guest did not reach /init within {KVM_PROBE_S:.0f}s under KVM"

    def start(self) -> Vm:
        """Start QEMU, choosing the accelerator as described in the module docstring.

        Raises:
            VmError: QEMU did not start, or KVM was requested explicitly and failed. QEMU is
                killed before the error propagates.
        """
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Vm:
        want = self.spec.accel
        if want == "auto":
            ok, why = kvm_usable()
            verdict = kvm_verdict(self.qemu, self.image) if ok else None
            if not ok or (verdict and not verdict["ok"]) or self.spec.stdio_console:
                if not ok:
                    self.kvm_note = why
                elif verdict:
                    self.kvm_note = f"{verdict['reason']}, seen on an earlier boot; --accel kvm tries again"
                else:
                    self.kvm_note = "not tried with an interactive console"
                want = "tcg"
        if want in ("auto", "kvm"):
            try:
                self._launch("kvm")
                reason = self._probe_kvm()
            except VmError as exc:  # QEMU refused KVM outright (no QMP socket appeared)
                reason = f"QEMU could not start with KVM: {self.qemu_log().strip()[-300:] or exc}"
            if reason is None:
                _record_verdict(self.qemu, self.image, True, "")
                log.info("VM running under KVM")
                return self
            _record_verdict(self.qemu, self.image, False, reason)
            if want == "kvm":
                raise VmError(f"KVM failed: {reason}", self.log_tail())
            log.warning("KVM failed (%s); falling back to TCG", reason)
            self.kvm_note = reason
            self._kill()
        self._launch("tcg")
        log.info("VM running under %s", accel_line("tcg", self.kvm_note))
        return self

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit (the guest powered off); returns its exit status.

        Raises:
            VmError: QEMU still runs after ``timeout`` seconds, or KVM failed meanwhile.
        """
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            problem = self.problem()
            if problem:
                raise VmError(problem, self.log_tail())
            if time.monotonic() > deadline:
                raise VmError(f"the guest did not power off within {timeout:.0f}s", self.log_tail())
            time.sleep(0.05)
        return self.proc.returncode

    def payload_status(self) -> int | None:
        """The payload's exit status printed by /init (``VXPU-EXIT n``), if it finished."""
        m = _EXIT.search(self.console.text)
        return int(m.group(1)) if m else None

    def _kill(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM) if not self.spec.stdio_console else self.proc.terminate()
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Kill QEMU if it still runs and close QMP; safe to call repeatedly."""
        self._kill()
        self.qmp_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
