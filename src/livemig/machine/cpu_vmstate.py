"""The ``cpu`` section: vCPU state from the accelerator, as one FULL section.

Payload (a BLOB): be32 length, u8 accelerator-name length, the name, then
the accelerator's state blob. The VM description lists these as named
fields, the state blob in the parts the accelerator reports
(``cpu_state_layout``), so QEMU's analyzer walks the section field by field.
"""

from __future__ import annotations

from typing import Any

from livemig.machine.vmstate import OutStream, SaveVMHandlers
from livemig.wire import Blob, PayloadKind, encode_blob


class CpuHandler(SaveVMHandlers):
    """Saved after the guest stopped; loaded before the guest may run.

    The payload starts with the accelerator's name so a soft -> kvm mismatch
    is refused with a reason instead of a garbled vCPU."""

    idstr = "cpu"
    version_id = 1
    payload_kind = PayloadKind.BLOB

    def __init__(self, machine) -> None:
        self.machine = machine
        self._saved: bytes | None = None       # the accelerator blob last saved

    def save_state(self, out: OutStream) -> None:
        name = self.machine.cpu.name.encode()
        self._saved = self.machine.cpu.save_cpu_state()
        out.write(encode_blob(bytes([len(name)]) + name + self._saved))

    def vmstate_description(self) -> dict[str, Any] | None:
        if self._saved is None:
            return None
        cpu = self.machine.cpu
        name = cpu.name.encode()
        layout = getattr(cpu, "cpu_state_layout", None)
        parts = layout(self._saved) if layout is not None else [("state", "buffer",
                                                                  len(self._saved))]
        fields = [{"name": "size", "type": "uint32", "size": 4},
                  {"name": "accel_len", "type": "uint8", "size": 1},
                  {"name": "accel", "type": "buffer", "size": len(name)}]
        if sum(s for _, _, s in parts) != len(self._saved):     # never: but stay truthful
            parts = [("state", "buffer", len(self._saved))]
        fields += [{"name": n, "type": t, "size": s} for n, t, s in parts]
        return {"vmsd_name": f"cpu/{cpu.name}", "version": self.version_id, "fields": fields}

    def load_event(self, event) -> None:
        if not isinstance(event, Blob):
            return
        data = event.data
        n = data[0] if data else 0
        name = bytes(data[1:1 + n]).decode(errors="replace")
        if name != self.machine.cpu.name:
            raise ValueError(f"vCPU state is from accelerator '{name}', "
                             f"this VM runs '{self.machine.cpu.name}'")
        self.machine.cpu.load_cpu_state(bytes(data[1 + n:]))
