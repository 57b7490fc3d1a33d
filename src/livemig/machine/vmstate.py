"""SaveVMHandlers: the one interface between the migration engine and devices.

QEMU's ``include/migration/register.h`` idea in Python. The engine's savevm
layer (``livemig.migration.savevm``) walks the registered handlers in order
and frames each one's payload as a section; RAM and ``globalstate`` are the
engine's own, the machine registers its devices (:meth:`Machine.vmstate_handlers`).
Source-side hooks write their section payload to an :class:`OutStream` and
learn the migration's settings from a :class:`SaveContext`; destination-side
hooks receive the wire layer's decoded payload events for their section and
a :class:`LoadContext`. Everything a handler may use is declared here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from livemig.wire import PayloadKind


class OutStream(Protocol):
    """Where a source handler writes its payload (the engine's buffered writer)."""

    def write(self, data: Any) -> None:
        """Queue bytes / bytearray / memoryview / C-contiguous uint8 ndarray."""

    def flush(self) -> None:
        """Push buffered bytes to the channel now (before waiting on the peer)."""

    def rate_exceeded(self) -> bool:
        """True once this bandwidth window's budget is spent (stop iterating)."""

    def budget_left(self) -> int | None:
        """Bytes the current window may still carry (None: unlimited), so a
        device can size its next batch to the limit instead of overshooting."""

    def write_iovec(self, iov: Any, nbytes: int) -> None:
        """Queue the memory an iovec array describes (``nbytes`` in all), sent
        with no copy in user space (QEMU's qemu_put_buffer_async)."""


class SaveContext(Protocol):
    """What the source engine offers a device while it saves (the source's
    counterpart of :class:`LoadContext`)."""

    def switchover_ack_enabled(self) -> bool:
        """The switchover-ack capability is on for this migration: a device
        may end its initial data with DEV_INIT_DATA_SENT."""


class LoadContext(Protocol):
    """What the destination engine offers a device while it loads."""

    def approve_switchover(self, handler: SaveVMHandlers) -> None:
        """Called (from any thread) once the device is ready for switchover."""

    def switchover_ack_enabled(self) -> bool: ...


class SaveVMHandlers:
    """Base class: override what the device needs. Units: bytes.

    ``iterable`` devices get START/PART/END sections (``save_setup``,
    ``save_live_iterate``, ``save_live_complete_precopy``); the others one FULL
    section from ``save_state``.
    """

    idstr: str = ""
    instance_id: int = 0
    # The section id the source gives this handler; None: the next free one
    # (QEMU numbers in registration order; a QEMU machine's ids are QEMU's).
    section_id: int | None = None
    version_id: int = 1
    payload_kind: PayloadKind = PayloadKind.BLOB
    # PayloadKind.VMSTATE: the payload's VMStateDescription (livemig.wire.vmstate),
    # which the destination's decoder walks it with.
    vmsd: Any = None
    iterable: bool = False
    # QEMU's has_postcopy: the rest of this iterable state may follow the guest
    # to the destination (RAM with postcopy-ram); the others complete before.
    has_postcopy: bool = False

    # -- source -----------------------------------------------------------------
    def save_setup(self, out: OutStream, ctx: SaveContext) -> None: ...

    def state_pending_estimate(self) -> int:
        """Bytes still to send, cheaply (no dirty-log sync)."""
        return 0

    def state_pending_exact(self) -> int:
        """Bytes still to send after a dirty-log sync (RAM syncs here)."""
        return self.state_pending_estimate()

    def save_live_iterate(self, out: OutStream) -> bool:
        """Send one round of data; True when nothing is left to send right now."""
        return True

    def save_live_complete_precopy(self, out: OutStream) -> None: ...

    def save_state(self, out: OutStream) -> None: ...

    def save_cleanup(self) -> None: ...

    def vmstate_description(self) -> dict[str, Any] | None:
        """This handler's entry in the VM description sent after EOF, in QEMU's
        vmdesc form without ``name``/``instance_id`` (the savevm layer adds
        them): ``vmsd_name``, ``version``, ``fields`` (each ``name``, ``type``,
        ``size``; ``array_len``, ``struct`` where QEMU has them) and optional
        ``subsections``, describing the bytes of the section payload this
        handler wrote last. Called after ``save_state`` (or the last section of
        an iterable handler). None: not listed (QEMU lists no ``ram`` either)."""
        return None

    def switchover_ack_needed(self) -> bool:
        """True if this device will approve switchover on the destination."""
        return False

    # -- destination ------------------------------------------------------------
    def load_setup(self, ctx: LoadContext) -> None: ...

    def load_cost_ms(self, ctx: LoadContext) -> float:
        """What loading this device's final state costs after the last byte
        arrived (ms): preparation that switchover-ack does not take out of the
        downtime. The source counts it in its downtime prediction."""
        return 0.0

    def load_event(self, event: Any) -> None:
        """One decoded payload event of this device's section."""

    def load_section_done(self, section_type: str) -> None:
        """End of one section (``start``, ``part``, ``end`` or ``full``) of this device."""

    def load_complete(self) -> None:
        """All state is in (after EOF), before the guest may run; raise to refuse."""

    def load_cleanup(self) -> None: ...


EventCallback = Callable[[str, dict | None], None]
