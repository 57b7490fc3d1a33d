"""The VM description livemig writes after EOF: QEMU's form, built from the handlers,
with field sizes that add up to the bytes each section carries."""

from __future__ import annotations

import json
import struct
import zlib

from hypothesis import given
from hypothesis import strategies as st

from livemig.machine.cpu_vmstate import CpuHandler
from livemig.machine.kvm import KvmAccelerator
from livemig.machine.soft import SoftAccelerator
from livemig.machine.vmstate import SaveVMHandlers
from livemig.migration.global_state import GlobalStateHandler
from livemig.migration.savevm import SaveVMState, qemu_savevm_state_vmdesc


class Out:
    def __init__(self) -> None:
        self.data = b""

    def write(self, b) -> None:
        self.data += bytes(b)


class FakeCpu:
    name = "soft"

    def __init__(self, blob: bytes, layout=SoftAccelerator.cpu_state_layout) -> None:
        self.blob = blob
        if layout is not None:
            self.cpu_state_layout = layout

    def save_cpu_state(self) -> bytes:
        return self.blob


class FakeMachine:
    def __init__(self, cpu) -> None:
        self.cpu = cpu


def _size(desc) -> int:
    return sum(f["size"] * f.get("array_len", 1) for f in desc["fields"])


def _state(*handlers) -> SaveVMState:
    state = SaveVMState()
    for h in handlers:
        state.register_savevm_live(h)
    return state


def test_vmdesc_lists_described_handlers_in_section_order_in_qemus_form():
    class Ram(SaveVMHandlers):
        idstr, version_id, iterable = "ram", 4, True

    cpu = CpuHandler(FakeMachine(FakeCpu(struct.pack(">4sIIQI", b"SOFT", 1, 2, 3, 4))))
    gs = GlobalStateHandler()
    out_cpu, out_gs = Out(), Out()
    cpu.save_state(out_cpu)
    gs.save_state(out_gs)
    desc = json.loads(qemu_savevm_state_vmdesc(_state(Ram(), cpu, gs)))
    assert list(desc) == ["page_size", "devices"] and desc["page_size"] == 4096
    assert [d["name"] for d in desc["devices"]] == ["cpu", "globalstate"]   # no ram, as QEMU
    for d, out in zip(desc["devices"], (out_cpu, out_gs), strict=True):
        assert list(d)[:4] == ["name", "instance_id", "vmsd_name", "version"]
        assert all({"name", "type", "size"} <= set(f) for f in d["fields"])
        assert _size(d) == len(out.data)
    names = [f["name"] for f in desc["devices"][0]["fields"]]
    assert names == ["size", "accel_len", "accel", "magic", "version", "phase", "page", "passes"]


def test_cpu_without_a_layout_is_one_buffer_and_unsaved_cpu_is_not_listed():
    cpu = CpuHandler(FakeMachine(FakeCpu(b"xyz", layout=None)))
    assert cpu.vmstate_description() is None
    out = Out()
    cpu.save_state(out)
    d = cpu.vmstate_description()
    assert d["fields"][-1] == {"name": "state", "type": "buffer", "size": 3}
    assert _size(d) == len(out.data)


def _kvmc(parts: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack("<4sI", t, len(d)) + d for t, d in parts)
    blob = struct.pack("<4sHHI", b"KVMC", 1, len(parts), 12 + len(body) + 4) + body
    return blob + struct.pack("<I", zlib.crc32(blob))


@given(st.lists(st.tuples(st.sampled_from([b"REGS", b"SREG", b"XSAV", b"MSRS", b"VMST"]),
                          st.binary(max_size=64)), max_size=6, unique_by=lambda p: p[0]))
def test_kvm_layout_covers_the_blob_exactly(parts):
    blob = _kvmc(parts)
    layout = KvmAccelerator.cpu_state_layout(blob)
    assert sum(s for _, _, s in layout) == len(blob)
    names = [n for n, _, _ in layout]
    assert names[:4] == ["magic", "version", "count", "total"] and names[-1] == "crc32"
    for tag, data in parts:
        name = tag.decode().strip().lower()
        assert f"{name}.tag" in names and (name in names) == bool(data)


def test_accel_entry_names_its_framing():
    from livemig.machine.accel_vmstate import AccelHandler
    d = AccelHandler.vmstate_description(AccelHandler.__new__(AccelHandler))
    assert d["x-livemig-framing"] == "vfio-tagged" and d["fields"] == []


def test_the_configuration_is_described_with_its_uuid_subsection():
    import json

    from livemig.migration.savevm import SaveVMState, qemu_savevm_state_vmdesc
    desc = json.loads(qemu_savevm_state_vmdesc(SaveVMState(),
                                               ("livemig-pc-10.0", bytes(range(16)))))
    conf = desc["configuration"]
    assert conf["fields"] == [{"name": "len", "type": "uint32", "size": 4},
                              {"name": "name", "type": "buffer", "size": 15}]
    assert conf["subsections"][0]["vmsd_name"] == "configuration/uuid"
    assert conf["subsections"][0]["fields"][0]["size"] == 16
    plain = json.loads(qemu_savevm_state_vmdesc(SaveVMState(), ("livemig-pc-10.0", None)))
    assert "subsections" not in plain["configuration"]
