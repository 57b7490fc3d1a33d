"""QEMU's savevm layer (migration/savevm.c): sections, both ways, framed once.

The handlers of one migration live in a :class:`SaveVMState` (QEMU's
``savevm_state``), in registration order: the engine registers ``ram``
first, the machine its devices (:meth:`Machine.vmstate_handlers`), the
engine ``globalstate`` last. Section ids are registration positions. This
module knows the :class:`SaveVMHandlers` interface only, no concrete device.

Source: ``qemu_savevm_state_header`` / ``_setup`` / ``_iterate`` /
``_complete_precopy`` / ``_cleanup`` wrap each handler's payload in its
section (header, payload, footer); the migration thread decides *when*
(``livemig.migration.policy``). Destination: ``qemu_loadvm_state`` decodes
the stream, routes each section's payload to its handler and hands the
commands to ``loadvm_process_command``; what only the incoming side can do
(the return path, multifd, the clock) it asks of a :class:`LoadvmHost`.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from livemig.machine.vmstate import LoadContext, OutStream, SaveContext, SaveVMHandlers
from livemig.migration.errors import LoadError
from livemig.wire import (
    NEED_DATA,
    Closed,
    Command,
    Configuration,
    Eof,
    Header,
    MigCmd,
    PayloadKind,
    RamMultifdFlush,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    SectionType,
    StreamDecoder,
    StreamError,
    VmDescription,
    encode_command,
    encode_configuration,
    encode_eof,
    encode_footer,
    encode_header,
    encode_section_header,
    encode_vmdesc,
)
from livemig.wire.postcopy import (
    PostcopyAdvise,
    RamDiscard,
    decode_postcopy_advise,
    decode_postcopy_ram_discard,
    decode_recv_bitmap,
)

_SECTION_TYPE = {SectionStart: "start", SectionPart: "part", SectionEnd: "end",
                 SectionFull: "full"}
RECV_CHUNK = 4 << 20


_T = TypeVar("_T")


class SaveVMState:
    """The registered handlers of one migration (QEMU's ``savevm_state``)."""

    def __init__(self) -> None:
        self.handlers: list[SaveVMHandlers] = []
        self.ids: list[int] = []            # the source's section id of each handler
        # What the header's configuration section carried (machine type, uuid),
        # for the VM description; None before qemu_savevm_state_header.
        self.configuration: tuple[str, bytes | None] | None = None
        # Destination: what each handler's own work cost once its final state
        # came (END/FULL sections: load and post-load, waits for data excluded),
        # and its load_complete; seconds by idstr. The downtime the destination
        # adds, measured, beside what the handlers declared (load_cost_ms).
        self.final_load_s: dict[str, float] = {}
        self.load_complete_s: dict[str, float] = {}
        # Destination: stream section id -> handler, kept across a postcopy
        # recovery (the resumed stream's PART sections use the old ids).
        self.by_id: dict[int, SaveVMHandlers] = {}

    def register_savevm_live(self, handler: SaveVMHandlers) -> int:
        """Add a handler; its section id is the handler's own (a QEMU machine's
        sections keep QEMU's ids: a QEMU destination finds PART/END sections by
        id among all of its handlers, whose unset ids are 0) or the next free one
        (QEMU's register_savevm_live, in registration order)."""
        sid = handler.section_id
        if sid is None:
            sid = max(self.ids, default=-1) + 1
        self.handlers.append(handler)
        self.ids.append(sid)
        return sid

    def sections(self, *, iterable: bool) -> Iterator[tuple[int, SaveVMHandlers]]:
        return ((sid, h) for sid, h in zip(self.ids, self.handlers, strict=True)
                if h.iterable is iterable)

    def find(self, idstr: str, instance_id: int) -> SaveVMHandlers | None:
        """QEMU's find_se()."""
        for h in self.handlers:
            if h.idstr == idstr and h.instance_id == instance_id:
                return h
        return None

    def payload_kinds(self) -> dict[str, PayloadKind]:
        """How the decoder frames each section's payload."""
        return {h.idstr: h.payload_kind for h in self.handlers}

    def vmstate_descriptions(self) -> dict[str, Any]:
        """The VMState descriptions of the VMSTATE payloads, for the decoder."""
        return {h.idstr: h.vmsd for h in self.handlers if h.payload_kind is PayloadKind.VMSTATE}

    def switchover_ack_needed(self) -> int:
        """How many handlers will approve switchover on the destination (both
        sides count the same handlers: QEMU's switchover_ack_pending_num)."""
        return sum(h.switchover_ack_needed() for h in self.handlers)


# -- source ------------------------------------------------------------------------

@contextmanager
def _section(f: OutStream, kind: SectionType, sid: int, h: SaveVMHandlers) -> Iterator[None]:
    """One section: its header, the handler's payload, its footer. START and
    FULL name the handler (QEMU's save_section_header), PART and END only
    repeat the id."""
    if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
        f.write(encode_section_header(kind, sid, h.idstr, h.instance_id, h.version_id))
    else:
        f.write(encode_section_header(kind, sid))
    yield
    f.write(encode_footer(sid))


def qemu_savevm_state_header(f: OutStream, machine_type: str, uuid: bytes | None) -> None:
    """The file header and the configuration section (machine type, and the
    UUID when ``validate-uuid`` is on)."""
    f.write(encode_header())
    f.write(encode_configuration(machine_type, uuid=uuid))


def qemu_savevm_send_open_return_path(f: OutStream) -> None:
    f.write(encode_command(MigCmd.OPEN_RETURN_PATH))


def qemu_savevm_send_ping(f: OutStream, value: int) -> None:
    f.write(encode_command(MigCmd.PING, value.to_bytes(4, "big")))


def qemu_savevm_send_switchover_start(f: OutStream) -> None:
    f.write(encode_command(MigCmd.SWITCHOVER_START))


def qemu_savevm_state_setup(state: SaveVMState, f: OutStream, ctx: SaveContext) -> None:
    """A START section per iterable handler; the stream is flushed after, so
    the destination can begin its own setup at once."""
    for sid, h in state.sections(iterable=True):
        with _section(f, SectionType.SECTION_START, sid, h):
            h.save_setup(f, ctx)
    f.flush()


def qemu_savevm_state_pending_estimate(state: SaveVMState) -> int:
    """Bytes the iterable handlers still hold, cheaply (no dirty-log sync)."""
    return sum(h.state_pending_estimate() for _, h in state.sections(iterable=True))


def qemu_savevm_state_pending_exact(state: SaveVMState) -> int:
    """The same after a dirty-log sync (RAM syncs here: costly)."""
    return sum(h.state_pending_exact() for _, h in state.sections(iterable=True))


def qemu_savevm_state_must_precopy(state: SaveVMState) -> int:
    """Of the estimate, what only precopy can move (QEMU's ``must_precopy``:
    the handlers without ``has_postcopy``)."""
    return sum(h.state_pending_estimate() for _, h in state.sections(iterable=True)
               if not h.has_postcopy)


def qemu_savevm_state_iterate(state: SaveVMState, f: OutStream, *,
                              postcopy: bool = False) -> bool:
    """A PART section per iterable handler, each gets its turn (QEMU 9.0's
    no-starvation rule) until the rate limit is reached. True when every
    handler had nothing left to send. In postcopy only ``has_postcopy`` ones."""
    all_done = True
    for sid, h in state.sections(iterable=True):
        if postcopy and not h.has_postcopy:
            continue
        if f.rate_exceeded():
            all_done = False
            break
        with _section(f, SectionType.SECTION_PART, sid, h):
            all_done = h.save_live_iterate(f) and all_done
    f.flush()
    return all_done


def qemu_savevm_state_complete_precopy_iterable(state: SaveVMState, f: OutStream, *,
                                                in_postcopy: bool = False) -> None:
    """The guest is stopped: an END section per iterable handler, with all
    that is left (``in_postcopy``: only those without ``has_postcopy``)."""
    qemu_savevm_send_switchover_start(f)
    for sid, h in state.sections(iterable=True):
        if in_postcopy and h.has_postcopy:
            continue
        with _section(f, SectionType.SECTION_END, sid, h):
            h.save_live_complete_precopy(f)


def qemu_savevm_state_complete_precopy_non_iterable(state: SaveVMState, f: OutStream) -> None:
    """A FULL section per other handler (device state, vCPU, globalstate),
    EOF, then the VM description JSON, flushed."""
    qemu_savevm_state_non_iterable(state, f)
    qemu_savevm_state_eof(state, f)


def qemu_savevm_state_non_iterable(state: SaveVMState, f: OutStream) -> None:
    """A FULL section per non-iterable handler (postcopy packages these)."""
    for sid, h in state.sections(iterable=False):
        with _section(f, SectionType.SECTION_FULL, sid, h):
            h.save_state(f)


def qemu_savevm_state_eof(state: SaveVMState, f: OutStream) -> None:
    """EOF, then the VM description JSON, flushed."""
    f.write(encode_eof())
    f.write(encode_vmdesc(qemu_savevm_state_vmdesc(state, state.configuration)))
    f.flush()


def qemu_savevm_state_complete_postcopy(state: SaveVMState, f: OutStream) -> None:
    """Postcopy's end: an END section per ``has_postcopy`` handler with what
    is left, then EOF and the VM description."""
    for sid, h in state.sections(iterable=True):
        if h.has_postcopy:
            with _section(f, SectionType.SECTION_END, sid, h):
                h.save_live_complete_precopy(f)
    qemu_savevm_state_eof(state, f)


def configuration_vmdesc(machine_type: str, uuid: bytes | None) -> dict[str, Any]:
    """The ``configuration`` section as QEMU describes it (``vmstate_configuration``):
    the name's length and bytes, and the ``configuration/uuid`` subsection when
    ``validate-uuid`` sent one, so readers walk that subsection too."""
    desc: dict[str, Any] = {
        "vmsd_name": "configuration", "version": 1,
        "fields": [{"name": "len", "type": "uint32", "size": 4},
                   {"name": "name", "type": "buffer", "size": len(machine_type.encode())}]}
    if uuid is not None:
        desc["subsections"] = [{"vmsd_name": "configuration/uuid", "version": 1,
                                "fields": [{"name": "uuid", "type": "buffer",
                                            "size": len(uuid)}]}]
    return desc


def qemu_savevm_state_vmdesc(state: SaveVMState,
                             configuration: tuple[str, bytes | None] | None = None) -> bytes:
    """The VM description after EOF (QEMU's vmdesc JSON): ``page_size`` and a
    ``devices`` entry per section that has a description
    (:meth:`SaveVMHandlers.vmstate_description`), in section order, each
    ``name``, ``instance_id``, then the handler's ``vmsd_name``/``version``/
    ``fields``/``subsections``. Handlers without one are not listed (QEMU
    lists no ``ram``: readers know its format). No ``configuration`` entry:
    readers then read the configuration section as its be32 length and name."""
    devices = []
    for h in state.handlers:
        desc = h.vmstate_description()
        if desc is None:
            continue
        devices.append({"name": h.idstr, "instance_id": h.instance_id, **desc})
    out: dict[str, Any] = {"page_size": 4096}
    if configuration is not None:
        out["configuration"] = configuration_vmdesc(*configuration)
    out["devices"] = devices
    return json.dumps(out, separators=(",", ":")).encode()


def qemu_savevm_state_cleanup(state: SaveVMState,
                              on_error: Callable[[SaveVMHandlers, Exception], None]) -> None:
    """Every handler's save_cleanup, whatever happened; a failing cleanup is
    reported to ``on_error`` and does not stop the others."""
    for h in state.handlers:
        try:
            h.save_cleanup()
        except Exception as exc:  # noqa: BLE001 - cleanup must reach every handler
            on_error(h, exc)


# -- destination ---------------------------------------------------------------------

class LoadvmHost(LoadContext, Protocol):
    """What ``qemu_loadvm_state`` needs of the incoming side (QEMU's
    MigrationIncomingState): its input, its return path, multifd, its clock.
    It is also the :class:`LoadContext` the handlers see."""

    def read_into(self, buf: Any) -> int:
        """Read stream bytes into ``buf``; 0 at the end of the data."""

    def open_return_path(self) -> None:
        """MIG_CMD_OPEN_RETURN_PATH (QEMU: mis->to_src_file)."""

    def has_return_path(self) -> bool: ...

    def send_pong(self, value: int) -> None:
        """Answer MIG_CMD_PING on the return path."""

    def set_switchover_ack_pending(self, count: int) -> None:
        """After load_setup: how many approvals switchover waits for."""

    def set_device_cost(self, ms: float) -> None:
        """After load_setup: what the devices cost after the last byte (ms)."""

    def multifd_recv_sync_main(self) -> None:
        """A MULTIFD_FLUSH record: wait until every channel reached this sync."""

    def mark(self, name: str) -> None:
        """A load checkpoint (``x-load-checkpoints``)."""

    def postcopy_advise(self, advise: PostcopyAdvise) -> None:
        """MIG_CMD_POSTCOPY_ADVISE (its length already checked against postcopy-ram)."""

    def postcopy_ram_discard(self, discard: RamDiscard) -> None: ...

    def postcopy_listen(self) -> None:
        """From here on pages arrive while the guest may run (userfaultfd armed)."""

    def postcopy_run(self) -> None:
        """The device state is in: complete the devices and start the guest."""

    def postcopy_ram_enabled(self) -> bool: ...

    def postcopy_recv_bitmap(self, block: str) -> None:
        """MIG_CMD_RECV_BITMAP (recovery): send the block's received bitmap back."""

    def postcopy_resume(self) -> None:
        """MIG_CMD_POSTCOPY_RESUME: RESUME_ACK, then go on in postcopy-active."""


class DirectPages(Protocol):
    """Reads runs of page records straight into guest RAM (``ram.RamDirectLoad``)."""

    def place(self, dec: StreamDecoder) -> bool:
        """One direct read if the decoder is at a run point; False if not."""

    def align(self, dec: StreamDecoder) -> int:
        """Bytes to read first so that the next read can be direct, or 0."""


def check_configuration(ev: Configuration, machine_type: str, uuid: bytes | None) -> None:
    """QEMU's configuration section post-load: same machine type (a prefix
    match, as QEMU's), same UUID when the source sent one."""
    if ev.machine_type != machine_type[: len(ev.machine_type)]:
        raise LoadError(f"Machine type received is '{ev.machine_type}' and local is "
                        f"'{machine_type}'")
    if ev.uuid is not None and uuid is not None and ev.uuid != uuid:
        raise LoadError(f"UUID received is {uuidlib.UUID(bytes=ev.uuid)} and local is "
                        f"{uuidlib.UUID(bytes=uuid)}")


def qemu_loadvm_state_setup(state: SaveVMState, host: LoadvmHost) -> None:
    """Every handler's load_setup, then the switchover-ack count (QEMU counts
    after load_setup, before the section loop)."""
    for h in state.handlers:
        h.load_setup(host)
    if host.switchover_ack_enabled():
        host.set_switchover_ack_pending(state.switchover_ack_needed())
    host.set_device_cost(sum(h.load_cost_ms(host) for h in state.handlers))


def _decoded(decode: Callable[..., _T], payload: bytes, **kw: Any) -> _T:
    """A command's payload decoded; a malformed one fails the load with the
    decoder's (QEMU's) text."""
    try:
        return decode(payload, **kw)
    except StreamError as exc:
        raise LoadError(exc.message) from None


def loadvm_process_command(host: LoadvmHost, ev: Command) -> None:
    """MIG_CMD_*: the return path and its pings, postcopy's commands;
    SWITCHOVER_START and PACKAGED (decoded in line) need nothing."""
    if ev.cmd == MigCmd.OPEN_RETURN_PATH:
        host.open_return_path()
    elif ev.cmd == MigCmd.POSTCOPY_ADVISE:
        host.postcopy_advise(_decoded(decode_postcopy_advise, ev.payload,
                                      postcopy_ram=host.postcopy_ram_enabled()))
    elif ev.cmd == MigCmd.POSTCOPY_RAM_DISCARD:
        host.postcopy_ram_discard(_decoded(decode_postcopy_ram_discard, ev.payload))
    elif ev.cmd == MigCmd.POSTCOPY_LISTEN:
        host.postcopy_listen()
    elif ev.cmd == MigCmd.POSTCOPY_RUN:
        host.postcopy_run()
    elif ev.cmd == MigCmd.RECV_BITMAP:
        host.postcopy_recv_bitmap(_decoded(decode_recv_bitmap, ev.payload))
    elif ev.cmd == MigCmd.POSTCOPY_RESUME:
        host.postcopy_resume()
    elif ev.cmd == MigCmd.PING:
        if not host.has_return_path():
            raise LoadError(f"CMD_PING (0x{int.from_bytes(ev.payload, 'big'):x}) "
                            "received with no return path")
        host.send_pong(int.from_bytes(ev.payload, "big"))


def _section_done(h: SaveVMHandlers, section_type: str) -> None:
    try:
        h.load_section_done(section_type)
    except ValueError as exc:
        raise LoadError(f"error while loading state for device '{h.idstr}': {exc}") from exc


_FINAL = ("end", "full")


def _final_device_work(h: SaveVMHandlers, section_type: str) -> bool:
    """A device's work on its final state (timed); RAM's is its load rate."""
    return section_type in _FINAL and h.idstr != "ram"


@contextmanager
def _timed(into: dict[str, float], h: SaveVMHandlers, section_type: str,
           clock: Callable[[], float]) -> Iterator[None]:
    """Add the block's time to ``into[h.idstr]`` when it is a device's work on
    its final state (RAM's final part is its load rate, measured elsewhere)."""
    if not _final_device_work(h, section_type):
        yield
        return
    t0 = clock()
    try:
        yield
    finally:
        into[h.idstr] = into.get(h.idstr, 0.0) + (clock() - t0)


def qemu_loadvm_state_main(state: SaveVMState, host: LoadvmHost, dec: StreamDecoder, *,
                           machine_type: str, uuid: bytes | None,
                           clock: Callable[[], float] = time.monotonic,
                           direct: DirectPages | None = None) -> None:
    """Decode until the VM description: sections to their handlers, commands
    to :func:`loadvm_process_command`. Returns once all state is in. The
    handlers' work on their final sections is timed into ``state.final_load_s``
    (RAM's is its load rate, measured by the host's reads). With ``direct``,
    runs of page records are read straight into guest RAM where it can."""
    final = state.final_load_s
    by_id = state.by_id
    current: SaveVMHandlers | None = None
    current_type = ""
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            if direct is not None:
                if direct.place(dec):
                    continue
                need = direct.align(dec)        # end the buffer on a record boundary
                if need:
                    dec.buffer_updated(host.read_into(dec.get_buffer(need)[:need]))
                    continue
            buf = dec.get_buffer(RECV_CHUNK)
            dec.buffer_updated(host.read_into(buf))      # 0: end of data
            continue
        if isinstance(ev, Closed):
            raise LoadError("stream ended before the VM description")
        if isinstance(ev, (SectionStart, SectionFull)):
            h = state.find(ev.idstr, ev.instance_id)
            if h is None:
                raise LoadError(
                    f"Unknown savevm section or instance '{ev.idstr}' {ev.instance_id}. "
                    "Make sure that your current VM setup matches your saved VM setup, "
                    "including any hotplugged devices")
            if ev.version_id > h.version_id:
                raise LoadError(f"savevm: unsupported version {ev.version_id} for "
                                f"'{ev.idstr}' v{h.version_id}")
            by_id[ev.section_id] = h
            current, current_type = h, _SECTION_TYPE[type(ev)]
        elif isinstance(ev, (SectionPart, SectionEnd)):
            current = by_id.get(ev.section_id)
            if current is None:
                raise LoadError(f"Unknown savevm section {ev.section_id}")
            current_type = _SECTION_TYPE[type(ev)]
            if current_type == "end":
                host.mark("dst-first-end-section")
        elif isinstance(ev, SectionFooter):
            assert current is not None      # the decoder checks footers against sections
            with _timed(final, current, current_type, clock):
                _section_done(current, current_type)
            current = None
        elif isinstance(ev, Command):
            loadvm_process_command(host, ev)
        elif isinstance(ev, RamMultifdFlush):
            host.multifd_recv_sync_main()
        elif isinstance(ev, Configuration):
            check_configuration(ev, machine_type, uuid)
            qemu_loadvm_state_setup(state, host)
        elif isinstance(ev, Eof):
            host.mark("dst-eof")
        elif isinstance(ev, VmDescription):
            return
        elif isinstance(ev, Header):
            pass
        else:
            if current is None:
                raise LoadError(f"payload outside a section: {type(ev).__name__}")
            if _final_device_work(current, current_type):
                with _timed(final, current, current_type, clock):
                    current.load_event(ev)
            else:
                current.load_event(ev)    # RAM and precopy parts: the hot path, untimed


def qemu_loadvm_state(state: SaveVMState, host: LoadvmHost, dec: StreamDecoder, *,
                      machine_type: str, uuid: bytes | None,
                      clock: Callable[[], float] = time.monotonic,
                      direct: DirectPages | None = None) -> None:
    """Load a whole stream: the main loop, then every handler's load_complete
    (a device may still refuse: the guest must not run then), each timed into
    ``state.load_complete_s``."""
    qemu_loadvm_state_main(state, host, dec, machine_type=machine_type, uuid=uuid,
                           clock=clock, direct=direct)
    qemu_loadvm_state_complete(state, clock)


def qemu_loadvm_state_complete(state: SaveVMState, clock: Callable[[], float] = time.monotonic,
                               *, postcopy_run: bool = False) -> None:
    """Every handler's load_complete, once each. ``postcopy_run``: at POSTCOPY_RUN,
    all but the ``has_postcopy`` ones (their state is still arriving), so the
    devices are complete before the guest runs on the destination."""
    for h in state.handlers:
        if h.idstr in state.load_complete_s or (postcopy_run and h.has_postcopy):
            continue
        t0 = clock()
        try:
            h.load_complete()
        except ValueError as exc:
            raise LoadError(f"error while loading state for device '{h.idstr}': "
                            f"{exc}") from exc
        finally:
            state.load_complete_s[h.idstr] = clock() - t0


def qemu_loadvm_state_cleanup(state: SaveVMState) -> None:
    """Every handler's load_cleanup after a failed load; errors are ignored
    (the load already failed with its own reason)."""
    for h in state.handlers:
        try:
            h.load_cleanup()
        except Exception:  # noqa: BLE001
            pass
