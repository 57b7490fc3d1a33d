"""multifd's RAM packets: QEMU 10.0's fixed-size layout, built for a whole
batch at once; the iovecs that send them; the receiver that reads them into
guest RAM with one readv per packet, and its checks in QEMU's words."""

from __future__ import annotations

import ctypes
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.machine.ram import RamBlock
from livemig.migration.multifd import MultifdReceiver, MultifdSender, packets_iovec
from livemig.transport import Channel
from livemig.transport.channel import IOVEC, iovec_after
from livemig.wire import (
    MULTIFD_FLAG_SYNC,
    MULTIFD_INIT_SIZE,
    MULTIFD_PACKET,
    MULTIFD_PACKET_PAGES,
    MULTIFD_PACKET_SIZE,
    StreamError,
    decode_multifd_packet_header,
    encode_multifd_ram_packets,
    encode_multifd_sync_packet,
)

pytestmark = pytest.mark.timeout(120)

NPAGES = 1024
# QEMU's MultiFDPacket_t before offset[]: hdr{magic, version, flags}, pages_alloc,
# normal_pages, next_packet_size, packet_num (u64), zero_pages, unused32[1],
# unused64[3], ramblock[256]; all big-endian, packed.
QEMU_HEAD = struct.Struct(">IIIIIIQII24x256s")


def batches():
    """(ascending unique page numbers, nonzero mask) for one batch."""
    return st.lists(st.integers(0, NPAGES - 1), unique=True, min_size=1, max_size=600).flatmap(
        lambda pages: st.tuples(st.just(np.array(sorted(pages), dtype=np.int64)),
                                st.lists(st.booleans(), min_size=len(pages),
                                         max_size=len(pages)).map(np.array)))


def test_the_packet_is_qemus_size():
    # sizeof(MultiFDPacket_t) + 128 * sizeof(uint64_t) in QEMU 10.0 (x86, 4 KiB pages)
    assert QEMU_HEAD.size == 320
    assert MULTIFD_PACKET_SIZE == 320 + 8 * 128 == MULTIFD_PACKET.itemsize
    assert MULTIFD_PACKET_PAGES == 128


@settings(max_examples=80, deadline=None)
@given(batches(), st.integers(0, 2**40))
def test_batch_headers_are_qemus_packets(batch, first_num):
    pages, nonzero = batch
    heads = encode_multifd_ram_packets(pages, nonzero, first_packet_num=first_num,
                                       block="pc.ram")
    k = -(-pages.size // MULTIFD_PACKET_PAGES)
    assert heads.size == k
    raw = heads.tobytes()
    for j in range(k):
        rec = raw[j * MULTIFD_PACKET_SIZE:(j + 1) * MULTIFD_PACKET_SIZE]
        magic, version, flags, alloc, normal, nxt, num, zero, _u32, name = \
            QEMU_HEAD.unpack_from(rec)
        part = pages[j * 128:(j + 1) * 128]
        nz = nonzero[j * 128:(j + 1) * 128]
        assert (magic, version, flags, alloc) == (0x11223344, 1, 0, 128)
        assert (normal, zero, nxt, num) == (nz.sum(), (~nz).sum(), nz.sum() * 4096, first_num + j)
        assert name.rstrip(b"\0") == b"pc.ram"
        offs = np.frombuffer(rec, ">u8", offset=320)
        want = np.concatenate([part[nz], part[~nz]]).astype(np.uint64) << np.uint64(12)
        assert np.array_equal(offs[:part.size], want)
        assert not offs[part.size:].any()           # unused entries stay zero
        pkt = decode_multifd_packet_header(rec)      # and our decoder reads it back
        assert (pkt.normal_pages, pkt.zero_pages, pkt.packet_num, pkt.block) == \
            (normal, zero, num, "pc.ram")
        assert np.array_equal(pkt.offsets, want)


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(0, 2**32))
def test_batch_iovec_is_each_header_then_its_normal_pages(batch, seed):
    pages, nonzero = batch
    ram = RamBlock("pc.ram", NPAGES * 4096)
    try:
        ram.pages[:] = np.random.default_rng(seed).integers(0, 256, (NPAGES, 4096),
                                                            dtype=np.uint8)
        heads = encode_multifd_ram_packets(pages, nonzero, first_packet_num=0, block="pc.ram")
        iov = packets_iovec(heads, pages, nonzero, ram.host_address)
        got = b"".join(ctypes.string_at(base, length) for base, length in iov.tolist())
        want = b"".join(
            heads[j:j + 1].tobytes()
            + ram.pages[pages[j * 128:(j + 1) * 128][nonzero[j * 128:(j + 1) * 128]]].tobytes()
            for j in range(heads.size))
        assert got == want
        assert all(length for _, length in iov.tolist())   # no empty buffers
    finally:
        ram.close()


def test_sync_packet():
    head = encode_multifd_sync_packet(packet_num=7)
    pkt = decode_multifd_packet_header(head.tobytes())
    assert pkt.sync and pkt.flags == MULTIFD_FLAG_SYNC
    assert (pkt.normal_pages, pkt.zero_pages, pkt.packet_num, pkt.block) == (0, 0, 7, "")
    assert head.nbytes == MULTIFD_PACKET_SIZE
    # as QEMU 10.0 sends it (tests/e2e/test_qemu_multifd_packets.py): no pages allocated
    assert head["pages_alloc"][0] == 0


def _header(**fields) -> bytes:
    h = encode_multifd_ram_packets(np.arange(4), np.ones(4, bool), first_packet_num=0,
                                   block="pc.ram")
    for name, value in fields.items():
        h[name] = value
    return h.tobytes()


@pytest.mark.parametrize("fields,text", [
    ({"magic": 0x1234}, "multifd: received packet magic 1234, expected 11223344"),
    ({"version": 2}, "multifd: received packet version 2, expected 1"),
    ({"pages_alloc": 256}, "multifd: received packet with 256 pages, expected 128"),
    ({"pages_alloc": 4, "normal_pages": 5},
     "multifd: received packet with 5 non-zero pages, which exceeds maximum expected pages 4"),
    ({"normal_pages": 100, "zero_pages": 29},
     "multifd: received packet with 29 zero pages, expected maximum 28"),
])
def test_bad_headers_get_qemus_texts(fields, text):
    # QEMU 10.0: multifd_recv_unfill_packet_header, multifd_ram_unfill_packet
    with pytest.raises(StreamError) as e:
        decode_multifd_packet_header(_header(**fields))
    assert str(e.value).startswith(text)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=3 * 4096 + 500), st.integers(1, 5000), st.booleans(),
       st.booleans())
def test_recv_iovec_fills_every_buffer_across_short_reads(data, piece, with_total, nonblocking):
    """The scattering read resumes inside a buffer after a short read (a
    socket with a timeout is non-blocking underneath: MSG_WAITALL then returns
    what is there), with or without the caller's total."""
    a, b = Channel.socketpair()
    if nonblocking:
        b.set_timeout(10)
    cuts = [0, len(data) // 3, len(data) // 2, len(data)]
    bufs = [np.zeros(hi - lo, np.uint8) for lo, hi in zip(cuts, cuts[1:], strict=False)]
    bufs = [x for x in bufs if x.size]
    iov = np.array([(x.ctypes.data, x.size) for x in bufs], dtype=IOVEC)

    def send() -> None:
        for i in range(0, len(data), piece):
            a.sendall(data[i:i + piece])
        a.close()
    t = threading.Thread(target=send)
    t.start()
    try:
        assert b.recv_iovec(iov, total=len(data) if with_total else None) == len(data)
        assert b"".join(x.tobytes() for x in bufs) == data
        t.join(10)
        tail = np.zeros(1, np.uint8)
        assert b.recv_iovec(np.array([(tail.ctypes.data, 1)], dtype=IOVEC)) == 0   # EOF
    finally:
        t.join(10)
        b.close()


def _migrate(src: RamBlock, dst: RamBlock, rounds, channels: int = 3) -> str | None:
    """Send ``rounds`` (lists of (pages, known_zero) batches) with a sync after
    each, through real socketpairs, into a receiver; returns its error."""
    pairs = [Channel.socketpair() for _ in range(channels)]
    try:
        sender = MultifdSender([a for a, _ in pairs], src, bytes(16))
        for _, b in pairs:
            b.read_exact_into(bytearray(MULTIFD_INIT_SIZE))
        rx = MultifdReceiver([b for _, b in pairs], dst)
        for n, batches_ in enumerate(rounds, 1):
            for idx, known_zero in batches_:
                sender.queue_pages(idx, known_zero)
            sender.sync()
            rx.wait_sync(n)
        sender.finish()
        rx.join(30)
        return rx.error
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 3))
def test_sender_to_receiver_is_byte_exact(seed, nrounds):
    """Random contents (some pages zero, some zero pages the destination had
    written before), random dirty sets per round: the destination ends equal."""
    rng = np.random.default_rng(seed)
    src, dst = RamBlock("pc.ram", NPAGES * 4096), RamBlock("pc.ram", NPAGES * 4096)
    try:
        rounds = []
        for _ in range(nrounds):
            src.pages[:] = rng.integers(0, 256, (NPAGES, 4096), dtype=np.uint8)
            src.pages[rng.random(NPAGES) < 0.3] = 0
            idx = np.flatnonzero(rng.random(NPAGES) < 0.7)
            cut = int(rng.integers(0, idx.size + 1))
            rounds.append([(part, np.zeros(part.size, bool))
                           for part in (idx[:cut], idx[cut:]) if part.size])
        # the last round sends every page, as a completing migration does
        everything = np.arange(NPAGES)
        rounds.append([(everything, np.zeros(NPAGES, bool))])
        assert _migrate(src, dst, rounds) is None
        assert np.array_equal(src.pages, dst.pages)
    finally:
        src.close()
        dst.close()


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, NPAGES))
def test_runs_of_normal_pages_are_byte_exact(seed, cut):
    """Every page non-zero, batches of consecutive pages: the receiver's
    one-run check takes these packets (the usual ones of a migration)."""
    rng = np.random.default_rng(seed)
    src, dst = RamBlock("pc.ram", NPAGES * 4096), RamBlock("pc.ram", NPAGES * 4096)
    try:
        src.pages[:] = rng.integers(0, 256, (NPAGES, 4096), dtype=np.uint8)
        src.pages[:, 0] |= 1
        idx = np.arange(NPAGES)
        batches = [(part, np.zeros(part.size, bool)) for part in (idx[:cut], idx[cut:])
                   if part.size]
        assert _migrate(src, dst, [batches]) is None
        assert np.array_equal(src.pages, dst.pages)
    finally:
        src.close()
        dst.close()


def _raw_receive(ram: RamBlock, packet: bytes) -> str | None:
    a, b = Channel.socketpair()
    rx = MultifdReceiver([b], ram)
    try:
        a.sendall(packet)
        a.close()
        rx.join(10)
        return rx.error
    finally:
        b.close()


@pytest.mark.parametrize("fields,text", [
    ({"ramblock": b"pc.bios"}, "multifd: unknown ram block pc.bios"),
    ({"offset": np.full(128, NPAGES * 4096, np.uint64)},
     f"multifd: offset too long {NPAGES * 4096} (max {NPAGES * 4096:x})"),
    ({"offset": np.full(128, 100, np.uint64)}, "multifd: page offset not page aligned"),
])
def test_receiver_refuses_bad_packets_and_writes_nothing(fields, text):
    ram = RamBlock("pc.ram", NPAGES * 4096)
    try:
        err = _raw_receive(ram, _header(**fields) + bytes(4 * 4096) + b"\xff" * 4096)
        assert err == text
        assert not ram.loaded.any() and not ram.pages.any()
    finally:
        ram.close()


def test_receiver_reports_a_packet_cut_short():
    ram = RamBlock("pc.ram", NPAGES * 4096)
    try:
        err = _raw_receive(ram, _header() + bytes(3 * 4096))
        assert err == "multifd: packet 0 ends early (12288 of 16384 data bytes)"
    finally:
        ram.close()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.data())
def test_iovec_after_is_the_rest_of_the_stream(lens, data):
    """After a short transfer of n bytes, what is left to do is exactly bytes
    n.. of the buffers, resumed inside the one done in part."""
    total = sum(lens)
    n = data.draw(st.integers(0, total - 1))
    flat = np.arange(total, dtype=np.uint8)
    offs = np.cumsum([0] + lens[:-1])
    iov = np.array([(flat.ctypes.data + int(o), ln) for o, ln in zip(offs, lens, strict=True)],
                   dtype=IOVEC)
    rest = iovec_after(iov, n)
    got = b"".join(bytes((ctypes.c_uint8 * int(e["len"])).from_address(int(e["base"])))
                   for e in rest)
    assert got == flat[n:].tobytes()
    assert iov["len"].tolist() == lens          # the caller's array is left alone
