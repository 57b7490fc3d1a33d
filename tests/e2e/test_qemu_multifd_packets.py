"""QEMU 10.0.2's multifd channels into livemig's multifd receiver.

A QEMU source (multifd, 2 channels, no return path) migrates to a listener
that records every connection until QEMU closes it. The recorded multifd
channels are QEMU's own packets: each must decode with livemig's decoder as
QEMU's fixed-size packet (128 pages allocated, none in a SYNC packet, the
stream ending exactly on a packet boundary), and a real ``MultifdReceiver`` fed with them over
socketpairs must apply every packet of ``pc.ram`` without an error, putting
QEMU's page contents where the offsets say (checked against QEMU's memory).
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_with, wait_completed

from livemig.cli.bench import walk_image
from livemig.cli.driver import QEMU_BINARY, Vm, VmSpec, qemu_available
from livemig.machine.ram import RamBlock
from livemig.migration.multifd import MultifdReceiver
from livemig.transport import Channel
from livemig.wire import (
    MULTIFD_INIT_SIZE,
    MULTIFD_PACKET_SIZE,
    decode_multifd_init,
    decode_multifd_packet_header,
)

pytestmark = [
    pytest.mark.skipif(qemu_available() is None,
                       reason=f"{QEMU_BINARY} is not installed: no QEMU multifd to read"),
    pytest.mark.timeout(120),
]

RAM = 64 << 20


class Recorder:
    """Accepts connections and keeps each one's bytes until its peer closes."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.streams: list[bytearray] = []
        self.readers: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            buf = bytearray()
            self.streams.append(buf)
            t = threading.Thread(target=self._read, args=(conn, buf), daemon=True)
            self.readers.append(t)
            t.start()

    @staticmethod
    def _read(conn: socket.socket, buf: bytearray) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                buf += data

    def close(self) -> None:
        self.srv.close()
        for t in self.readers:
            t.join(30)


def _packets(stream: bytes) -> list[tuple[int, object, int]]:
    """(pages_alloc, decoded header, data position) of every packet after the init."""
    out, pos = [], MULTIFD_INIT_SIZE
    while pos < len(stream):
        head = stream[pos:pos + MULTIFD_PACKET_SIZE]
        pkt = decode_multifd_packet_header(head)
        alloc = struct.unpack_from(">I", head, 12)[0]
        out.append((alloc, pkt, pos + MULTIFD_PACKET_SIZE))
        pos += MULTIFD_PACKET_SIZE + pkt.normal_pages * 4096
    assert pos == len(stream)                     # ends exactly on a packet boundary
    return out


def _only_pc_ram(stream: bytes) -> bytes:
    """The channel with only the SYNC packets and those of pc.ram."""
    keep = [stream[:MULTIFD_INIT_SIZE]]
    for _, pkt, data in _packets(stream):
        if pkt.sync or pkt.block == "pc.ram":
            keep.append(stream[data - MULTIFD_PACKET_SIZE:data + pkt.normal_pages * 4096])
    return b"".join(keep)


def _receive(streams: list[bytes]) -> tuple[RamBlock, str | None]:
    """Feed the recorded channels (init messages stripped) to a real receiver."""
    ram = RamBlock("pc.ram", RAM)
    pairs = [Channel.socketpair() for _ in streams]
    rx = MultifdReceiver([b for _, b in pairs], ram)
    writers = [threading.Thread(target=lambda a=a, s=s: (a.sendall(s[MULTIFD_INIT_SIZE:]),
                                                         a.close()), daemon=True)
               for (a, _), s in zip(pairs, streams, strict=True)]
    for t in writers:
        t.start()
    syncs = min(sum(1 for _, p, _ in _packets(s) if p.sync) for s in streams)
    for n in range(1, syncs + 1):                 # the load thread's MULTIFD_FLUSHes
        rx.wait_sync(n)
    rx.join(30)
    for t in writers:
        t.join(30)
    for _, b in pairs:
        b.close()
    return ram, rx.error


def test_qemu_multifd_packets_are_read_by_livemig(vms, tmp_path: Path):
    async def body():
        image = walk_image(str(tmp_path / "q.img"), "16M")
        src = await Vm.start(VmSpec(engine="qemu", name="qsrc", ram="64M", accel="auto",
                                    boot_image=image), vms.workdir, timeout=30)
        vms.vms.append(src)
        rec = Recorder()
        try:
            await src.set_caps(multifd=True)
            await src.set_params(multifd_channels=2, max_bandwidth=0)
            await src.cmd("stop")                 # a fixed image: the check below is exact
            await src.cmd("migrate", uri=f"tcp:127.0.0.1:{rec.port}")
            info = await wait_completed(src, timeout=60)
            assert info["status"] == "completed", info
            mem = await src.pmem(0, RAM)
        finally:
            await src.close()                     # QEMU closes every channel
            rec.close()
        streams = [bytes(s) for s in rec.streams]
        multifd = sorted((s for s in streams if s[:4] != b"QEVM"),
                         key=lambda s: decode_multifd_init(s[:MULTIFD_INIT_SIZE]).channel_id)
        assert len(multifd) == 2 and len(streams) == 3
        normal = 0
        for s in multifd:
            for alloc, pkt, _ in _packets(s):
                if pkt.sync:                       # QEMU's SYNC: no pages, no block
                    assert (alloc, pkt.normal_pages, pkt.zero_pages, pkt.block) == (0, 0, 0, "")
                else:                              # QEMU's packet: 512 KiB of 4 KiB pages
                    assert alloc == 128 and pkt.block
                if pkt.block == "pc.ram":
                    normal += pkt.normal_pages
        assert normal > 0
        # QEMU also sends its other RAM blocks (pc.bios, ROMs: livemig has only
        # pc.ram and refuses them: "multifd: unknown ram block"); pc.ram's
        # packets and the SYNCs go to the receiver.
        ram, error = _receive([_only_pc_ram(s) for s in multifd])
        try:
            assert error is None
            # every page QEMU sent as data holds QEMU's bytes (the guest was stopped)
            got = np.frombuffer(mem, np.uint8).reshape(-1, 4096)
            loaded = np.flatnonzero(ram.loaded)
            assert 0 < loaded.size <= normal
            assert np.array_equal(ram.pages[loaded], got[loaded])
        finally:
            ram.close()
    run_with(vms, body)
