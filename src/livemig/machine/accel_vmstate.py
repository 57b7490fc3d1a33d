"""Migration of the ``accel`` device, VFIO style (hw/vfio/migration.c).

The section payload is a sequence of be64 tags (QEMU's VFIO_MIG_FLAG_*):
DEV_DATA_STATE is followed by a length and data; a section ends with
END_OF_STATE, or, once the initial data is all sent and switchover-ack is
on, with DEV_INIT_DATA_SENT. Our data record: u8 kind (0 initial data,
1 device memory), be64 offset, bytes.
"""

from __future__ import annotations

import struct
import threading

import numpy as np

from livemig.machine.accel_device import CHUNK_BYTES, AccelDevice
from livemig.machine.vmstate import LoadContext, OutStream, SaveContext, SaveVMHandlers
from livemig.wire import (
    PayloadKind,
    TaggedData,
    TaggedEnd,
    VfioMigFlag,
    encode_tagged_data,
    encode_tagged_end,
)

DATA_BUFFER_BYTES = 1 << 20   # VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE
KIND_INIT, KIND_MEMORY = 0, 1
_RECORD = struct.Struct(">BQ")
ITERATE_BUDGET_BYTES = 8 << 20


class AccelHandler(SaveVMHandlers):
    """Both sides of one accel device's section (idstr ``<id>/accel``)."""

    version_id = 1
    payload_kind = PayloadKind.TAGGED
    iterable = True

    def __init__(self, device: AccelDevice) -> None:
        self.dev = device
        self.idstr = f"{device.config.id}/accel"
        self._init_sent = 0
        self.initial_data_sent = False
        self._ctx: LoadContext | None = None
        self._switchover_ack = False      # source: INIT_DATA_SENT may end the initial data
        self._prepare_thread: threading.Thread | None = None
        self.error: str | None = None

    # -- source -------------------------------------------------------------------
    def switchover_ack_needed(self) -> bool:
        return self.dev.config.init_size > 0

    def save_setup(self, out: OutStream, ctx: SaveContext) -> None:
        self._switchover_ack = ctx.switchover_ack_enabled()
        self._init_sent = 0
        self.initial_data_sent = False
        with self.dev.lock:
            self.dev.dirty_chunks[:] = True  # all device memory is to be sent
        out.write(encode_tagged_end(VfioMigFlag.END_OF_STATE))

    def _init_left(self) -> int:
        return self.dev.config.init_size - self._init_sent

    def state_pending_estimate(self) -> int:
        return self._init_left() + int(np.count_nonzero(self.dev.dirty_chunks)) * CHUNK_BYTES

    def save_live_iterate(self, out: OutStream) -> bool:
        budget = ITERATE_BUDGET_BYTES
        while self._init_left() and budget > 0 and not out.rate_exceeded():
            n = min(DATA_BUFFER_BYTES, self._init_left())
            lo = self._init_sent
            self._write(out, KIND_INIT, lo, self.dev.init_data[lo:lo + n])
            self._init_sent += n
            budget -= n
        if (not self._init_left() and self._switchover_ack
                and not self.initial_data_sent and self.dev.config.init_size):
            # The destination may start preparing now (VFIO's INIT_DATA_SENT).
            self.initial_data_sent = True
            out.write(encode_tagged_end(VfioMigFlag.DEV_INIT_DATA_SENT))
            return False
        if not self._init_left():
            budget = self._send_dirty(out, budget, ignore_rate=False)
        out.write(encode_tagged_end(VfioMigFlag.END_OF_STATE))
        return self.state_pending_estimate() == 0

    def save_live_complete_precopy(self, out: OutStream) -> None:
        while self._init_left():
            n = min(DATA_BUFFER_BYTES, self._init_left())
            lo = self._init_sent
            self._write(out, KIND_INIT, lo, self.dev.init_data[lo:lo + n])
            self._init_sent += n
        self._send_dirty(out, None, ignore_rate=True)
        out.write(encode_tagged_end(VfioMigFlag.END_OF_STATE))

    def _send_dirty(self, out: OutStream, budget: int | None, *, ignore_rate: bool) -> int:
        while budget is None or budget > 0:
            if not ignore_rate and out.rate_exceeded():
                break
            with self.dev.lock:
                hits = np.flatnonzero(self.dev.dirty_chunks)[: DATA_BUFFER_BYTES // CHUNK_BYTES]
                if hits.size == 0:
                    break
                self.dev.dirty_chunks[hits] = False
                # Contiguous runs go out as one record each.
                runs = np.split(hits, np.flatnonzero(np.diff(hits) != 1) + 1)
                records = [(int(r[0]) * CHUNK_BYTES,
                            self.dev.memory[int(r[0]) * CHUNK_BYTES:(int(r[-1]) + 1) * CHUNK_BYTES]
                            .copy()) for r in runs]
            for offset, data in records:
                self._write(out, KIND_MEMORY, offset, data)
                if budget is not None:
                    budget -= len(data)
        return budget or 0

    @staticmethod
    def _write(out: OutStream, kind: int, offset: int, data: np.ndarray) -> None:
        out.write(encode_tagged_data(_RECORD.pack(kind, offset) + data.tobytes()))

    def vmstate_description(self) -> dict:
        """Listed as QEMU lists a device section, but with no fixed fields: the
        payload is VFIO framing (be64 tags, DEV_DATA_STATE chunks of be64 size),
        variable in length, which no fixed field list can describe. Readers
        that know it (``livemig analyze``) go by ``x-livemig-framing``. QEMU's
        analyzer has no VFIO reader: it stops at this section's first tag
        ("Unknown section type") instead of misreading the rest (a ``tag``
        field would let it stop silently, at a 0 byte that looks like EOF)."""
        return {"vmsd_name": "accel", "version": self.version_id, "iterable": True,
                "x-livemig-framing": "vfio-tagged", "fields": []}

    # -- destination ------------------------------------------------------------------
    def load_setup(self, ctx: LoadContext) -> None:
        self._ctx = ctx

    def load_event(self, event) -> None:
        if isinstance(event, TaggedData) and event.tag == VfioMigFlag.DEV_DATA_STATE:
            data = memoryview(event.data)
            if len(data) < _RECORD.size:
                raise ValueError(f"{self.idstr}: short data record")
            kind, offset = _RECORD.unpack_from(data)
            payload = np.frombuffer(data[_RECORD.size:], dtype=np.uint8)
            target = self.dev.init_data if kind == KIND_INIT else self.dev.memory
            if kind not in (KIND_INIT, KIND_MEMORY) or offset + payload.size > target.size:
                raise ValueError(f"{self.idstr}: data record out of range "
                                 f"(kind {kind}, offset {offset}, {payload.size} bytes)")
            with self.dev.lock:
                target[offset:offset + payload.size] = payload
        elif isinstance(event, TaggedEnd) and event.tag == VfioMigFlag.DEV_INIT_DATA_SENT:
            assert self._ctx is not None
            if not self._ctx.switchover_ack_enabled() or not self.dev.config.init_size:
                raise ValueError(f"{self.idstr}: Received INIT_DATA_SENT but switchover ack "
                                 "is not used")
            self._prepare_thread = threading.Thread(target=self._prepare_and_approve,
                                                    name=f"{self.dev.config.id}-prepare",
                                                    daemon=True)
            self._prepare_thread.start()

    def load_cost_ms(self, ctx: LoadContext) -> float:
        # With switchover-ack the device prepares while the guest still runs on the
        # source; without it, all of prepare-ms lands after the END section.
        if ctx.switchover_ack_enabled() and self.dev.config.init_size:
            return 0.0
        return float(self.dev.config.prepare_ms)

    def _prepare_and_approve(self) -> None:
        self.dev.prepare()
        assert self._ctx is not None
        self._ctx.approve_switchover(self)

    def load_section_done(self, section_type: str) -> None:
        if section_type == "end":
            # The final state is in: the device must be ready before the guest runs.
            # Without switchover-ack this is where preparation lands: in the downtime.
            if self._prepare_thread is not None:
                self._prepare_thread.join()
            self.dev.prepare()
