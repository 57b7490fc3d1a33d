"""The ``globalstate`` section: the source's run state at switchover.

The destination starts the guest only if the source was running (QEMU's
migration/global_state.c). Payload: the run-state name, as a BLOB.
"""

from __future__ import annotations

from livemig.machine.vmstate import OutStream, SaveVMHandlers
from livemig.wire import Blob, PayloadKind, encode_blob


class GlobalStateHandler(SaveVMHandlers):
    idstr = "globalstate"
    version_id = 1
    payload_kind = PayloadKind.BLOB

    def __init__(self) -> None:
        self.runstate: str | None = None  # source: set at stop; destination: as received

    def save_state(self, out: OutStream) -> None:
        out.write(encode_blob((self.runstate or "running").encode()))

    def load_event(self, event) -> None:
        if isinstance(event, Blob):
            text = bytes(event.data).decode(errors="replace")
            if len(text) > 32 or not text.replace("-", "").isalpha():
                raise ValueError(f"globalstate: bad run state {text!r}")
            self.runstate = text
