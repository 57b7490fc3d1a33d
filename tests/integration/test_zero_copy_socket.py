"""``SocketChannel``'s MSG_ZEROCOPY sends on real sockets: the bytes arrive
intact, completions are read from the error queue, held buffers are let go,
and the kernel's refusals come back in QEMU 10.0's words."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from livemig.machine.ram import RamBlock
from livemig.migration.multifd import MultifdReceiver, MultifdSender
from livemig.transport import Channel, SocketChannel, TransportError
from livemig.transport.channel import IOVEC, tcp_zero_copy_available
from livemig.transport.zerocopy import CANNOT_LOCK, FEATURE_NOT_AVAILABLE
from livemig.wire import MULTIFD_INIT_SIZE

needs_zero_copy = pytest.mark.skipif(not tcp_zero_copy_available(),
                                     reason="this kernel offers no SO_ZEROCOPY on TCP")


def _iovec(buffers: list[np.ndarray]) -> np.ndarray:
    iov = np.empty(len(buffers), dtype=IOVEC)
    iov["base"] = [b.ctypes.data for b in buffers]
    iov["len"] = [b.nbytes for b in buffers]
    return iov


def _drain(ch: SocketChannel, nbytes: int, out: list[bytes]) -> None:
    buf = bytearray(nbytes)
    ch.read_exact_into(buf)
    out.append(bytes(buf))


@needs_zero_copy
@pytest.mark.timeout(30)
def test_zero_copy_sends_arrive_whole_and_complete() -> None:
    a, b = Channel.tcp_pair()
    try:
        assert a.enable_zero_copy()
        rng = np.random.default_rng(5)
        pages = rng.integers(0, 256, 4 << 20, dtype=np.uint8)      # 4 MiB "guest RAM"
        total = 0
        expected = []
        got: list[bytes] = []
        sends = []
        for k in range(6):
            head = np.full(1344, k, dtype=np.uint8)                # a header of its own
            lo = k * 512 * 1024
            body = pages[lo:lo + 512 * 1024]
            sends.append((head, body))
            expected += [head.tobytes(), body.tobytes()]
            total += head.nbytes + body.nbytes
        reader = threading.Thread(target=_drain, args=(b, total, got), daemon=True)
        reader.start()
        for head, body in sends:
            a.send_iovec(_iovec([head, body]), zero_copy=True, keep=head)
        # Every send finished; on loopback the kernel copied them all, which
        # QEMU's flush reports as 1 (a missed zero copy).
        assert a.flush_zero_copy() == 1
        assert a._zc is not None and a._zc.pending == 0 and not a._zc._kept
        assert a._zc.queued >= len(sends)
        assert a.flush_zero_copy() == 0                  # nothing sent since
        reader.join(20)
        assert got == [b"".join(expected)]
        assert a.bytes_sent == total
    finally:
        a.close()
        b.close()


def test_unix_sockets_have_no_zero_copy() -> None:
    a, b = SocketChannel.socketpair()
    try:
        assert not a.enable_zero_copy()
        buf = np.zeros(4096, dtype=np.uint8)
        with pytest.raises(TransportError) as exc:
            a.send_iovec(_iovec([buf]), zero_copy=True)
        assert exc.value.desc == FEATURE_NOT_AVAILABLE
        assert a.flush_zero_copy() == 0
    finally:
        a.close()
        b.close()


_NO_LOCKED_MEMORY = textwrap.dedent("""
    import resource, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from test_zero_copy_socket import _iovec
    from livemig.transport import Channel, TransportError
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    a, b = Channel.tcp_pair()
    assert a.enable_zero_copy()
    try:
        a.send_iovec(_iovec([np.ones(1 << 20, dtype=np.uint8)]), zero_copy=True)
    except TransportError as exc:
        print(exc.desc)
    else:
        print("sent")
""")


@needs_zero_copy
@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_without_locked_memory_the_send_fails_in_qemus_words() -> None:
    """MSG_ZEROCOPY pins the pages it sends, counted against RLIMIT_MEMLOCK
    unless the process has CAP_IPC_LOCK: with neither, the kernel says ENOBUFS
    and QEMU says it cannot lock enough memory."""
    here = os.path.dirname(__file__)
    src = os.path.join(here, "..", "..", "src")
    cmd = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--",
           sys.executable, "-c", _NO_LOCKED_MEMORY, here, src]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=50, check=False)
    if res.returncode and "setpriv" in res.stderr:
        pytest.skip(f"cannot drop CAP_IPC_LOCK here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{CANNOT_LOCK}: {os.strerror(errno.ENOBUFS)}"


@needs_zero_copy
@pytest.mark.timeout(60)
def test_multifd_with_zero_copy_is_byte_exact_and_counts_missed_syncs() -> None:
    """Two rounds through MSG_ZEROCOPY senders into real receivers over
    loopback TCP: every page equal, each channel's flush after a SYNC counted
    as missed (the kernel copies on loopback), the held headers let go."""
    npages = 2048
    src, dst = RamBlock("pc.ram", npages * 4096), RamBlock("pc.ram", npages * 4096)
    pairs = [Channel.tcp_pair() for _ in range(2)]
    try:
        rng = np.random.default_rng(11)
        src.pages[:] = rng.integers(0, 256, (npages, 4096), dtype=np.uint8)
        src.pages[rng.random(npages) < 0.2] = 0
        assert all(a.enable_zero_copy() for a, _ in pairs)
        sender = MultifdSender([a for a, _ in pairs], src, bytes(16), zero_copy=True)
        for _, b in pairs:
            b.read_exact_into(bytearray(MULTIFD_INIT_SIZE))
        rx = MultifdReceiver([b for _, b in pairs], dst)
        everything = np.arange(npages)
        sender.queue_pages(everything, np.zeros(npages, bool))
        sender.sync()
        rx.wait_sync(1)
        again = np.sort(rng.choice(npages, 1500, replace=False))   # 2 batches: both channels
        src.pages[again, 7] ^= 0x5A
        sender.queue_pages(again, np.zeros(again.size, bool))
        sender.sync()
        rx.wait_sync(2)
        sender.finish()
        rx.join(30)
        assert rx.error is None and sender.error is None
        assert np.array_equal(src.pages, dst.pages)
        # 2 channels x 2 syncs, each channel having sent in both rounds
        assert sender.stats().missed_zero_copy == 4
        assert all(a._zc is not None and not a._zc._kept for a, _ in pairs)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        src.close()
        dst.close()
