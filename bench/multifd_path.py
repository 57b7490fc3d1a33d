"""multifd's own cost, without a guest: CPU seconds per GB of the sender and
the receiver, each in its own process (one GIL each, as in a migration).

    python bench/multifd_path.py [--channels 4] [--ram-mib 1024] [--passes 3]
                                 [--zero-share 0.0] [--holes 0.0] [--tcp] [--zero-copy]

The sender process queues every page of a preallocated RAM block in the RAM
handler's batches (``ram.BATCH_PAGES``) and syncs after each pass; the
receiver process (forked, its RAM preallocated too) applies the packets.
Both read their own ``getrusage`` CPU time. ``--holes`` leaves that share
of pages out of each pass (runs of pages broken up: more iovecs per
packet); ``--zero-share`` makes that share of pages zero. The channels are
UNIX socket pairs, or loopback TCP with ``--tcp``; ``--zero-copy`` (TCP)
sends with MSG_ZEROCOPY, as ``zero-copy-send`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from livemig.machine.ram import RamBlock
from livemig.migration.multifd import MultifdReceiver, MultifdSender
from livemig.migration.ram import BATCH_PAGES
from livemig.transport import Channel
from livemig.wire import MULTIFD_INIT_SIZE


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def receiver(chans, ram_bytes: int, out_fd: int) -> None:
    ram = RamBlock("pc.ram", ram_bytes)
    ram.prealloc()
    for ch in chans:                       # the init messages, as the destination reads them
        ch.read_exact_into(bytearray(MULTIFD_INIT_SIZE))
    u0, s0 = cpu()
    rx = MultifdReceiver(chans, ram)
    syncs = 0
    # Release each sync as soon as every channel reached it (the load thread
    # would at its MULTIFD_FLUSH), until the sender closed every channel.
    while any(t.is_alive() for t in rx._threads):
        with rx._cond:
            if min(rx._syncs) > syncs:
                syncs = min(rx._syncs)
                rx._released = syncs
                rx._cond.notify_all()
            else:
                rx._cond.wait(0.01)
    rx.join(60)
    u1, s1 = cpu()
    digest = int(np.bitwise_xor.reduce(ram.pages64[:, 0]))
    os.write(out_fd, json.dumps({"user": u1 - u0, "sys": s1 - s0, "error": rx.error,
                                 "digest": digest, "syncs": syncs}).encode())


def main(a: argparse.Namespace) -> None:
    size = a.ram_mib << 20
    tcp = a.tcp or a.zero_copy
    pairs = [Channel.tcp_pair() if tcp else Channel.socketpair() for _ in range(a.channels)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for s, _ in pairs:
                s.release()
            receiver([d for _, d in pairs], size, w)
        finally:
            os._exit(0)
    for _, d in pairs:
        d.release()
    os.close(w)
    ram = RamBlock("pc.ram", size)
    ram.prealloc()
    rng = np.random.default_rng(1)
    ram.pages64[:, 0] = rng.integers(1, 2**63, ram.npages, dtype=np.uint64)
    if a.zero_share:
        ram.pages64[rng.random(ram.npages) < a.zero_share, 0] = 0
    digest = int(np.bitwise_xor.reduce(ram.pages64[:, 0]))
    known_zero = np.zeros(BATCH_PAGES, dtype=bool)
    if a.zero_copy and not all(s.enable_zero_copy() for s, _ in pairs):
        raise SystemExit("this kernel offers no SO_ZEROCOPY on TCP")
    kw = {"zero_copy": True} if a.zero_copy else {}     # (older trees: no such argument)
    tx = MultifdSender([s for s, _ in pairs], ram, bytes(16), **kw)
    t0, (u0, s0) = time.monotonic(), cpu()
    for p in range(a.passes):
        keep = np.arange(ram.npages)
        if a.holes and p < a.passes - 1:   # the last pass sends everything (the digest)
            keep = keep[rng.random(ram.npages) >= a.holes]
        for lo in range(0, keep.size, BATCH_PAGES):
            idx = keep[lo:lo + BATCH_PAGES]
            tx.queue_pages(idx, known_zero[:idx.size])
        tx.sync()
    tx.finish()
    t1, (u1, s1) = time.monotonic(), cpu()
    res = json.loads(os.read(r, 4096))
    os.waitpid(pid, 0)
    gb = tx.bytes_sent / 1e9
    print(f"multifd {a.channels} {'TCP' if tcp else 'UNIX'} channels"
          f"{' zero-copy' if a.zero_copy else ''}, {a.ram_mib} MiB x {a.passes} passes, "
          f"holes {a.holes}, zero {a.zero_share}: {gb / (t1 - t0) * 1000:.0f} MB/s wall"
          + (f", missed zero copy {tx.stats().missed_zero_copy}" if a.zero_copy else ""))
    print(f"  sender   user {(u1 - u0) / gb:.3f}  sys {(s1 - s0) / gb:.3f} s/GB")
    print(f"  receiver user {res['user'] / gb:.3f}  sys {res['sys'] / gb:.3f} s/GB")
    if res["error"] or res["digest"] != digest:
        raise SystemExit(f"receiver: error {res['error']!r}, digest ok "
                         f"{res['digest'] == digest}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--ram-mib", type=int, default=1024)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--zero-share", type=float, default=0.0)
    p.add_argument("--holes", type=float, default=0.0)
    p.add_argument("--tcp", action="store_true", help="loopback TCP channels")
    p.add_argument("--zero-copy", action="store_true", help="MSG_ZEROCOPY sends (TCP)")
    main(p.parse_args())
