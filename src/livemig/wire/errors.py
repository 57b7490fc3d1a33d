"""Errors raised by the wire decoders when the peer's bytes break the protocol.

These are the *remote* protocol errors (h11's RemoteProtocolError): the only
exceptions a decoder lets out on hostile input. Each names the absolute byte
offset of the problem in the peer's stream (0 = first byte ever received), so a
torn stream can be located in a capture. Messages use QEMU's words wherever
QEMU has them, so logs read like a QEMU destination's (or source's) would.

Encoders raise ``ValueError`` when *we* ask for something the format cannot
express (a block name over 255 bytes, an unaligned offset): that is a local bug.
"""

from __future__ import annotations


class WireError(Exception):
    """Base: the peer's bytes break the migration protocol at ``offset``."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset  # absolute stream offset, bytes

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (type(self), (self.message, self.offset))

    def __str__(self) -> str:
        return f"{self.message} (at stream offset {self.offset})"


def unknown_section_text(idstr: str, instance_id: int) -> str:
    """QEMU's text for a section it has no device for (qemu_loadvm_section_start_full)."""
    return (f"Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that "
            "your current VM setup matches your saved VM setup, including any hotplugged "
            "devices")


class StreamError(WireError):
    """The main migration stream (source -> destination) is invalid.

    ``section`` is the idstr of the section being decoded, or ``None`` at top level.
    """

    def __init__(self, message: str, offset: int, section: str | None = None) -> None:
        super().__init__(message, offset)
        self.section = section

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (type(self), (self.message, self.offset, self.section))

    def __str__(self) -> str:
        where = f", section {self.section!r}" if self.section is not None else ""
        return f"{self.message} (at stream offset {self.offset}{where})"


class ReturnPathError(WireError):
    """A return-path message (destination -> source) is invalid."""
