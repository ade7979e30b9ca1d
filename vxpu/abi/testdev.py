"""The vxpu *test device* ABI: PCI identity and BAR0 register map, shared by host and guest.

This module is the single definition of the test device's guest-visible contract (documented
in docs/device-abi.md). It is stdlib-only so the guest driver, running in a minimal
initramfs, imports it unchanged. All registers are little-endian 32-bit; SCRATCH and
SCRATCH2 also take one 64-bit access over 0x08-0x0F, and DMA_ADDR_LO/HI over 0x10-0x17.
"""

from __future__ import annotations

# -- PCI identity ----------------------------------------------------------------------------
VENDOR_ID = 0x5850            # ASCII "XP"; not PCI-SIG registered (QEMU's x-pci-vendor-id overrides)
DEVICE_ID = 0x0001            # the accelerator is 0x0100
SUBSYSTEM_VENDOR_ID = 0x5850
SUBSYSTEM_ID = 0x0001
CLASS_CODE = 0x120000         # processing accelerator
REVISION = 1

# -- BARs ------------------------------------------------------------------------------------
BAR0_SIZE = 0x1000            # registers: 32-bit, non-prefetchable MMIO, trapped
BAR2_SIZE = 0x10000           # scratch memory: 64-bit, prefetchable MMIO, trapped
MSIX_VECTORS = 2              # with the MSI-X option
MSIX_TABLE_OFFSET = 0x800     # in BAR0
MSIX_PBA_OFFSET = 0xC00       # in BAR0
MSI_VECTORS = 1

# -- BAR0 registers --------------------------------------------------------------------------
MAGIC = 0x00                  # RO
VERSION = 0x04                # RO
SCRATCH = 0x08                # RW
SCRATCH2 = 0x0C               # RW
DMA_ADDR_LO = 0x10            # RW
DMA_ADDR_HI = 0x14            # RW
DMA_LEN = 0x18                # RW
DMA_CMD = 0x1C                # WO (reads 0): writing a command runs it synchronously
DMA_STATUS = 0x20             # RO: DmaStatus of the last command
DMA_RESULT = 0x24             # RO: CRC32 of the last READ
IRQ_RAISE = 0x30              # WO: raise vector N
IRQ_COUNT = 0x34              # RO: interrupts successfully raised
IRQ_ENABLE = 0x38             # RW: bit 0 = interrupt (vector 0) after each DMA command
RESET_COUNT = 0x40            # RO: device resets seen; survives reset on purpose

MAGIC_VALUE = 0x55505856      # "VXPU" as a little-endian u32 reads b"VXPU"
VERSION_VALUE = 0x00010000    # major 1, minor 0

IRQ_ENABLE_DMA_DONE = 0x1

# DMA_CMD values
DMA_CMD_READ = 1              # CRC32 of guest memory -> DMA_RESULT
DMA_CMD_FILL_PATTERN = 2      # write pattern_byte(i) for i in range(DMA_LEN)
DMA_CMD_INVERT = 3            # xor every byte with 0xff, in place

MAX_DMA_LEN = 1 << 20         # 1 MiB; DMA_LEN must be 1..MAX_DMA_LEN

# DMA_STATUS values
DMA_OK = 0
DMA_BAD_ADDRESS = 1           # unmapped, crossing mappings, or not directly accessible
DMA_BAD_LEN = 2               # 0 or above MAX_DMA_LEN
DMA_NO_BUS_MASTER = 3         # command register Bus Master bit clear
DMA_BAD_CMD = 4               # unknown DMA_CMD value
DMA_BUSY = 5                  # running on message-only guest memory (no share=on); poll again

_PATTERN_PERIOD = bytes((i * 7 + 3) & 0xFF for i in range(256))


def pattern(length: int) -> bytes:
    """The FILL_PATTERN bytes: ``(i * 7 + 3) & 0xff`` for ``i`` in ``range(length)``."""
    reps = -(-length // 256)
    return (_PATTERN_PERIOD * reps)[:length]
