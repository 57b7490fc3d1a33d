"""Every section QEMU 10.0.2 writes for ``-M microvm`` decodes field by field
and re-encodes byte for byte (livemig.wire.vmstate).

The streams are made here: QEMU's microvm under KVM boots the walk firmware
(tests/e2e/test_microvm_bios.py) and migrates to ``file:`` -- stopped after
the guest ticked on COM1, and live while a paced guest walks without a
serial. For each section the decoder must end exactly where QEMU's payload
ends (the footer follows), the encoder must give back QEMU's bytes from the
decoded values (so the ``needed`` rules chose QEMU's subsections), and the
VM description livemig derives from the values must equal the one QEMU
wrote at the end of the stream. The layouts are also checked against
``-dump-vmstate`` (every field and subsection, sent or not) where QEMU dumps
the device.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run
from e2e_helpers import needs_qemu_and_kvm

from livemig.cli.analyze import analyze_stream
from livemig.cli.driver import MICROVM_MACHINE, QEMU_BINARY, Vm, VmSpec
from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.kvm import KvmAccelerator, walk_bios_image
from livemig.machine.kvm_vmstate import apic_values, ioapic_values, kvm_ioapic, lapic_regs
from livemig.machine.ram import RamBlock
from livemig.machine.serial import Serial
from livemig.wire import (
    NEED_DATA,
    Closed,
    PayloadKind,
    SectionFull,
    StreamDecoder,
    VmDescription,
    VMStateRecord,
)
from livemig.wire.vmstate.codec import VMStateDescription
from livemig.wire.vmstate.microvm import (
    MICROVM_SECTIONS,
    decode_section,
    describe_section,
    encode_section,
)

pytestmark = [*needs_qemu_and_kvm(), pytest.mark.timeout(120)]

RAM = "128M"
SECTIONS = ["timer", "fw_cfg", "cpu_common", "cpu", "kvm-tpr-opt", "apic", "ioapic", "ioapic",
            "kvmclock", "acpi-ged", "globalstate"]
RAM_BLOCKS = {"microvm.ram": 128 * MIB, "pc.bios": 64 * 1024}
ROM_BLOCKS = {"/rom@etc/acpi/tables", "/rom@etc/table-loader", "/rom@etc/acpi/rsdp"}
# -dump-vmstate's device names for the sections (QEMU dumps no cpu, apic, timer).
DUMP_NAMES = {"fw_cfg": "fw_cfg_io", "kvm-tpr-opt": "kvmvapic", "ioapic": "kvm-ioapic",
              "kvmclock": "kvmclock", "acpi-ged": "acpi-ged", "serial": "isa-serial"}
NOT_DESCRIBED = {"acpi-ged/cpuhp"}       # never sent on microvm: refused if it comes


async def _stream(workdir: Path, name: str, *, serial: bool, live: bool) -> Path:
    if live:    # ~2500 pages/s over 15 MiB: a file: migration converges while it walks
        bios = walk_bios_image(1 * MIB, 16 * MIB, pace=1_000_000)
    else:
        bios = walk_bios_image(1 * MIB, 16 * MIB, tick_pages=256)
    image = workdir / f"{name}.bin"
    image.write_bytes(bios)
    extra = [] if serial else ["-M", "isa-serial=off"]
    vm = await Vm.start(VmSpec(engine="qemu", machine="microvm", name=name, ram=RAM,
                               accel="kvm", boot_image=str(image), extra=extra), str(workdir))
    out = workdir / f"{name}.mig"
    try:
        if serial:
            await vm.wait_serial(lambda d: d.count(b"B") >= 1, timeout=60)
        if not live:
            await vm.cmd("stop")
        await vm.cmd("migrate", uri=f"file:{out}")
        info = await vm.wait_status(timeout=90)
        assert info["status"] == "completed", info
    finally:
        await vm.close()
    return out


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, bytes]:
    workdir = tmp_path_factory.mktemp("microvm-streams")

    async def make() -> dict[str, bytes]:
        return {
            "stopped, serial": (await _stream(workdir, "stopped", serial=True,
                                              live=False)).read_bytes(),
            "live, no serial": (await _stream(workdir, "live", serial=False,
                                              live=True)).read_bytes(),
        }
    return run(make())


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("microvm-dump") / "vmstate.json"
    subprocess.run([QEMU_BINARY, "-M", MICROVM_MACHINE, "-accel", "kvm", "-nodefaults",
                    "-dump-vmstate", str(path)], check=True, capture_output=True, timeout=60)
    return json.loads(path.read_text())


def _section_values(data: bytes) -> dict[tuple[str, int], dict[str, Any]]:
    rep = analyze_stream(data)
    out = {}
    for sec in rep["sections"]:
        if sec["name"] != "ram":
            (offset, _), = sec["payloads"]
            out[(sec["name"], sec["instance_id"])] = decode_section(
                sec["name"], sec["version"], data, offset)[0]
    return out


@pytest.mark.parametrize("kind", ["stopped, serial", "live, no serial"])
def test_every_section_decodes_and_reencodes_byte_for_byte(streams, kind):
    data = streams[kind]
    rep = analyze_stream(data)
    assert rep["configuration"]["machine_type"] == "microvm"
    expected = SECTIONS + (["serial"] if kind.endswith(", serial") else [])
    assert sorted(s["name"] for s in rep["sections"] if s["name"] != "ram") == sorted(expected)
    vmdesc = {(d["name"], d["instance_id"]): d for d in rep["vmdesc"]["json"]["devices"]}
    for sec in rep["sections"]:
        if sec["name"] == "ram":
            continue
        (offset, length), = sec["payloads"]
        name, instance = sec["name"], sec["instance_id"]
        # Streaming decode of the whole file: it stops where the footer begins.
        values, end = decode_section(name, sec["version"], data, offset, instance)
        assert end == offset + length, (name, end - offset, length)
        assert data[end] == 0x7E
        assert encode_section(name, values) == data[offset:end], name
        assert describe_section(name, instance, values) == vmdesc[(name, instance)], name
    blocks = rep["ram"]["blocks"]
    assert {b: blocks[b]["length"] for b in RAM_BLOCKS} == RAM_BLOCKS
    assert set(blocks) == set(RAM_BLOCKS) | ROM_BLOCKS


def test_the_stopped_guest_state_is_the_walks(streams):
    """What the values say about this guest: the vCPU in 32-bit protected mode
    (CR0.PE, the walk's flat CS), not halted, KVM's clock reliable, the two
    IOAPICs' 24 pins each, COM1's divisor as reset left it (the walk never programs it)."""
    got = _section_values(streams["stopped, serial"])
    cpu = got[("cpu", 0)]
    assert cpu["env.cr[0]"] & 1 and cpu["env.segs"][1]["selector"] == 0x08
    assert cpu["cpu/tsc_khz"]["env.tsc_khz"] > 0
    assert got[("cpu_common", 0)]["halted"] == 0
    assert got[("kvmclock", 0)]["kvmclock/clock_is_reliable"]["clock_is_reliable"] is True
    assert all(len(got[("ioapic", i)]["ioredtbl"]) == 24 for i in (0, 1))
    assert got[("serial", 0)]["state"]["divider"] == 0x0C
    assert got[("globalstate", 0)]["runstate"].rstrip(b"\0") == b"paused"


def _dump_shape(desc: VMStateDescription) -> dict[str, Any]:
    """Our description in -dump-vmstate's terms: names, versions, tests, counts,
    scalar sizes; every subsection described, sent or not."""
    return {
        "name": desc.name, "version_id": desc.version_id,
        "minimum_version_id": desc.minimum_version_id,
        "fields": [(re.sub(r"\[\d+\]$", "", f.name), f.since if f.exists is None else 0,
                    f.exists is not None, f.count,
                    _dump_shape(f.struct) if f.struct is not None else f.size)
                   for f in desc.fields],
        "subsections": [_dump_shape(s) for s in desc.subsections],
    }


def _qemu_shape(d: dict[str, Any]) -> dict[str, Any]:
    fields = []
    for f in d.get("Fields", []):
        inner = f.get("Description")
        fields.append((f["field"], f["version_id"], f["field_exists"], f.get("num"),
                       _qemu_shape(inner) if inner is not None else f["size"]))
    return {"name": d["name"], "version_id": d["version_id"],
            "minimum_version_id": d["minimum_version_id"], "fields": fields,
            "subsections": [_qemu_shape(s) for s in d.get("Subsections", [])
                            if s["name"] not in NOT_DESCRIBED]}


@pytest.mark.parametrize("idstr", sorted(DUMP_NAMES))
def test_layouts_match_dump_vmstate(dump, idstr):
    ours = _dump_shape(MICROVM_SECTIONS[idstr])
    qemu = _qemu_shape(dump[DUMP_NAMES[idstr]]["Description"])
    _normalise(ours, qemu)
    assert ours == qemu


def _normalise(ours: dict[str, Any], qemu: dict[str, Any]) -> None:
    """Where the two say the same in different words: QEMU dumps the size of
    the C field (a VBUFFER as 0; fw_cfg's 16-bit v1 offset as its 32-bit
    field), not of what goes on the wire, and a per-slot array with no slots
    as no array."""
    for i, (a, b) in enumerate(zip(ours["fields"], qemu["fields"], strict=False)):
        a = list(a)
        if isinstance(a[4], dict) and isinstance(b[4], dict):
            _normalise(a[4], b[4])
        elif isinstance(b[4], int) and (b[4] == 0 or a[2]):
            a[4] = b[4]
        if a[3] == 0 and b[3] is None:          # a per-slot array with no slots
            a[3] = None
        ours["fields"][i] = tuple(a)
    for a, b in zip(ours["subsections"], qemu["subsections"], strict=False):
        _normalise(a, b)


TIMER_TIMES = ("initial_count_load_time", "next_time", "timer_expiry")


def test_qemus_apic_ioapic_and_clock_load_into_livemigs_kvm(streams, tmp_path):
    """QEMU's apic, ioapic 0 and kvmclock values go into a livemig KVM VM's
    in-kernel irqchip and clock (KVM_SET_LAPIC / KVM_SET_IRQCHIP /
    KVM_SET_CLOCK) and read back as QEMU wrote them, the timer's times aside
    (QEMU's virtual clock at the save); the walk then runs on. Before the
    load, livemig's fresh LAPIC differs from QEMU's only in LINT0, which
    KVM's reset sets to ExtINT (QEMU puts every LVT masked)."""
    q = _section_values(streams["stopped, serial"])
    ram = RamBlock("microvm.ram", 16 * MIB)
    serial = Serial(str(tmp_path / "lm.serial"))
    accel = KvmAccelerator(ram, DirtyLog(ram.npages), serial,
                           GuestConfig(start=1 * MIB, end=5 * MIB, rate_pages_per_s=0),
                           irqchip=True)
    try:
        fresh = apic_values(accel.get_lapic(), accel.apic_base(), now_ns=0)
        differs = {k for k in fresh if k not in TIMER_TIMES and fresh[k] != q[("apic", 0)][k]}
        assert differs == {"lvt"}
        assert [i for i in range(6) if fresh["lvt"][i] != q[("apic", 0)]["lvt"][i]] == [3]
        assert fresh["lvt"][3] == 0x700
        accel.set_lapic(lapic_regs(q[("apic", 0)]))
        back = apic_values(accel.get_lapic(), accel.apic_base(), now_ns=0)
        assert {k: v for k, v in back.items() if k not in TIMER_TIMES} == \
            {k: v for k, v in q[("apic", 0)].items() if k not in TIMER_TIMES}
        accel.set_ioapic(kvm_ioapic(q[("ioapic", 0)]))
        assert ioapic_values(accel.get_ioapic()) == q[("ioapic", 0)]
        accel.set_clock(q[("kvmclock", 0)]["clock"])
        assert accel.get_clock().clock >= q[("kvmclock", 0)]["clock"]
        accel.reset()
        accel.set_lapic(lapic_regs(q[("apic", 0)]))
        accel.resume()
        deadline = time.monotonic() + 20
        while serial.bytes_written < 2:
            assert time.monotonic() < deadline, "the walk did not run after the load"
            time.sleep(0.01)
        accel.pause()
    finally:
        accel.close()
        serial.close()
        ram.close()


@pytest.mark.parametrize("kind", ["stopped, serial", "live, no serial"])
def test_livemigs_stream_decoder_reads_the_whole_qemu_stream(streams, kind):
    """StreamDecoder with ``ram`` as RAM and every microvm device as VMSTATE
    reads QEMU's stream from header to VM description, fed 1 MiB at a time,
    and gives each section's values as decode_section does."""
    data = streams[kind]
    kinds = {"ram": PayloadKind.RAM, **{n: PayloadKind.VMSTATE for n in MICROVM_SECTIONS}}
    dec = StreamDecoder(kinds, vmstate=MICROVM_SECTIONS)
    got: dict[tuple[str, int], dict[str, Any]] = {}
    instance: dict[int, int] = {}
    last: dict[str, int] = {}
    seen_vmdesc = False
    step = 1 << 20
    for i in range(0, len(data) + 1, step):
        dec.receive_data(data[i:i + step])      # the last one is b"": end of data
        while (ev := dec.next_event()) is not NEED_DATA:
            if isinstance(ev, SectionFull):
                instance[ev.section_id] = ev.instance_id
                last[ev.idstr] = ev.section_id
            elif isinstance(ev, VMStateRecord):
                got[(ev.idstr, instance[last[ev.idstr]])] = ev.values
            elif isinstance(ev, VmDescription):
                seen_vmdesc = True
            elif isinstance(ev, Closed):
                break
    assert seen_vmdesc
    assert got == _section_values(data)


# What differs between two fresh (-S) microvms by nature: the clocks and the TSC
# (QEMU's virtual clock and TSC stand still before the first run, livemig's run
# from the machine's creation), and EDX at reset: the vCPU's CPUID signature
# (QEMU's qemu64 0x60fb1, livemig's KVM vCPU KVM's reset value).
FRESH_DIFFER = {("timer", 0): {"cpu_clock_offset", "cpu_ticks_offset"},
                ("apic", 0): {"initial_count_load_time"}, ("kvmclock", 0): {"clock"},
                ("cpu", 0): {"env.tsc"}}


def test_a_fresh_livemig_microvm_sends_what_a_fresh_qemu_microvm_sends(tmp_path):
    """livemig's ``-M microvm`` at reset (``-S``, migrated to ``file:``) writes
    the sections QEMU 10.0.2 writes for the same machine at reset: the same
    list, ids and versions, and the same values field by field but for what
    runs (FRESH_DIFFER) and EDX; so the held devices start as QEMU's do."""
    image = tmp_path / "bios.bin"
    image.write_bytes(walk_bios_image(1 * MIB, 16 * MIB, tick_pages=256))

    async def stream(engine: str) -> bytes:
        vm = await Vm.start(VmSpec(engine=engine, machine="microvm", name=engine, ram=RAM,
                                   accel="kvm", boot_image=str(image), paused=True,
                                   walk_end="16M"), str(tmp_path))
        out = tmp_path / f"{engine}.mig"
        try:
            await vm.cmd("migrate", uri=f"file:{out}")
            info = await vm.wait_status(timeout=60)
            assert info["status"] == "completed", info
        finally:
            await vm.close()
        return out.read_bytes()

    qemu, livemig = run(stream("qemu")), run(stream("livemig"))
    ids = {(s["name"], s["instance_id"]): (s["section_id"], s["version"])
           for s in analyze_stream(qemu)["sections"]}
    assert {(s["name"], s["instance_id"]): (s["section_id"], s["version"])
            for s in analyze_stream(livemig)["sections"]} == ids
    q, lm = _section_values(qemu), _section_values(livemig)
    assert q.keys() == lm.keys()
    for key in q:
        a, b = dict(q[key]), dict(lm[key])
        for name in FRESH_DIFFER.get(key, ()):
            del a[name], b[name]
        if key == ("cpu", 0):
            assert a["env.regs"][2] == 0x60FB1 and b["env.regs"][2] == 0x600
            for v in (a, b):
                v["env.regs"] = v["env.regs"][:2] + v["env.regs"][3:]
        assert a == b, key
