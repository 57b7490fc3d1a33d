"""``livemig analyze FILE``: what a migration stream (livemig or QEMU 10.0) holds.

The stream is read as QEMU's own analyzer reads it: the VM description at the
end of the file first (``QEMU_VM_VMDESCRIPTION``, after EOF), since QEMU's
device sections are VMState-encoded without a length; then every record from
the start: the header, the configuration, each section (id, name, instance,
version, type, payload bytes), the commands, and inside the sections

* ``ram``: RAM records, pages by kind (zero, normal) per block, MULTIFD_FLUSH
  markers, EOS;
* VFIO-framed sections (a vmdesc entry with ``x-livemig-framing:
  vfio-tagged``, livemig's ``<id>/accel``): tags, data chunks, and the
  switchover-ack marker DEV_INIT_DATA_SENT;
* every other section: walked with its vmdesc entry (``fields``, ``struct``,
  ``array_len``, ``subsections``), as QEMU's analyzer does.

:func:`analyze_stream` is pure (bytes in, a JSON-able dict out); :func:`main`
prints it with rich, or as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import struct
import sys
from collections import Counter
from typing import Any

from livemig.wire.constants import MigCmd, VfioMigFlag

MAGIC, VERSION = 0x5145564D, 3
EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND = range(9)
FOOTER = 0x7E
PAGE = 4096
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
F_XBZRLE, F_HOOK, F_MULTIFD_FLUSH = 0x40, 0x80, 0x200
_TYPES = {START: "start", PART: "part", END: "end", FULL: "full"}
_BE16, _BE32, _BE64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


class AnalyzeError(Exception):
    """The stream is not one this reader can walk; ``offset`` is where."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at offset {offset} = 0x{offset:x})")
        self.offset = offset


class _Reader:
    def __init__(self, data: bytes | mmap.mmap | memoryview) -> None:
        self.data = data
        self.pos = 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise AnalyzeError(f"stream ends inside a record ({n} bytes wanted, "
                               f"{len(self.data) - self.pos} left)", self.pos)

    def u8(self) -> int:
        self.need(1)
        self.pos += 1
        return self.data[self.pos - 1]

    def _unpack(self, st: struct.Struct) -> int:
        self.need(st.size)
        (v,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return v

    def be16(self) -> int:
        return self._unpack(_BE16)

    def be32(self) -> int:
        return self._unpack(_BE32)

    def be64(self) -> int:
        return self._unpack(_BE64)

    def take(self, n: int) -> bytes:
        self.need(n)
        self.pos += n
        return bytes(self.data[self.pos - n:self.pos])

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def name(self) -> str:
        return self.take(self.u8()).decode("utf-8", "backslashreplace")


def find_vmdesc(data: bytes | mmap.mmap) -> tuple[int, dict[str, Any]] | None:
    """(offset of the QEMU_VM_VMDESCRIPTION byte, the parsed JSON), or None.
    The JSON is the end of the file and text: the last 0x06 byte is its header."""
    end = len(data)
    pos = data.rfind(b"\x06", max(0, end - (64 << 20)))
    while pos >= 0:
        if pos + 5 <= end and _BE32.unpack_from(data, pos + 1)[0] == end - pos - 5:
            try:
                return pos, json.loads(bytes(data[pos + 5:end]))
            except ValueError:
                return None
        pos = data.rfind(b"\x06", max(0, end - (64 << 20)), pos)
    return None


def _walk_vmstate(r: _Reader, desc: dict[str, Any], depth: int = 0) -> None:
    """Consume one VMState struct as its vmdesc entry describes it."""
    if depth > 32:
        raise AnalyzeError("VM description nests too deep", r.pos)
    for field in desc.get("fields", []):
        count = int(field.get("array_len", 1))
        if field.get("type") == "struct":
            for _ in range(count):
                _walk_vmstate(r, field["struct"], depth + 1)
        else:
            r.skip(int(field["size"]) * count)
    for sub in desc.get("subsections", []):
        at = r.pos
        if r.u8() != SUBSECTION:
            raise AnalyzeError(f"subsection {sub.get('vmsd_name')} not found", at)
        r.name()
        r.be32()
        _walk_vmstate(r, sub, depth + 1)


class _Ram:
    """RAM records of all ``ram`` sections: pages per block and kind."""

    def __init__(self) -> None:
        self.blocks: dict[str, dict[str, int]] = {}
        self.multifd_flush = 0
        self.eos = 0
        self._last: str | None = None

    def _block(self, r: _Reader, flags: int, at: int) -> str:
        if flags & F_CONTINUE:
            if self._last is None:
                raise AnalyzeError("RAM CONTINUE record with no block before it", at)
            return self._last
        self._last = r.name()
        if self._last not in self.blocks:
            raise AnalyzeError(f"RAM record for unknown block {self._last}", at)
        return self._last

    def read(self, r: _Reader) -> None:
        while True:
            at = r.pos
            addr = r.be64()
            flags = addr & (PAGE - 1)
            if flags & F_MEM_SIZE:
                total = addr & ~(PAGE - 1)
                while total > 0:
                    name = r.name()
                    length = r.be64()
                    self.blocks.setdefault(name, {"length": length, "zero": 0, "normal": 0})
                    total -= length
                flags &= ~F_MEM_SIZE
            if flags & F_ZERO:
                block = self._block(r, flags, at)
                r.skip(1)
                self.blocks[block]["zero"] += 1
                flags &= ~(F_ZERO | F_CONTINUE)
            elif flags & F_PAGE:
                block = self._block(r, flags, at)
                r.skip(PAGE)
                self.blocks[block]["normal"] += 1
                flags &= ~(F_PAGE | F_CONTINUE)
            elif flags & (F_XBZRLE | F_HOOK):
                raise AnalyzeError(f"RAM flags 0x{flags:x} (xbzrle/rdma) are not supported", at)
            if flags & F_MULTIFD_FLUSH:
                self.multifd_flush += 1
                flags &= ~F_MULTIFD_FLUSH
            if flags & F_EOS:
                self.eos += 1
                return
            if flags:
                raise AnalyzeError(f"unknown RAM flags 0x{flags:x}", at)


def _read_tagged(r: _Reader, sec: dict[str, Any], markers: list[dict[str, Any]],
                 section_id: int) -> None:
    """A VFIO-framed payload, up to END_OF_STATE or DEV_INIT_DATA_SENT."""
    while True:
        at = r.pos
        tag = r.be64()
        if tag == VfioMigFlag.DEV_DATA_STATE:
            size = r.be64()
            r.skip(size)
            sec["data_chunks"] = sec.get("data_chunks", 0) + 1
            sec["data_bytes"] = sec.get("data_bytes", 0) + size
        elif tag in (VfioMigFlag.DEV_CONFIG_STATE, VfioMigFlag.DEV_SETUP_STATE):
            name = VfioMigFlag(tag).name
            sec.setdefault("markers", Counter())[name] += 1
        elif tag == VfioMigFlag.END_OF_STATE:
            return
        elif tag == VfioMigFlag.DEV_INIT_DATA_SENT:
            markers.append({"section": sec["name"], "section_id": section_id, "offset": at})
            sec.setdefault("markers", Counter())["DEV_INIT_DATA_SENT"] += 1
            return
        else:
            raise AnalyzeError(f"{sec['name']}: unknown VFIO tag 0x{tag:x}", at)


def analyze_stream(data: bytes | mmap.mmap) -> dict[str, Any]:
    """Everything :mod:`livemig.cli.analyze` reports about one stream."""
    found = find_vmdesc(data)
    vmdesc = found[1] if found else None
    devices = {(d.get("name"), d.get("instance_id", 0)): d
               for d in (vmdesc or {}).get("devices", [])}
    r = _Reader(data)
    if r.be32() != MAGIC:
        raise AnalyzeError("not a migration stream (no QEVM magic)", 0)
    version = r.be32()
    if version != VERSION:
        raise AnalyzeError(f"unsupported stream version {version}", 4)
    out: dict[str, Any] = {"bytes": len(data), "version": version, "configuration": None}
    ram = _Ram()
    sections: dict[int, dict[str, Any]] = {}
    commands: list[dict[str, Any]] = []
    init_data_sent: list[dict[str, Any]] = []
    end_offset = None
    while True:
        at = r.pos
        t = r.u8()
        if t == EOF:
            end_offset = at
            break
        if t == CONFIG:
            conf_desc = (vmdesc or {}).get("configuration")
            n = r.be32()
            machine = r.take(n).decode("utf-8", "backslashreplace")
            uuid = None
            if conf_desc is not None:
                for sub in conf_desc.get("subsections", []):
                    if r.u8() != SUBSECTION:
                        raise AnalyzeError("configuration subsection missing", r.pos - 1)
                    name = r.name()
                    r.be32()
                    if name == "configuration/uuid":
                        uuid = r.take(16).hex()
                    else:
                        _walk_vmstate(r, sub)
            else:
                while r.pos < len(data) and data[r.pos] == SUBSECTION:
                    sub_at = r.pos
                    r.u8()
                    name = r.name()
                    r.be32()
                    if name != "configuration/uuid":
                        raise AnalyzeError(f"configuration subsection {name} is not "
                                           "described", sub_at)
                    uuid = r.take(16).hex()
            out["configuration"] = {"machine_type": machine, "uuid": uuid,
                                    "bytes": r.pos - at}
            continue
        if t == COMMAND:
            cmd, n = r.be16(), r.be16()
            payload = r.take(n)
            try:
                name = MigCmd(cmd).name
            except ValueError:
                name = f"0x{cmd:x}"
            entry: dict[str, Any] = {"offset": at, "command": name, "length": n}
            if cmd == MigCmd.PING and n == 4:
                entry["value"] = _BE32.unpack(payload)[0]
            commands.append(entry)
            continue
        if t not in _TYPES:
            raise AnalyzeError(f"unknown record type {t}", at)
        section_id = r.be32()
        if t in (START, FULL):
            idstr = r.name()
            instance_id, vid = r.be32(), r.be32()
            sec = sections.setdefault(section_id, {
                "section_id": section_id, "name": idstr, "instance_id": instance_id,
                "version": vid, "records": Counter(), "bytes": 0})
        else:
            started = sections.get(section_id)
            if started is None:
                raise AnalyzeError(f"section {section_id} continued before it started", at)
            sec = started
        sec["records"][_TYPES[t]] += 1
        p0 = r.pos
        desc = devices.get((sec["name"], sec["instance_id"]))
        if sec["name"] == "ram":
            ram.read(r)
        elif desc is not None and desc.get("x-livemig-framing") == "vfio-tagged":
            _read_tagged(r, sec, init_data_sent, section_id)
        elif desc is not None and "fields" in desc:
            _walk_vmstate(r, desc)
        else:
            raise AnalyzeError(f"section '{sec['name']}' is not in the VM description: "
                               "its payload cannot be walked", p0)
        sec["bytes"] += r.pos - p0
        if sec["name"] != "ram":
            sec.setdefault("payloads", []).append([p0, r.pos - p0])
        if r.pos < len(data) and data[r.pos] == FOOTER:
            r.u8()
            fid = r.be32()
            if fid != section_id:
                raise AnalyzeError(f"footer of section {section_id} says {fid}", r.pos - 4)
    if found is not None:
        if found[0] != end_offset + 1:
            raise AnalyzeError("data between EOF and the VM description", end_offset + 1)
    out["sections"] = [{**s, "records": dict(s["records"]),
                        **({"markers": dict(s["markers"])} if "markers" in s else {})}
                       for s in sections.values()]
    blocks = ram.blocks
    out["ram"] = {"blocks": blocks,
                  "zero": sum(b["zero"] for b in blocks.values()),
                  "normal": sum(b["normal"] for b in blocks.values()),
                  "multifd_flush": ram.multifd_flush, "eos": ram.eos}
    out["commands"] = commands
    out["switchover_ack"] = {"dev_init_data_sent": init_data_sent}
    out["eof_offset"] = end_offset
    desc_json: dict[str, Any] = vmdesc or {}
    out["vmdesc"] = None if found is None else {
        "offset": found[0], "bytes": len(data) - found[0] - 5,
        "page_size": desc_json.get("page_size"),
        "devices": [{"name": d.get("name"), "instance_id": d.get("instance_id"),
                     "vmsd_name": d.get("vmsd_name"), "version": d.get("version"),
                     "fields": len(d.get("fields", [])),
                     "subsections": len(d.get("subsections", []))}
                    for d in desc_json.get("devices", [])],
        "json": vmdesc}
    return out


def _print_human(rep: dict[str, Any], path: str, show_desc: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    conf = rep["configuration"] or {}
    con.print(f"[bold]{path}[/bold]: {rep['bytes']} bytes, stream version {rep['version']}, "
              f"machine [cyan]{conf.get('machine_type')}[/cyan]"
              + (f", uuid {conf['uuid']}" if conf.get("uuid") else ""))
    t = Table(title="sections")
    for col in ("id", "name", "inst", "ver", "records", "payload bytes", "notes"):
        t.add_column(col, justify="right" if col in ("id", "inst", "ver", "payload bytes")
                     else "left", overflow="fold")
    for s in rep["sections"]:
        recs = " ".join(f"{k}:{v}" for k, v in s["records"].items())
        notes = []
        if "data_chunks" in s:
            notes.append(f"{s['data_chunks']} data chunks ({s['data_bytes']} B)")
        for k, v in s.get("markers", {}).items():
            notes.append(f"{k} x{v}")
        t.add_row(str(s["section_id"]), s["name"], str(s["instance_id"]), str(s["version"]),
                  recs, str(s["bytes"]), ", ".join(notes))
    con.print(t)
    ram = rep["ram"]
    t = Table(title="RAM pages")
    for col in ("block", "length", "zero", "normal"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for name, b in ram["blocks"].items():
        t.add_row(name, f"0x{b['length']:x}", str(b["zero"]), str(b["normal"]))
    t.add_row("[bold]total[/bold]", "", str(ram["zero"]), str(ram["normal"]))
    con.print(t)
    con.print(f"multifd flush markers: {ram['multifd_flush']}, RAM EOS: {ram['eos']}")
    cmds = Counter(c["command"] for c in rep["commands"])
    con.print("commands: " + (", ".join(f"{k} x{v}" for k, v in cmds.items()) or "none"))
    acks = rep["switchover_ack"]["dev_init_data_sent"]
    con.print("switchover-ack markers (DEV_INIT_DATA_SENT): "
              + (", ".join(f"{a['section']} @0x{a['offset']:x}" for a in acks) or "none"))
    vd = rep["vmdesc"]
    if vd is None:
        con.print("VM description: [red]none[/red]")
        return
    con.print(f"VM description: {vd['bytes']} bytes at 0x{vd['offset']:x}, page size "
              f"{vd['page_size']}, {len(vd['devices'])} devices")
    t = Table(title="VM description")
    for col in ("name", "inst", "vmsd_name", "ver", "fields", "subsections"):
        t.add_column(col)
    for d in vd["devices"]:
        t.add_row(str(d["name"]), str(d["instance_id"]), str(d["vmsd_name"]),
                  str(d["version"]), str(d["fields"]), str(d["subsections"]))
    con.print(t)
    if show_desc:
        con.print_json(json.dumps(vd["json"]))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="livemig analyze",
                                 description="Inspect a livemig or QEMU 10.0 migration stream "
                                             "(a file: migration's file).")
    ap.add_argument("file")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--desc", action="store_true",
                    help="also print the whole VM description JSON (human output)")
    args = ap.parse_args(argv)
    try:
        with open(args.file, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise AnalyzeError("empty file", 0)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                rep = analyze_stream(data)
    except (OSError, AnalyzeError) as exc:
        print(f"livemig analyze: {args.file}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_human(rep, args.file, args.desc)
    return 0
