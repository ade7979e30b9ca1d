"""The vxpu accelerator device ABI (0x5850:0x0100): registers, rings, commands and limits.

This module is the single definition of the accelerator's guest-visible contract; the prose
form is ``docs/device-abi.md`` §4. It is stdlib-only, so the guest SDK imports it unchanged in a
minimal VM. Everything is little-endian.

The data path lives in guest RAM, not in registers (a trapped register access costs a socket
round trip):

* A **queue header** (one 4 KiB-aligned page in guest RAM, :data:`QUEUE_HEADER_SIZE` bytes
  used) holds the ring indices and the need-wakeup flag. The guest writes ``sq_tail`` and
  ``cq_head``; the device writes ``sq_head``, ``cq_tail`` and ``flags``. Guest-written and
  device-written words sit on separate cache lines.
* A **submission ring** of :data:`SQ_ENTRY_SIZE`-byte descriptors and a **completion ring** of
  :data:`CQ_ENTRY_SIZE`-byte completions, each a power-of-two number of entries, each
  physically contiguous in guest RAM. Indices are free-running ``u32`` counters; the slot is
  ``index & (entries - 1)``.

The guest fills descriptors, stores the new ``sq_tail``, then reads ``flags``: only when
:data:`FLAG_NEED_WAKEUP` is set does it write :data:`REG_DOORBELL`. The device clears the flag
while it polls, sets it before it sleeps, and rechecks ``sq_tail`` after setting it; because
the two sides' store-then-load pairs are not fenced, the device also rechecks at least every
:data:`MAX_WAKEUP_LATENCY_MS` while asleep, so a missed doorbell costs at most that long.

Completions are written in submission order, one per descriptor, then ``cq_tail`` is advanced.
The device never overwrites a completion the guest has not consumed: when the completion ring
is full it stops taking descriptors until the guest advances ``cq_head``.
"""

from __future__ import annotations

import enum
import struct

from vxpu.abi.status import Status

# -- PCI identity ----------------------------------------------------------------------------
VENDOR_ID = 0x5850            # ASCII "XP"; not PCI-SIG registered (x-pci-vendor-id overrides)
DEVICE_ID = 0x0100
SUBSYSTEM_VENDOR_ID = 0x5850
SUBSYSTEM_ID = 0x0100
CLASS_CODE = 0x120000         # processing accelerator
REVISION = 1

# -- BARs ------------------------------------------------------------------------------------
BAR0_SIZE = 0x1000            # registers: 32-bit, non-prefetchable MMIO, trapped (never mmap-able)
MSI_VECTORS = 1               # vector 0: completions
MSIX_VECTORS = 2              # with the MSI-X option (cold-plug only): 0 completions, 1 fatal error
MSIX_TABLE_OFFSET = 0x800     # in BAR0
MSIX_PBA_OFFSET = 0xC00       # in BAR0

# -- BAR0 registers (32-bit; 64-bit addresses as LO/HI pairs, LO first) ------------------------
REG_MAGIC = 0x00              # RO  MAGIC_VALUE
REG_VERSION = 0x04            # RO  (major << 16) | minor
REG_FEATURES_LO = 0x08        # RO  Feature bits 0-31
REG_FEATURES_HI = 0x0C        # RO  Feature bits 32-63
REG_STATUS = 0x10             # RO  DeviceStatus bits
REG_FATAL_CODE = 0x14         # RO  FatalCode of the fatal error (0 when not fatal)
REG_FATAL_INFO = 0x18         # RO  detail of the fatal error (the offending index or value)
REG_CONTROL = 0x1C            # WO  Control bits (reads 0)
REG_QUEUE_BASE_LO = 0x20      # RW  guest-physical address of the queue header (4 KiB aligned)
REG_QUEUE_BASE_HI = 0x24
REG_SQ_BASE_LO = 0x28         # RW  guest-physical address of the submission ring (SQ_ENTRY_SIZE aligned)
REG_SQ_BASE_HI = 0x2C
REG_CQ_BASE_LO = 0x30         # RW  guest-physical address of the completion ring (CQ_ENTRY_SIZE aligned)
REG_CQ_BASE_HI = 0x34
REG_SQ_ENTRIES = 0x38         # RW  power of two, MIN_RING_ENTRIES..MAX_RING_ENTRIES
REG_CQ_ENTRIES = 0x3C         # RW  power of two, >= SQ entries, <= MAX_RING_ENTRIES
REG_QUEUE_ENABLE = 0x40       # RW  1: validate the configuration and start; 0: stop (drains first)
REG_DOORBELL = 0x44           # WO  any value: new descriptors (only needed when FLAG_NEED_WAKEUP is set)
REG_IRQ_CONTROL = 0x48        # RW  IrqControl bits
REG_IRQ_COALESCE_COUNT = 0x4C  # RW  raise the interrupt after this many completions (0 counts as 1)
REG_IRQ_COALESCE_USEC = 0x50  # RW  ... or this long after the first unsignalled completion (0: at once)
REG_MAX_RING_ENTRIES = 0x54   # RO  MAX_RING_ENTRIES
REG_RESET_COUNT = 0x58        # RO  device resets seen (survives reset on purpose)
REG_SCRATCH = 0x5C            # RW  no effect; a trapped-access probe for drivers and benchmarks

MAGIC_VALUE = 0x55505856      # b"VXPU" read as a little-endian u32
ABI_MAJOR = 1
ABI_MINOR = 0
VERSION_VALUE = (ABI_MAJOR << 16) | ABI_MINOR


class DeviceStatus(enum.IntFlag):
    """REG_STATUS bits."""

    ENABLED = 0x1             # the queue is configured and the device is taking descriptors
    FATAL = 0x2               # a fatal error stopped the queue: read REG_FATAL_CODE, then reset
    BUS_MASTER = 0x4          # PCI bus mastering is on (the device does no DMA without it)


class Control(enum.IntFlag):
    """REG_CONTROL bits (write-only)."""

    RESET = 0x1               # drop every allocation, module, event and in-flight command; clear FATAL


class IrqControl(enum.IntFlag):
    """REG_IRQ_CONTROL bits."""

    COMPLETION = 0x1          # raise vector 0 for completions (with coalescing)
    FATAL = 0x2               # raise the fatal vector (vector 1 with MSI-X, else vector 0) on a fatal error


class FatalCode(enum.IntEnum):
    """Why the device stopped (REG_FATAL_CODE). Only RESET clears it."""

    NONE = 0
    BAD_QUEUE_CONFIG = 1      # QUEUE_ENABLE with bad sizes, misaligned or unmapped ring memory
    BAD_SQ_TAIL = 2           # sq_tail ran more than SQ entries ahead of sq_head (FATAL_INFO: sq_tail)
    BAD_CQ_HEAD = 3           # cq_head moved past cq_tail or behind the previous cq_head (FATAL_INFO: cq_head)
    RING_UNMAPPED = 4         # ring or header memory was unmapped (DMA_UNMAP) while the queue ran
    NO_BUS_MASTER = 5         # bus mastering was turned off while the queue ran


class ConfigProblem(enum.IntEnum):
    """REG_FATAL_INFO when REG_FATAL_CODE is BAD_QUEUE_CONFIG: what QUEUE_ENABLE refused."""

    RING_SIZE = 1             # an entry count is not a power of two in MIN..MAX_RING_ENTRIES
    CQ_TOO_SMALL = 2          # CQ entries < SQ entries
    ALIGNMENT = 3             # header not 4 KiB aligned, or a ring not aligned to its entry size
    HEADER = 4                # the queue header is not inside one writable DMA map of guest RAM
    SQ = 5                    # the submission ring is not inside one DMA map of guest RAM
    CQ = 6                    # the completion ring is not inside one writable DMA map of guest RAM


class Feature(enum.IntFlag):
    """REG_FEATURES bits: what this device accepts. Bits not listed are reserved (0)."""

    IR = 1 << 0               # MODULE_LOAD of vxpu IR modules (always set)
    CHECKED_IR = 1 << 1       # IR kernels are bounds-checked per buffer (KERNEL_FAULT, never a host fault)
    PTX = 1 << 2              # native PTX modules (opt-in by the host operator, unchecked)
    CUBIN = 1 << 3            # native cubin modules (opt-in, unchecked)
    HSACO = 1 << 4            # native hsaco modules (opt-in, unchecked)
    ONNX = 1 << 5             # ONNX models and INFER (NPU hosts)
    EVENTS = 1 << 6           # EVENT_* commands with device timestamps
    INDIRECT_SG = 1 << 7      # scatter-gather lists in guest memory (DescFlags.SG_INDIRECT)
    MSIX = 1 << 8             # an MSI-X capability is offered (cold-plug only)
    ERROR_COUNT = 1 << 9      # the queue header's QH_ERRORS counts non-OK completions


# -- queue header (in guest RAM) ---------------------------------------------------------------
QUEUE_HEADER_SIZE = 256
QUEUE_HEADER_ALIGN = 4096
QH_SQ_TAIL = 0x00             # u32, guest writes: descriptors [sq_head, sq_tail) are submitted
QH_CQ_HEAD = 0x04             # u32, guest writes: completions [cq_head, cq_tail) are still unread
QH_SQ_HEAD = 0x40             # u32, device writes: descriptors consumed
QH_CQ_TAIL = 0x44             # u32, device writes: completions written
QH_FLAGS = 0x48               # u32, device writes: QueueFlags
QH_COMPLETED = 0x50           # u64, device writes: completions posted since the queue was enabled
QH_ERRORS = 0x58              # u32, device writes: of them, those with a status other than OK (Feature.ERROR_COUNT)
FLAG_NEED_WAKEUP = 0x1        # the device is asleep: write REG_DOORBELL after advancing sq_tail
MAX_WAKEUP_LATENCY_MS = 10    # upper bound on a missed doorbell's cost (see the module docstring)

# -- rings -----------------------------------------------------------------------------------
MIN_RING_ENTRIES = 2
MAX_RING_ENTRIES = 4096
SQ_ENTRY_SIZE = 64
CQ_ENTRY_SIZE = 32
INDEX_MASK = 0xFFFF_FFFF

#: Submission descriptor (64 bytes):
#:   0 u16 opcode        2 u16 flags (DescFlags)   4 u32 sg_count
#:   8 u64 tag (echoed in the completion)
#:  16 u64 args[4]       command-specific (see Opcode)
#:  48 u64 sg_addr       inline: the one segment's address; SG_INDIRECT: the SG list's address
#:  56 u64 sg_len        inline: the one segment's length;  SG_INDIRECT: must be 0
DESCRIPTOR = struct.Struct("<HHIQ4QQQ")
#: Completion (32 bytes): 0 u64 tag, 8 u64 result, 16 u64 result2, 24 u32 status, 28 u32 reserved (0).
COMPLETION = struct.Struct("<QQQII")
#: In a KERNEL_FAULT, DEVICE_LOST or TIMEOUT completion's result2: the failure reset the device
#: context and dropped this guest's allocations, modules and events. Clear: they are intact
#: (a checked IR kernel's out-of-bounds access is stopped before it happens; the context stays).
CPL_STATE_DROPPED = 0x1
#: One scatter-gather entry of an indirect list (16 bytes): guest-physical address, length.
SG_ENTRY = struct.Struct("<QQ")
assert DESCRIPTOR.size == SQ_ENTRY_SIZE and COMPLETION.size == CQ_ENTRY_SIZE


class DescFlags(enum.IntFlag):
    """Descriptor flag bits. Any other bit set is BAD_DESCRIPTOR."""

    SG_INDIRECT = 0x1         # sg_addr points to sg_count SG_ENTRY records in guest memory
    IRQ = 0x2                 # raise the completion interrupt for this command (ignoring coalescing)


DESC_FLAGS_MASK = int(DescFlags.SG_INDIRECT | DescFlags.IRQ)


class Opcode(enum.IntEnum):
    """Commands. ``args`` are the descriptor's four u64 arguments; "SG" is its scatter-gather
    list (guest memory the command reads or writes); results go to the completion."""

    NOP = 0x00                # no effect; completes OK (ring round-trip probe)
    IDENTIFY = 0x01           # SG: buffer for the identity JSON (UTF-8). result: bytes written
    MEM_ALLOC = 0x10          # args[0] size (bytes, > 0). result: device address of the allocation
    MEM_FREE = 0x11           # args[0] device address returned by MEM_ALLOC
    MEM_SET = 0x12            # args[0] device address, args[1] byte value (0-255), args[2] length
    MEM_COPY_HTOD = 0x13      # args[0] device address; SG: source in guest RAM (total = length)
    MEM_COPY_DTOH = 0x14      # args[0] device address; SG: destination in guest RAM (total = length)
    MEM_COPY_DTOD = 0x15      # args[0] destination, args[1] source device address, args[2] length
    MODULE_LOAD = 0x20        # args[0] ModuleKind; SG: the image. result: module handle
    MODULE_UNLOAD = 0x21      # args[0] module handle
    KERNEL_GET = 0x22         # args[0] module handle; SG: kernel name (UTF-8). result: kernel handle,
                              #   result2: packed argument size in bytes
    LAUNCH = 0x30             # args[0] kernel handle; args[1] grid x | grid y << 32;
                              #   args[2] grid z | block x << 32; args[3] block y | block z << 16 |
                              #   dynamic shared bytes << 32; SG: argument blob (KernelSignature layout)
    FENCE = 0x40              # completes when all earlier work finished; reports the first
                              #   asynchronous error since the previous FENCE (KERNEL_FAULT, TIMEOUT ...)
    EVENT_CREATE = 0x41       # result: event handle
    EVENT_DESTROY = 0x42      # args[0] event handle
    EVENT_RECORD = 0x43       # args[0] event handle: timestamp after all earlier work
    EVENT_QUERY = 0x44        # args[0] event handle. result: 1 when reached, 0 when pending
    EVENT_ELAPSED = 0x45      # args[0] start, args[1] end event. result: elapsed nanoseconds
    INFER = 0x50              # args[0] ONNX module handle; SG: request JSON (see docs §4.6). result: 0
    STATS = 0x60              # SG: buffer for the statistics JSON. result: bytes written
    RESET = 0x70              # drop every allocation, module and event of this guest (like Control.RESET,
                              #   but keeps the queue running)


class ModuleKind(enum.IntEnum):
    """MODULE_LOAD args[0]. Only IR is on by default; each other kind needs its feature bit."""

    IR = 0                    # vxpu IR binary (vxpu.ir.encode); verified, compiled, bounds-checked
    PTX = 1                   # Feature.PTX
    CUBIN = 2                 # Feature.CUBIN
    HSACO = 3                 # Feature.HSACO
    ONNX = 4                  # Feature.ONNX


# -- limits ----------------------------------------------------------------------------------
MAX_INLINE_SG_COUNT = 1       # an inline list has sg_count 0 (no data) or 1
MAX_SG_ENTRIES = 4096         # entries in one indirect list
MAX_TRANSFER_BYTES = 1 << 32  # bytes one command may move (sum of its SG lengths)
MAX_ARG_BYTES = 4096          # a LAUNCH argument blob
MAX_NAME_BYTES = 255          # a KERNEL_GET name
MAX_IDENTIFY_BYTES = 4096     # IDENTIFY / STATS replies are at most this long (JSON)
MAX_STATS_BYTES = 65536
MAX_GRID_DIM = 0xFFFF_FFFF    # per axis
MAX_BLOCK_DIM = 0xFFFF        # per axis (the backend's threads-per-block limit applies too)


def pack_launch_dims(grid: tuple[int, int, int], block: tuple[int, int, int],
                     dynamic_shared: int) -> tuple[int, int, int]:
    """LAUNCH's ``args[1:4]`` for a grid, a block and the dynamic shared-memory size.

    Raises:
        ValueError: a dimension or the shared size does not fit its field.
    """
    gx, gy, gz = grid
    bx, by, bz = block
    if not all(0 <= g <= MAX_GRID_DIM for g in grid) or not all(0 <= b <= MAX_BLOCK_DIM for b in block):
        raise ValueError(f"grid {grid} or block {block} does not fit the LAUNCH descriptor")
    if not 0 <= dynamic_shared <= 0xFFFF_FFFF:
        raise ValueError(f"dynamic shared memory {dynamic_shared} does not fit in 32 bits")
    return gx | gy << 32, gz | bx << 32, by | bz << 16 | dynamic_shared << 32


def unpack_launch_dims(a1: int, a2: int, a3: int) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """The inverse of :func:`pack_launch_dims`: ``(grid, block, dynamic_shared)``.

    Nothing is reserved, so every 64-bit pattern decodes; block x keeps all 32 bits it was given,
    so an oversized value reaches the device's validation instead of being truncated.
    """
    grid = (a1 & INDEX_MASK, a1 >> 32, a2 & INDEX_MASK)
    block = (a2 >> 32, a3 & MAX_BLOCK_DIM, a3 >> 16 & MAX_BLOCK_DIM)
    return grid, block, a3 >> 32


def ring_bytes(entries: int, entry_size: int) -> int:
    """Bytes of a ring of ``entries`` entries of ``entry_size`` bytes."""
    return entries * entry_size


def is_valid_ring_size(entries: int) -> bool:
    """True for a power of two in ``MIN_RING_ENTRIES..MAX_RING_ENTRIES``."""
    return MIN_RING_ENTRIES <= entries <= MAX_RING_ENTRIES and entries & (entries - 1) == 0


__all__ = [
    "ABI_MAJOR", "ABI_MINOR", "COMPLETION", "DESCRIPTOR", "SG_ENTRY", "ConfigProblem", "Control", "DescFlags",
    "DeviceStatus", "FatalCode", "Feature", "IrqControl", "ModuleKind", "Opcode", "Status",
    "is_valid_ring_size", "pack_launch_dims", "ring_bytes", "unpack_launch_dims",
]
