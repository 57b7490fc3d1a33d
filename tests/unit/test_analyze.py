"""``livemig analyze`` on streams built with the wire encoders (sans-IO, no VM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from livemig.cli.analyze import AnalyzeError, analyze_stream, find_vmdesc, main
from livemig.migration.global_state import global_state_vmdesc
from livemig.wire import (
    MigCmd,
    SectionType,
    VfioMigFlag,
    encode_command,
    encode_eof,
    encode_footer,
    encode_global_state,
    encode_ping,
    encode_ram_eos,
    encode_ram_multifd_flush,
    encode_ram_pages,
    encode_ram_zero_pages,
    encode_section_header,
    encode_tagged_data,
    encode_tagged_end,
    encode_vmdesc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: streams.py
from streams import preamble, ram_section_start  # noqa: E402

S = SectionType
UUID = bytes(range(16))
VMDESC = {"page_size": 4096, "devices": [
    {"name": "acc0/accel", "instance_id": 0, "vmsd_name": "accel", "version": 1,
     "x-livemig-framing": "vfio-tagged", "fields": []},
    {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 3,
     "fields": [{"name": "a", "type": "uint32", "size": 4},
                {"name": "s", "type": "struct", "array_len": 2, "size": 3,
                 "struct": {"vmsd_name": "s", "version": 0,
                            "fields": [{"name": "x", "type": "uint8", "size": 1},
                                       {"name": "y", "type": "uint16", "size": 2}]}}],
     "subsections": [{"vmsd_name": "dev/sub", "version": 1,
                      "fields": [{"name": "z", "type": "uint64", "size": 8}]}]},
    {"name": "globalstate", "instance_id": 0, **global_state_vmdesc()}]}


def build(vmdesc=VMDESC) -> bytes:
    page = np.full((2, 4096), 7, dtype=np.uint8)
    sub = b"\x05\x07dev/sub" + (1).to_bytes(4, "big") + bytes(8)
    parts = [
        preamble("livemig-pc-10.0", UUID),
        encode_command(MigCmd.OPEN_RETURN_PATH), encode_ping(1),
        ram_section_start(0, [("pc.ram", 1 << 20), ("pc.rom", 8192)]), encode_ram_eos(),
        encode_footer(0),
        encode_section_header(S.SECTION_START, 1, "acc0/accel", 0, 1),
        encode_tagged_end(VfioMigFlag.END_OF_STATE), encode_footer(1),
        encode_section_header(S.SECTION_PART, 0),
        encode_ram_pages("pc.ram", [0, 4096], page, first_has_block_name=True).tobytes(),
        encode_ram_zero_pages("pc.ram", [8192, 12288, 16384],
                              first_has_block_name=False).tobytes(),
        encode_ram_zero_pages("pc.rom", [0], first_has_block_name=True).tobytes(),
        encode_ram_multifd_flush(), encode_ram_eos(), encode_footer(0),
        encode_section_header(S.SECTION_PART, 1), encode_tagged_data(b"abc" * 10),
        encode_tagged_end(VfioMigFlag.DEV_INIT_DATA_SENT), encode_footer(1),
        encode_command(MigCmd.SWITCHOVER_START),
        encode_section_header(S.SECTION_END, 0), encode_ram_eos(), encode_footer(0),
        encode_section_header(S.SECTION_END, 1), encode_tagged_end(), encode_footer(1),
        encode_section_header(S.SECTION_FULL, 2, "dev", 0, 3), bytes(4 + 6) + sub,
        encode_footer(2),
        encode_section_header(S.SECTION_FULL, 3, "globalstate", 0, 1),
        encode_global_state("running"), encode_footer(3),
        encode_eof(), encode_vmdesc(json.dumps(vmdesc).encode()),
    ]
    return b"".join(parts)


def test_everything_is_reported():
    raw = build()
    rep = analyze_stream(raw)
    assert rep["configuration"]["machine_type"] == "livemig-pc-10.0"
    assert rep["configuration"]["uuid"] == UUID.hex()
    secs = {s["name"]: s for s in rep["sections"]}
    assert [s["section_id"] for s in rep["sections"]] == [0, 1, 2, 3]
    assert secs["ram"]["records"] == {"start": 1, "part": 1, "end": 1}
    assert secs["acc0/accel"]["data_chunks"] == 1 and secs["acc0/accel"]["data_bytes"] == 30
    assert secs["acc0/accel"]["markers"] == {"DEV_INIT_DATA_SENT": 1}
    assert secs["dev"]["bytes"] == 10 + 1 + 1 + 7 + 4 + 8
    assert secs["globalstate"]["bytes"] == 104
    ram = rep["ram"]
    assert ram["blocks"]["pc.ram"] == {"length": 1 << 20, "zero": 3, "normal": 2}
    assert ram["blocks"]["pc.rom"] == {"length": 8192, "zero": 1, "normal": 0}
    assert (ram["zero"], ram["normal"], ram["multifd_flush"], ram["eos"]) == (4, 2, 1, 3)
    assert [c["command"] for c in rep["commands"]] == ["OPEN_RETURN_PATH", "PING",
                                                       "SWITCHOVER_START"]
    assert rep["commands"][1]["value"] == 1
    assert rep["switchover_ack"]["dev_init_data_sent"][0]["section"] == "acc0/accel"
    assert rep["vmdesc"]["devices"][1] == {"name": "dev", "instance_id": 0, "vmsd_name": "dev",
                                           "version": 3, "fields": 2, "subsections": 1}
    json.dumps(rep)                                   # JSON-able as it is


def test_find_vmdesc_and_a_stream_without_one():
    raw = build()
    pos, desc = find_vmdesc(raw)
    assert raw[pos] == 6 and desc == VMDESC
    with pytest.raises(AnalyzeError, match="not in the VM description"):
        analyze_stream(raw[:pos])


def test_a_section_the_vmdesc_does_not_list_is_an_error_with_its_offset():
    desc = {**VMDESC, "devices": VMDESC["devices"][:1] + VMDESC["devices"][2:]}
    with pytest.raises(AnalyzeError, match="section 'dev' is not in the VM description"):
        analyze_stream(build(desc))


@pytest.mark.parametrize("cut", [5, 40, 200])
def test_truncated_streams_are_errors(cut):
    raw = build()
    with pytest.raises(AnalyzeError):
        analyze_stream(raw[:cut])


def test_cli_human_and_json(tmp_path, capsys):
    path = tmp_path / "s.mig"
    path.write_bytes(build())
    assert main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ram"]["normal"] == 2
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "acc0/accel" in text and "DEV_INIT_DATA_SENT" in text and "pc.rom" in text
    bad = tmp_path / "bad"
    bad.write_bytes(b"nope")
    assert main([str(bad)]) == 1
    assert "not a migration stream" in capsys.readouterr().err
