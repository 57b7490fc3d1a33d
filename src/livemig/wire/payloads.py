"""How a section's payload is framed, and encoders for the TAGGED and BLOB framings.

A QEMU section payload has no length: only the handler that wrote it knows where
it ends. The destination therefore tells ``StreamDecoder`` which framing each
idstr uses (``payload_kinds``):

* ``RAM``: QEMU's RAM records (``livemig.wire.ram``) until RAM_SAVE_FLAG_EOS.
* ``TAGGED``: VFIO-style be64 tags (``VFIO_MIG_FLAG_*``).
  ``DEV_DATA_STATE`` is followed by be64 size and that many bytes;
  ``END_OF_STATE`` or ``DEV_INIT_DATA_SENT`` ends the payload;
  ``DEV_CONFIG_STATE`` and ``DEV_SETUP_STATE`` are *bare markers* here. (In
  QEMU's VFIO they are followed by unframed vmstate / nothing; livemig devices
  send any config bytes as a ``DEV_DATA_STATE`` chunk instead, so that every
  byte of the payload is length-framed.)
* ``BLOB``: livemig's own framing for non-iterative device state: be32 length
  and that many bytes.
* ``GLOBALSTATE``: QEMU's fixed 104-byte ``globalstate`` VMState record
  (``livemig.wire.global_state``).
"""

from __future__ import annotations

import enum

from .constants import BE64, BLOB_HEADER, TAGGED_DATA_HEADER, VfioMigFlag


class PayloadKind(enum.Enum):
    """Framing of a section payload, chosen per idstr by the receiver."""

    RAM = "ram"
    TAGGED = "tagged"
    BLOB = "blob"
    GLOBALSTATE = "globalstate"
    VMSTATE = "vmstate"     # a QEMU device's VMState payload, walked by its description


TAGGED_END_TAGS = frozenset({VfioMigFlag.END_OF_STATE, VfioMigFlag.DEV_INIT_DATA_SENT})
TAGGED_MARKER_TAGS = frozenset({VfioMigFlag.DEV_CONFIG_STATE, VfioMigFlag.DEV_SETUP_STATE})


def encode_tagged_data(data: bytes) -> bytes:
    """``DEV_DATA_STATE``, be64 size, data."""
    return TAGGED_DATA_HEADER.pack(VfioMigFlag.DEV_DATA_STATE, len(data)) + bytes(data)


def encode_tagged_marker(tag: VfioMigFlag) -> bytes:
    """A bare ``DEV_CONFIG_STATE`` or ``DEV_SETUP_STATE`` tag."""
    if tag not in TAGGED_MARKER_TAGS:
        raise ValueError(f"{tag!r} is not a bare marker tag")
    return BE64.pack(tag)


def encode_tagged_end(tag: VfioMigFlag = VfioMigFlag.END_OF_STATE) -> bytes:
    """The tag that ends a TAGGED payload: ``END_OF_STATE`` or ``DEV_INIT_DATA_SENT``."""
    if tag not in TAGGED_END_TAGS:
        raise ValueError(f"{tag!r} does not end a tagged payload")
    return BE64.pack(tag)


def encode_blob(data: bytes) -> bytes:
    """be32 length, data (at most 4 GiB - 1 bytes)."""
    if len(data) > 0xFFFF_FFFF:
        raise ValueError("blob longer than a be32 length can say")
    return BLOB_HEADER.pack(len(data)) + bytes(data)
