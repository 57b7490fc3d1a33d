"""The one error type of the transport layer.

``desc`` carries QEMU's text where QEMU has one (``Failed to connect to
'127.0.0.1:1': Connection refused``, ``unknown migration protocol: foo``), so
the engine can put it straight into ``error-desc`` or a QMP GenericError.
"""

from __future__ import annotations


class TransportError(Exception):
    """A migration address could not be parsed, opened, read or written.

    ``errno`` is set when an OS error (or a timeout: ``errno.ETIMEDOUT``, a
    closed listener: ``errno.ECANCELED``) is the cause, else None.
    """

    def __init__(self, desc: str, errno: int | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        self.errno = errno

    def __str__(self) -> str:
        return self.desc


class UnexpectedEOF(TransportError):
    """The peer ended the stream in the middle of a ``read_exact_into``.

    ``received`` bytes of ``expected`` arrived; ``received == 0`` means the
    stream ended cleanly on the boundary the caller asked for.
    """

    def __init__(self, received: int, expected: int) -> None:
        super().__init__(
            f"Unexpected end of stream: read {received} of {expected} bytes", errno=None
        )
        self.received = received
        self.expected = expected
