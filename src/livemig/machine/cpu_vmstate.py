"""The ``cpu`` section: vCPU state from the accelerator, as one FULL section."""

from __future__ import annotations

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

    def save_state(self, out: OutStream) -> None:
        name = self.machine.cpu.name.encode()
        out.write(encode_blob(bytes([len(name)]) + name + self.machine.cpu.save_cpu_state()))

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
