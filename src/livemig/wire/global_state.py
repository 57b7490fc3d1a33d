"""QEMU 10.0's ``globalstate`` section payload (VMState ``globalstate`` v1), sans-IO.

A fixed 104-byte record, no length prefix, no subsections (as a QEMU 10.0
q35 stream carries it and as its VM description lists it)::

    uint32  size                   strlen(runstate) + 1 (the NUL counted)
    buffer  runstate[32]           the run-state name, NUL-padded
    uint8   has_vm_was_suspended   1: the next byte is meaningful
    uint8   vm_was_suspended       the guest was suspended when it stopped
    buffer  unused[66]             zeros (the old runstate[100] tail)

Integers are big-endian, as every VMState integer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

GLOBAL_STATE_RUNSTATE_BYTES = 32
GLOBAL_STATE_UNUSED_BYTES = 66
_LAYOUT = struct.Struct(f">I{GLOBAL_STATE_RUNSTATE_BYTES}sBB{GLOBAL_STATE_UNUSED_BYTES}s")
GLOBAL_STATE_SIZE = _LAYOUT.size          # 104 bytes
GLOBAL_STATE_VERSION = 1

# The VM description of the record (QEMU's vmdesc ``fields``, in its order).
GLOBAL_STATE_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("size", "uint32", 4),
    ("runstate", "buffer", GLOBAL_STATE_RUNSTATE_BYTES),
    ("has_vm_was_suspended", "uint8", 1),
    ("vm_was_suspended", "uint8", 1),
    ("unused", "buffer", GLOBAL_STATE_UNUSED_BYTES),
)


@dataclass(frozen=True, slots=True)
class GlobalStateRecord:
    """A decoded ``globalstate`` payload. ``vm_was_suspended`` is None when the
    source did not say (``has_vm_was_suspended`` 0)."""

    runstate: str
    vm_was_suspended: bool | None = None


def encode_global_state(runstate: str, vm_was_suspended: bool | None = False) -> bytes:
    """The 104 bytes of QEMU's layout for ``runstate`` (at most 31 ASCII bytes)."""
    raw = runstate.encode("ascii")
    if not raw or len(raw) >= GLOBAL_STATE_RUNSTATE_BYTES or b"\0" in raw:
        raise ValueError(f"run state name {runstate!r} does not fit globalstate's "
                         f"runstate[{GLOBAL_STATE_RUNSTATE_BYTES}]")
    has = vm_was_suspended is not None
    return _LAYOUT.pack(len(raw) + 1, raw, int(has), int(bool(vm_was_suspended)),
                        bytes(GLOBAL_STATE_UNUSED_BYTES))


def decode_global_state(data: bytes | bytearray | memoryview) -> GlobalStateRecord:
    """Check and decode exactly :data:`GLOBAL_STATE_SIZE` bytes; ValueError
    (starting ``globalstate:``) saying what is wrong."""
    if len(data) != GLOBAL_STATE_SIZE:
        raise ValueError(f"globalstate: record is {len(data)} bytes, expected "
                         f"{GLOBAL_STATE_SIZE}")
    size, runstate, has, was, _unused = _LAYOUT.unpack(bytes(data))
    if not 1 < size <= GLOBAL_STATE_RUNSTATE_BYTES:
        raise ValueError(f"globalstate: bad run state size {size} (1 < size <= "
                         f"{GLOBAL_STATE_RUNSTATE_BYTES})")
    name, nul = runstate[:size - 1], runstate[size - 1:]
    if nul.strip(b"\0") or b"\0" in name:
        raise ValueError(f"globalstate: bad run state {runstate.rstrip(bytes(1))!r}: "
                         f"not one NUL-terminated name of {size - 1} bytes")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"globalstate: bad run state {name!r}: not ASCII") from None
    if has > 1 or was > 1:
        raise ValueError(f"globalstate: bad vm_was_suspended flags ({has}, {was})")
    return GlobalStateRecord(text, bool(was) if has else None)
