"""vfio-user wire format: constants, the 16-byte header and every command's payload struct.

This module is pure data: it packs and unpacks bytes and checks sizes, and never touches a
socket. Everything is little-endian (the x86 host order QEMU uses). Layouts follow QEMU's
``docs/interop/vfio-user.rst`` as spoken by QEMU 11.1.3 (see
``shared/reference/vfio-user-qemu-11.md``); parse functions raise
:class:`~vxpu.vfio_server.errors.ProtocolError` with the errno to reply with.
"""

from __future__ import annotations

import enum
import errno
import json
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from vxpu.vfio_server.errors import ProtocolError

# --- limits (per connection; named so that tests and docs can refer to them) -------------------
HEADER_SIZE = 16
MAX_DATA_XFER_SIZE = 1 << 20          # what we advertise: REGION_READ/WRITE and DMA chunk size
MAX_MSG_FDS = 8                       # fds we accept on one message (advertised as max_msg_fds)
MAX_RX_FDS = 64                       # ancillary buffer size; more than this is truncated by the kernel
MAX_DMA_MAPS = 4096                   # DMA map table entries per client (advertised as max_dma_maps)
MAX_VERSION_JSON = 4096               # client capability JSON, NUL included
MAX_WRITE_MULTI = 200                 # REGION_WRITE_MULTI entries (QEMU sends at most 200)
# The largest message we read into memory: a REGION_WRITE or DMA_READ reply of the maximum size.
MAX_MESSAGE_SIZE = HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE
PAGE_SIZE = 4096
U64_LIMIT = 1 << 64

VERSION_MAJOR = 0
VERSION_MINOR = 0


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# header flags
TYPE_MASK = 0xF
TYPE_COMMAND = 0
TYPE_REPLY = 1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

# DMA_MAP / DMA_UNMAP flags
DMA_READ_FLAG = 1
DMA_WRITE_FLAG = 2
DMA_MAP_FLAGS = DMA_READ_FLAG | DMA_WRITE_FLAG
DMA_UNMAP_GET_DIRTY_BITMAP = 1
DMA_UNMAP_ALL = 2

# DEVICE_GET_INFO flags
DEVICE_FLAGS_RESET = 1
DEVICE_FLAGS_PCI = 2

# GET_IRQ_INFO flags
IRQ_INFO_EVENTFD = 1
IRQ_INFO_MASKABLE = 2
IRQ_INFO_AUTOMASKED = 4
IRQ_INFO_NORESIZE = 8

# SET_IRQS flags
IRQ_DATA_NONE = 1
IRQ_DATA_BOOL = 2
IRQ_DATA_EVENTFD = 4
IRQ_ACTION_MASK = 8
IRQ_ACTION_UNMASK = 16
IRQ_ACTION_TRIGGER = 32
IRQ_DATA_MASK = IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_DATA_EVENTFD
IRQ_ACTION_MASK_ALL = IRQ_ACTION_MASK | IRQ_ACTION_UNMASK | IRQ_ACTION_TRIGGER

# region info capability
REGION_INFO_CAP_SPARSE_MMAP = 1
REGION_INFO_FLAG_CAPS = 8

# --- structs --------------------------------------------------------------------------------
HEADER = struct.Struct("<HHIII")            # id, command, size, flags, error
VERSION_HDR = struct.Struct("<HH")          # major, minor
DMA_MAP = struct.Struct("<IIQQQ")           # argsz, flags, offset, addr, size
DMA_UNMAP = struct.Struct("<IIQQ")          # argsz, flags, addr, size
DEVICE_INFO = struct.Struct("<IIII")        # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")      # argsz, flags, index, cap_offset, size, offset
CAP_HEADER = struct.Struct("<HHI")          # id, version, next
SPARSE_HDR = struct.Struct("<II")           # nr_areas, reserved
SPARSE_AREA = struct.Struct("<QQ")          # offset, size
IRQ_INFO = struct.Struct("<IIII")           # argsz, flags, index, count
SET_IRQS = struct.Struct("<IIIII")          # argsz, flags, index, start, count
REGION_ACCESS = struct.Struct("<QII")       # offset, region, count
DMA_ACCESS = struct.Struct("<QQ")           # address, count
WRITE_MULTI_HDR = struct.Struct("<Q")       # wr_cnt
WRITE_MULTI_ENTRY = struct.Struct("<QII8s")  # offset, region, count, data[8]


class Header(NamedTuple):
    """A parsed message header (a NamedTuple: built once per message, so it must be cheap)."""

    id: int
    command: int
    size: int
    flags: int
    error: int

    @property
    def type(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"cmd{self.command}"


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Unpack the first 16 bytes of a message (no validation beyond the length)."""
    return Header(*HEADER.unpack_from(data, 0))


def pack_header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return HEADER.pack(msg_id & 0xFFFF, command, size, flags, error)


def reply_header(req: Header, payload_len: int) -> bytes:
    """Header of a successful reply to ``req`` carrying ``payload_len`` payload bytes."""
    return HEADER.pack(req.id, req.command, HEADER_SIZE + payload_len, TYPE_REPLY, 0)


def error_header(req: Header, err: int) -> bytes:
    """A header-only ERROR reply to ``req``; ``err`` must be a positive errno."""
    return HEADER.pack(req.id, req.command, HEADER_SIZE, TYPE_REPLY | FLAG_ERROR, err or errno.EIO)


def need(body: bytes | bytearray | memoryview, size: int, what: str) -> None:
    """Raise EINVAL when ``body`` is shorter than ``size`` bytes."""
    if len(body) < size:
        raise ProtocolError(errno.EINVAL, f"{what}: payload of {len(body)} bytes, needs {size}")


def check_argsz(argsz: int, minimum: int, what: str) -> None:
    if argsz < minimum:
        raise ProtocolError(errno.EINVAL, f"{what}: argsz {argsz} < {minimum}")


# --- VERSION ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientCaps:
    """Capabilities a client announced in VERSION (with the spec's defaults)."""

    max_msg_fds: int = 1
    max_data_xfer_size: int = MAX_DATA_XFER_SIZE
    pgsizes: int = PAGE_SIZE
    max_dma_maps: int = 65535
    write_multiple: bool = False


_CAP_LIMITS = {
    "max_msg_fds": (1, 1 << 16),
    "max_data_xfer_size": (HEADER_SIZE, 1 << 30),
    "pgsizes": (PAGE_SIZE, U64_LIMIT - 1),
    "max_dma_maps": (1, 1 << 20),
}


def parse_version(body: bytes | bytearray | memoryview) -> tuple[int, int, ClientCaps]:
    """Parse a VERSION request: ``(major, minor, caps)``.

    Raises:
        ProtocolError: EINVAL for a short payload, missing NUL, bad JSON or bad types;
            E2BIG for JSON longer than MAX_VERSION_JSON.
    """
    need(body, VERSION_HDR.size, "VERSION")
    major, minor = VERSION_HDR.unpack_from(body, 0)
    raw = bytes(body[VERSION_HDR.size:])
    if not raw:
        return major, minor, ClientCaps()
    if len(raw) > MAX_VERSION_JSON:
        raise ProtocolError(errno.E2BIG, f"VERSION: {len(raw)} bytes of JSON (limit {MAX_VERSION_JSON})")
    if raw[-1] != 0:
        raise ProtocolError(errno.EINVAL, "VERSION: JSON string is not NUL-terminated")
    try:
        obj = json.loads(raw[:-1].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(errno.EINVAL, f"VERSION: malformed JSON ({type(exc).__name__})") from None
    return major, minor, _parse_caps(obj)


def _parse_caps(obj: Any) -> ClientCaps:
    if not isinstance(obj, dict):
        raise ProtocolError(errno.EINVAL, "VERSION: JSON is not an object")
    caps = obj.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError(errno.EINVAL, "VERSION: 'capabilities' is not an object")
    values: dict[str, Any] = {}
    for key, (lo, hi) in _CAP_LIMITS.items():
        if key not in caps:
            continue
        val = caps[key]
        if type(val) is not int or not lo <= val <= hi:
            raise ProtocolError(errno.EINVAL, f"VERSION: capability {key!r} must be an integer in [{lo}, {hi}]")
        values[key] = val
    if "write_multiple" in caps:
        if type(caps["write_multiple"]) is not bool:
            raise ProtocolError(errno.EINVAL, "VERSION: capability 'write_multiple' must be a boolean")
        values["write_multiple"] = caps["write_multiple"]
    if "migration" in caps and not isinstance(caps["migration"], dict):
        raise ProtocolError(errno.EINVAL, "VERSION: capability 'migration' must be an object")
    return ClientCaps(**values)


def server_caps_json(max_dma_maps: int = MAX_DMA_MAPS, full: bool = True) -> bytes:
    """Our capability JSON, NUL-terminated. ``full=False`` gives the minimal safe form."""
    caps: dict[str, int] = {"max_msg_fds": MAX_MSG_FDS, "max_data_xfer_size": MAX_DATA_XFER_SIZE}
    if full:
        caps["pgsizes"] = PAGE_SIZE
        caps["max_dma_maps"] = max_dma_maps
    return json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"


def build_version_payload(request_size: int) -> bytes:
    """The VERSION reply payload, no larger than the client's request (QEMU's receive buffer):
    the full capabilities, else the minimal ones, else the version alone (the JSON is optional;
    a client that sent less than that gets the spec's defaults). A parsed VERSION request is
    always at least ``HEADER_SIZE + 4`` bytes, so the version alone always fits."""
    version = VERSION_HDR.pack(VERSION_MAJOR, VERSION_MINOR)
    for full in (True, False):
        payload = version + server_caps_json(full=full)
        if HEADER_SIZE + len(payload) <= request_size:
            return payload
    return version


def client_version_payload(caps: dict[str, Any]) -> bytes:
    """A client's VERSION request payload (used by :mod:`vxpu.vfio_server.client`)."""
    text = json.dumps({"capabilities": caps}).encode() + b"\0"
    return VERSION_HDR.pack(VERSION_MAJOR, VERSION_MINOR) + text


def parse_server_version(body: bytes | memoryview) -> tuple[int, int, dict[str, Any]]:
    """Client side: parse a VERSION reply into ``(major, minor, capabilities dict)``.

    Raises:
        ProtocolError: EINVAL for a malformed reply.
    """
    need(body, VERSION_HDR.size, "VERSION reply")
    major, minor = VERSION_HDR.unpack_from(body, 0)
    raw = bytes(body[VERSION_HDR.size:])
    if not raw:
        return major, minor, {}
    if raw[-1] != 0:
        raise ProtocolError(errno.EINVAL, "VERSION reply: JSON is not NUL-terminated")
    try:
        obj = json.loads(raw[:-1])
    except ValueError:
        raise ProtocolError(errno.EINVAL, "VERSION reply: malformed JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("capabilities"), dict):
        raise ProtocolError(errno.EINVAL, "VERSION reply: no capabilities object")
    return major, minor, obj["capabilities"]


# --- GET_REGION_INFO --------------------------------------------------------------------------

def build_region_info(index: int, flags: int, size: int, offset: int,
                      sparse: list[tuple[int, int]] | None) -> bytes:
    """A full ``vfio_region_info`` reply, with a sparse-mmap capability when ``sparse`` is given.
    The ``argsz`` field holds the full length; the caller truncates to the request's argsz."""
    caps = b""
    cap_offset = 0
    if sparse is not None:
        flags |= REGION_INFO_FLAG_CAPS
        cap_offset = REGION_INFO.size
        caps = (CAP_HEADER.pack(REGION_INFO_CAP_SPARSE_MMAP, 1, 0) + SPARSE_HDR.pack(len(sparse), 0)
                + b"".join(SPARSE_AREA.pack(o, s) for o, s in sparse))
    argsz = REGION_INFO.size + len(caps)
    return REGION_INFO.pack(argsz, flags, index, cap_offset, size, offset) + caps


@dataclass(frozen=True)
class RegionInfoReply:
    """Client side: a decoded GET_REGION_INFO reply."""

    argsz: int
    flags: int
    index: int
    size: int
    offset: int
    sparse: tuple[tuple[int, int], ...] | None


def parse_region_info(body: bytes | memoryview) -> RegionInfoReply:
    """Client side: decode a GET_REGION_INFO reply and its sparse-mmap capability, if complete.

    Raises:
        ProtocolError: EINVAL for a short reply or a capability chain that leaves the buffer.
    """
    need(body, REGION_INFO.size, "GET_REGION_INFO reply")
    argsz, flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(body, 0)
    sparse = None
    seen = 0
    while flags & REGION_INFO_FLAG_CAPS and cap_offset and seen < 16:
        seen += 1
        if cap_offset + CAP_HEADER.size > len(body):
            break
        cap_id, _ver, nxt = CAP_HEADER.unpack_from(body, cap_offset)
        if cap_id == REGION_INFO_CAP_SPARSE_MMAP:
            base = cap_offset + CAP_HEADER.size
            need(body, base + SPARSE_HDR.size, "sparse mmap capability")
            nr, _ = SPARSE_HDR.unpack_from(body, base)
            need(body, base + SPARSE_HDR.size + nr * SPARSE_AREA.size, "sparse mmap areas")
            sparse = tuple(SPARSE_AREA.unpack_from(body, base + SPARSE_HDR.size + i * SPARSE_AREA.size)
                           for i in range(nr))
        cap_offset = nxt
    return RegionInfoReply(argsz, flags, index, size, offset, sparse)
