"""The destination's measured costs: the savevm layer times each handler's own
work on its final state (FULL/END sections) and its load_complete, in
virtual time, waits for stream data excluded."""

from __future__ import annotations

import sys
from pathlib import Path

from livemig.machine.vmstate import SaveVMHandlers
from livemig.migration import savevm
from livemig.wire import (
    SectionType,
    StreamDecoder,
    encode_blob,
    encode_eof,
    encode_footer,
    encode_vmdesc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadvm_hosts import QuietHost  # noqa: E402
from streams import QEMU_MACHINE, preamble, section  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Device(SaveVMHandlers):
    """Costs ``load_s`` of virtual time per payload, ``done_s`` at the section's
    end, ``complete_s`` in load_complete."""

    def __init__(self, clock: Clock, idstr: str, load_s: float, done_s: float,
                 complete_s: float) -> None:
        self.clock, self.idstr = clock, idstr
        self.load_s, self.done_s, self.complete_s = load_s, done_s, complete_s
        self.loaded: list[bytes] = []

    def load_event(self, event) -> None:
        self.clock.t += self.load_s
        self.loaded.append(bytes(event.data))

    def load_section_done(self, section_type: str) -> None:
        self.clock.t += self.done_s

    def load_complete(self) -> None:
        self.clock.t += self.complete_s


class Host(QuietHost):
    """A LoadvmHost over bytes in memory; every read costs 1 s of virtual time,
    which no device's figure may include."""

    def __init__(self, data: bytes, clock: Clock) -> None:
        self.data, self.clock = memoryview(data), clock
        self.marks: list[str] = []

    def read_into(self, buf) -> int:
        self.clock.t += 1.0
        n = min(len(buf), len(self.data), 7)      # short reads: payloads span them
        buf[:n] = self.data[:n]
        self.data = self.data[n:]
        return n

    def mark(self, name: str) -> None:
        self.marks.append(name)


def test_each_device_is_timed_on_its_own_work_not_on_the_wait_for_data():
    clock = Clock()
    a = Device(clock, "a", load_s=0.25, done_s=0.5, complete_s=0.125)
    b = Device(clock, "b", load_s=0.0, done_s=0.0, complete_s=2.0)
    state = savevm.SaveVMState()
    for h in (a, b):
        state.register_savevm_live(h)
    stream = (preamble(QEMU_MACHINE)
              + section(SectionType.SECTION_FULL, 0, "a") + encode_blob(b"x" * 40)
              + encode_footer(0)
              + section(SectionType.SECTION_FULL, 1, "b") + encode_blob(b"y" * 3)
              + encode_footer(1)
              + encode_eof() + encode_vmdesc(b"{}"))
    dec = StreamDecoder(state.payload_kinds())
    savevm.qemu_loadvm_state(state, Host(stream, clock), dec, machine_type=QEMU_MACHINE,
                             uuid=None, clock=clock)
    assert a.loaded == [b"x" * 40] and b.loaded == [b"y" * 3]
    # Over a dozen 1 s reads happened; none of them counts.
    assert state.final_load_s == {"a": 0.75, "b": 0.0}
    assert state.load_complete_s == {"a": 0.125, "b": 2.0}
