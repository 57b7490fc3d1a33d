"""QEMU's microvm sections as VMState codecs (livemig.wire.vmstate): round
trips of every section with hypothesis, QEMU's ``needed`` rules, version
gating, and what a decoder refuses. The streams QEMU writes are checked in
tests/e2e/test_microvm_sections.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.wire.global_state import encode_global_state
from livemig.wire.vmstate.codec import (
    VMStateDescription,
    VMStateError,
    VMStateField,
    VMStateTruncated,
    decode,
    default_values,
    describe,
    encode,
    is_needed,
    sub,
)
from livemig.wire.vmstate.cpu import CPU, CPU_SUBSECTIONS, TSC_KHZ
from livemig.wire.vmstate.devices import FW_CFG, IOAPIC, SERIAL, SERIAL_STATE, TIMER
from livemig.wire.vmstate.microvm import (
    MICROVM_SECTION_ORDER,
    MICROVM_SECTIONS,
    MicrovmConfig,
    decode_section,
    encode_section,
)

_RANGES = {
    "uint8": (0, 0xFF), "uint16": (0, 0xFFFF), "uint32": (0, 0xFFFFFFFF),
    "uint64": (0, 2**64 - 1), "int8": (-128, 127), "int16": (-2**15, 2**15 - 1),
    "int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1), "timer": (-1, 2**63 - 1),
}


def field_values(f: VMStateField) -> st.SearchStrategy[Any]:
    if f.kind in _RANGES:
        lo, hi = _RANGES[f.kind]
        one: st.SearchStrategy[Any] = st.integers(lo, hi)
    elif f.kind == "bool":
        one = st.booleans()
    elif f.kind == "buffer":
        one = st.binary(min_size=f.size, max_size=f.size)
    else:
        assert f.struct is not None
        one = values_of(f.struct)
    if f.count is None:
        return one
    if f.count > 64:        # AMX tile data: a sparse pattern is enough
        return st.lists(st.sampled_from([0, 1, 0xFF]), min_size=f.count, max_size=f.count)
    return st.lists(one, min_size=f.count, max_size=f.count)


@st.composite
def values_of(draw: st.DrawFn, desc: VMStateDescription) -> dict[str, Any]:
    """Any values for ``desc`` at its current version, any subsections."""
    out = {f.name: draw(field_values(f)) for f in desc.fields
           if f.kind != "unused_buffer" and f.present(desc.version_id)}
    for s in desc.subsections:
        if draw(st.booleans()):
            out[s.name] = draw(values_of(s))
    return out


def as_sent(desc: VMStateDescription, values: dict[str, Any], config: Any) -> dict[str, Any]:
    """What a receiver decodes: the subsections the rules send, nothing else."""
    out = {k: v for k, v in values.items() if not k.startswith(desc.name + "/")
           and k not in {s.name for s in desc.subsections}}
    for f in desc.fields:
        if f.struct is not None and f.name in out:
            if f.count is None:
                out[f.name] = as_sent(f.struct, out[f.name], config)
            else:
                out[f.name] = [as_sent(f.struct, x, config) for x in out[f.name]]
    for s in desc.subsections:      # a subsection sent without values sends its defaults
        if is_needed(s, values, config):
            out[s.name] = as_sent(s, dict(sub(values, s)), config)
    return out


CONFIGS = st.builds(MicrovmConfig, tcg=st.booleans(), save_tsc_khz=st.booleans(),
                    migrate_smi_count=st.booleans(), enable_lmce=st.booleans(),
                    cpu_features=st.frozensets(st.sampled_from(
                        ["tsx-ctrl", "sgx-lc", "xfd", "fred", "amx-tile", "svm-tsc-scale"])))


@pytest.mark.parametrize("idstr", sorted(MICROVM_SECTIONS))
@settings(max_examples=40, deadline=None)
@given(data=st.data(), config=CONFIGS)
def test_every_section_round_trips(idstr, data, config):
    desc = MICROVM_SECTIONS[idstr]
    values = data.draw(values_of(desc))
    wire = encode(desc, values, config)
    got, end = decode(desc, wire + b"\x7e", 0, complete=True)   # a footer after it stays
    assert end == len(wire)
    assert got == as_sent(desc, values, config)
    assert encode(desc, got, config) == wire
    assert encode_section(idstr, got, config) == wire
    assert decode_section(idstr, desc.version_id, wire, complete=True) == (got, len(wire))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_prefix_of_a_payload_is_truncated(data):
    """Even the prefix that ends right after the fields: only the next byte
    says whether subsections follow."""
    desc = data.draw(st.sampled_from([SERIAL, FW_CFG, TIMER, IOAPIC]))
    wire = encode(desc, data.draw(values_of(desc)), MicrovmConfig())
    cut = data.draw(st.integers(0, len(wire)))
    with pytest.raises(VMStateTruncated):
        decode(desc, wire[:cut])
    assert decode(desc, wire, complete=True)[1] == len(wire)


def test_default_cpu_state_is_qemus_size():
    """1817 bytes of main fields; a reset CPU needs no subsection (poll control
    on and fast strings on are the reset values), tsc_khz adds 25 bytes:
    the 1842 bytes QEMU 10.0.2 writes for microvm's stopped vCPU here."""
    values = default_values(CPU)
    assert len(encode(CPU, values)) == 1817
    values["cpu/tsc_khz"] = {"env.tsc_khz": 2_600_000}
    assert len(encode(CPU, values)) == 1842
    assert len(encode(CPU, values, MicrovmConfig(save_tsc_khz=False))) == 1817
    assert len(CPU_SUBSECTIONS) == 42


@pytest.mark.parametrize("name,values,sent", [
    ("cpu/poll_control_msr", {"env.poll_control_msr": 1}, False),
    ("cpu/poll_control_msr", {"env.poll_control_msr": 0}, True),
    ("cpu/msr_ia32_misc_enable", {"env.msr_ia32_misc_enable": 1}, False),
    ("cpu/msr_ia32_misc_enable", {"env.msr_ia32_misc_enable": 0x801}, True),
    ("cpu/msr_tsc_adjust", {"env.tsc_adjust": 0}, False),
    ("cpu/msr_tsc_adjust", {"env.tsc_adjust": 5}, True),
    ("cpu/tsc_khz", {"env.tsc_khz": 0}, False),
    ("cpu/msr_smi_count", {"env.msr_smi_count": 3}, True),
    ("cpu/mcg_ext_ctl", {"env.mcg_ext_ctl": 1}, False),        # lmce off
    ("cpu/exception_info", {"env.exception_pending": 1, "env.exception_injected": 0,
                            "env.exception_has_payload": 0, "env.exception_payload": 0},
     False),                                                   # not in guest mode
    ("cpu/msr_tsx_ctrl", {"env.tsx_ctrl": 0}, False),          # qemu64: no TSX_CTRL
    ("cpu/pdptrs", {"env.pdptrs": [1, 2, 3, 4]}, True),        # KVM said they are valid
    ("cpu/svm_guest", {"env.int_ctl": 1}, False),              # KVM, not TCG
])
def test_cpu_needed_rules(name, values, sent):
    cpu = default_values(CPU)
    cpu[name] = values
    sub = CPU.subsection(name)
    assert sub is not None
    assert is_needed(sub, cpu, MicrovmConfig()) is sent


def test_guest_mode_sends_the_exception_info():
    cpu = default_values(CPU)
    cpu["env.hflags"] = 1 << 21
    cpu["cpu/exception_info"] = {"env.exception_pending": 1, "env.exception_injected": 0,
                                 "env.exception_has_payload": 1, "env.exception_payload": 7}
    got, _ = decode(CPU, encode(CPU, cpu), complete=True)
    assert got["cpu/exception_info"]["env.exception_payload"] == 7


def test_features_send_their_subsections_even_when_zero():
    cpu = default_values(CPU)
    plain = encode(CPU, cpu)
    fred = encode(CPU, cpu, MicrovmConfig(cpu_features=frozenset({"fred"})))
    assert fred[:len(plain)] == plain
    assert fred[len(plain):] == b"\x05\x08cpu/fred" + (1).to_bytes(4, "big") + bytes(80)


def test_serial_rules():
    s = default_values(SERIAL_STATE)
    s.update(ier=0x02, iir=0x02)                     # THRI enabled, THR empty pending
    s["serial/thr_ipending"] = {"thr_ipending": 1}   # as IIR says: recomputed, not sent
    assert not is_needed(SERIAL_STATE.subsections[0], s, None)
    s["serial/thr_ipending"] = {"thr_ipending": 0}   # differs from IIR: sent
    assert is_needed(SERIAL_STATE.subsections[0], s, None)
    poll = SERIAL_STATE.subsection("serial/poll")
    assert poll is not None and not is_needed(poll, default_values(SERIAL_STATE), None)


def test_older_versions_decode_with_their_fields():
    """cpu v11 has no XSAVE fields; fw_cfg v1 a 16-bit offset; timer v1 no
    cpu_clock_offset. A struct is read at its own version whatever the
    section's (VMSTATE_STRUCT): serial v2 still carries the v3 16550."""
    v12 = encode(CPU, default_values(CPU))
    xsave = 8 + 8 + 16 * 16
    got, end = decode(CPU, v12[:-xsave], 0, 11, complete=True)
    assert end == len(v12) - xsave and "env.xcr0" not in got
    got, end = decode(FW_CFG, b"\x00\x19\x00\x04", 0, 1, complete=True)
    assert got == {"cur_entry": 0x19, "cur_offset": 4} and end == 4
    got, end = decode(TIMER, bytes(16), 0, 1, complete=True)
    assert got == {"cpu_ticks_offset": 0} and end == 16
    got, end = decode(SERIAL, bytes(11), 0, 2, complete=True)
    assert "fcr_vmstate" in got["state"] and end == 11


@pytest.mark.parametrize("desc,version,why", [
    (CPU, 13, "cpu: incoming version_id 13 is too new for local version_id 12"),
    (CPU, 10, "cpu: incoming version_id 10 is too old for local minimum version_id  11"),
])
def test_versions_out_of_range_are_refused(desc, version, why):
    with pytest.raises(VMStateError, match=why):
        decode(desc, bytes(4096), 0, version)


def test_unknown_and_repeated_subsections_are_refused():
    wire = encode(TSC_KHZ.__class__("kvmclock", 1, 1, (VMStateField("clock", "uint64"),)),
                  {"clock": 1})
    kvmclock = MICROVM_SECTIONS["kvmclock"]
    bogus = wire + b"\x05\x0ekvmclock/bogus" + bytes(4)
    with pytest.raises(VMStateError, match="kvmclock: unknown subsection 'kvmclock/bogus'"):
        decode(kvmclock, bogus, complete=True)
    twice = wire + 2 * (b"\x05\x1akvmclock/clock_is_reliable" + (1).to_bytes(4, "big") + b"\1")
    with pytest.raises(VMStateError, match="sent twice"):
        decode(kvmclock, twice, complete=True)
    # A 0x05 byte not followed by a name of this device ends its subsections.
    got, end = decode(kvmclock, wire + b"\x05\x03abc", complete=True)
    assert got == {"clock": 1} and end == len(wire)


def test_unknown_section_has_qemus_words():
    with pytest.raises(VMStateError, match="Unknown savevm section or instance 'hpet' 0"):
        decode_section("hpet", 1, b"", complete=True)


def test_globalstate_is_wire_global_state():
    values, end = decode_section("globalstate", 1, encode_global_state("running"),
                                 complete=True)
    assert end == 104 and values["runstate"].rstrip(b"\0") == b"running"
    assert encode_section("globalstate", values) == encode_global_state("running")


def test_section_order_names_every_section():
    assert {n for n, _ in MICROVM_SECTION_ORDER} == set(MICROVM_SECTIONS)


def test_describe_lists_only_what_is_sent():
    cpu = default_values(CPU)
    cpu["cpu/tsc_khz"] = {"env.tsc_khz": 1}
    d = describe(CPU, cpu, MicrovmConfig())
    assert [s["vmsd_name"] for s in d["subsections"]] == ["cpu/tsc_khz"]
    assert d["fields"][0] == {"name": "env.regs", "array_len": 16, "type": "uint64", "size": 8}
    assert "subsections" not in describe(CPU, cpu, MicrovmConfig(save_tsc_khz=False))


def test_encoder_refuses_what_does_not_fit():
    values = default_values(IOAPIC)
    values["id"] = 256
    with pytest.raises(ValueError, match="ioapic.id: 256 does not fit uint8"):
        encode(IOAPIC, values)
    values = default_values(IOAPIC)
    values["ioredtbl"] = [0] * 23
    with pytest.raises(ValueError, match="23 elements, expected 24"):
        encode(IOAPIC, values)
