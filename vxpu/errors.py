"""The root of vxpu's exception tree.

Every error vxpu raises derives from :class:`Error`. Each layer defines its own subclasses
beside the code that raises them, and each subclass says what to do about it::

    Error
     ├── ConfigError              bad configuration or CLI input; the message names the fix
     ├── vfio_server.ProtocolError  carries the errno to reply with (guest/socket input)
     ├── vfio_server.DmaError       a guest-physical range that is not (fully) mapped
     ├── accel.BackendError         carries a stable Status code, the vendor's name and log
     ├── ir.IRError                 IR parse/decode/verify failures, each with a location
     └── images.ImageError          QEMU or guest-image provisioning failed; names the fix

Asserts are for our own invariants only, never for input validation.
"""


class Error(Exception):
    """Root of all vxpu errors."""


class ConfigError(Error):
    """Invalid configuration or command-line input. The message says how to fix it."""


class StateError(Error):
    """An operation was attempted in the wrong state.

    Args:
        message: what was attempted.
        current: the state the object is in.
        required: the state the operation needs.
    """

    def __init__(self, message: str, *, current: str, required: str) -> None:
        super().__init__(f"{message} (state is {current!r}, needs {required!r})")
        self.current = current
        self.required = required
