"""The ``globalstate`` section: the source's run state at switchover.

The destination starts the guest only if the source was running (QEMU's
migration/global_state.c). Payload: QEMU 10.0's VMState record (uint32 size,
runstate[32], has_vm_was_suspended, vm_was_suspended, 66 unused bytes:
``livemig.wire.global_state``), so QEMU's tools read it as QEMU's own.
"""

from __future__ import annotations

from typing import Any

from livemig.machine.vmstate import OutStream, SaveVMHandlers
from livemig.wire import (
    GLOBAL_STATE_FIELDS,
    GlobalStateRecord,
    PayloadKind,
    encode_global_state,
)


def global_state_vmdesc() -> dict[str, Any]:
    """QEMU's VM description of ``globalstate`` v1 (as QEMU 10.0 writes it)."""
    return {"vmsd_name": "globalstate", "version": GlobalStateHandler.version_id,
            "fields": [{"name": n, "type": t, "size": s} for n, t, s in GLOBAL_STATE_FIELDS]}


class GlobalStateHandler(SaveVMHandlers):
    idstr = "globalstate"
    version_id = 1
    payload_kind = PayloadKind.GLOBALSTATE

    def __init__(self) -> None:
        self.runstate: str | None = None  # source: set at stop; destination: as received
        self.vm_was_suspended: bool | None = None

    def save_state(self, out: OutStream) -> None:
        out.write(encode_global_state(self.runstate or "running", False))

    def vmstate_description(self) -> dict[str, Any]:
        return global_state_vmdesc()

    def load_event(self, event) -> None:
        if isinstance(event, GlobalStateRecord):
            text = event.runstate
            if not text.replace("-", "").replace("_", "").isalpha():
                raise ValueError(f"globalstate: bad run state {text!r}")
            self.runstate = text
            self.vm_was_suspended = event.vm_was_suspended
