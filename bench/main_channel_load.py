"""The destination's main-channel RAM load, without a guest: CPU seconds per
GB of the load thread reading a first pass of pages over a socket, with the
direct reads (page data straight into guest RAM) and with the decoder's copy.

    python bench/main_channel_load.py [--ram-mib 1024] [--reps 2] [--mem-prealloc]

A forked sender writes one RAM section with every page of the block (runs of
``ram.BATCH_PAGES`` as the source sends them); the receiver (this process)
runs ``savevm.qemu_loadvm_state`` with and without ``RamDirectLoad``,
alternating, and reads its own ``getrusage`` CPU time per run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from livemig.machine.ram import RamBlock
from livemig.migration import savevm
from livemig.migration.ram import BATCH_PAGES, RamDirectLoad, RamLoadHandler
from livemig.transport import Channel
from livemig.wire import (
    SectionType,
    StreamDecoder,
    encode_eof,
    encode_footer,
    encode_ram_eos,
    encode_ram_pages,
    encode_vmdesc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loadvm_hosts import ChannelHost, RamMachine  # noqa: E402
from streams import QEMU_MACHINE, ram_stream_start, section  # noqa: E402


def send(ch, npages: int) -> None:
    data = np.random.default_rng(1).integers(1, 256, (BATCH_PAGES, 4096), dtype=np.uint8)
    ch.sendall(ram_stream_start([("pc.ram", npages * 4096)]) + encode_ram_eos()
               + encode_footer(0) + section(SectionType.SECTION_PART, 0))
    for lo in range(0, npages, BATCH_PAGES):
        n = min(BATCH_PAGES, npages - lo)
        offs = np.arange(lo, lo + n, dtype=np.int64) << 12
        ch.sendall(encode_ram_pages("pc.ram", offs, data[:n], first_has_block_name=lo == 0))
    ch.sendall(encode_ram_eos() + encode_footer(0) + encode_eof() + encode_vmdesc(b"{}"))


def one(npages: int, direct: bool, prealloc: bool) -> tuple[float, float, float, float]:
    a, b = Channel.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            b.release()
            send(a, npages)
        finally:
            os._exit(0)
    a.release()
    ram = RamBlock("pc.ram", npages * 4096)
    if prealloc:
        ram.prealloc()
    state = savevm.SaveVMState()
    handler = RamLoadHandler(RamMachine(ram))
    state.register_savevm_live(handler)
    reader = RamDirectLoad(ram, handler, b.recv_iovec_some) if direct else None
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    savevm.qemu_loadvm_state(state, ChannelHost(b), StreamDecoder(state.payload_kinds()),
                             machine_type=QEMU_MACHINE, uuid=None, direct=reader)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    os.waitpid(pid, 0)
    b.close()
    assert ram.loaded.all() and (ram.pages[:, 0] != 0).all()
    placed = reader.placed / npages if reader else 0.0
    ram.close()
    gb = npages * 4104 / 1e9
    return ((r1.ru_utime - r0.ru_utime) / gb, (r1.ru_stime - r0.ru_stime) / gb, placed,
            gb * 1000 / (t1 - t0))


def main(a: argparse.Namespace) -> None:
    npages = a.ram_mib * 256
    for rep in range(a.reps):
        for direct in (False, True):
            user, system, placed, mbps = one(npages, direct, a.mem_prealloc)
            print(f"rep {rep} {'direct' if direct else 'copy  '}: user {user:.3f} "
                  f"sys {system:.3f} total {user + system:.3f} s/GB, {mbps:.0f} MB/s wall"
                  + (f" ({placed:.1%} of pages placed directly)" if direct else ""))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ram-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--mem-prealloc", action="store_true")
    main(p.parse_args())
