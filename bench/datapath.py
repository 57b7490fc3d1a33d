"""Per-stage speed of the RAM data path, in one process (no guest, no socket).

    python bench/datapath.py [--ram-mib 1024]

Prints MB/s for: source batch selection+zero check+encode, the CPU the
source's gathered path spends per batch (no copy: the kernel's), and
destination decode+scatter, on RAM whose pages all have a non-zero first byte.
"""

import argparse
import time

import numpy as np

from livemig.machine.ram import RamBlock
from livemig.migration.ram import BATCH_PAGES, RamLoadHandler, RamSaveHandler
from livemig.wire import NEED_DATA, PayloadKind, StreamDecoder, encode_ram_eos


class Sink:
    def __init__(self):
        self.chunks = []
        self.n = 0
        self.copy_s = 0.0

    def write(self, data):
        self.n += data.nbytes if hasattr(data, "nbytes") else len(data)
        t = time.perf_counter()
        self.chunks.append(np.array(data, dtype=np.uint8, copy=True))  # scratch is reused
        self.copy_s += time.perf_counter() - t

    def rate_exceeded(self):
        return False


class IovecSink(Sink):
    """Takes the gathered writes without copying them (the kernel would)."""

    def write_iovec(self, iov, nbytes):
        self.n += nbytes

    def budget_left(self):
        return None


class FakeMachine:
    def __init__(self, ram):
        self.ram = ram

    def is_running(self):
        return True


def main(ram_mib: int) -> None:
    ram = RamBlock("pc.ram", ram_mib << 20)
    ram.pages[:, 0] = 1
    h = RamSaveHandler(FakeMachine(ram), on_sync=lambda n: None, gather=False)
    h.bitmap[:] = True
    sink = Sink()
    t0 = time.perf_counter()
    while (idx := h._next_dirty(BATCH_PAGES)).size:
        h._send_pages(sink, idx, downtime=False)
    t1 = time.perf_counter()
    print(f"source encode: {sink.n / 1e6 / (t1 - t0 - sink.copy_s):8.0f} MB/s "
          f"({sink.n >> 20} MiB)")

    # The path the source runs: headers and iovecs only (the kernel copies the pages).
    h = RamSaveHandler(FakeMachine(ram), on_sync=lambda n: None)
    h.bitmap[:] = True
    iov_sink = IovecSink()
    c0 = time.process_time()
    while (idx := h._next_dirty(BATCH_PAGES)).size:
        h._send_pages(iov_sink, idx, downtime=False)
    c1 = time.process_time()
    batches = ram.npages / BATCH_PAGES
    print(f"source batch, gathered (selection, zero check, headers, iovecs): "
          f"{(c1 - c0) / batches * 1e6:.0f} us CPU per {BATCH_PAGES}-page batch, "
          f"{(c1 - c0) / (iov_sink.n / 1e9):.3f} s/GB")

    dst = RamBlock("pc.ram", ram_mib << 20)
    load = RamLoadHandler(FakeMachine(dst))
    from livemig.wire import (
        SectionType,
        encode_configuration,
        encode_footer,
        encode_header,
        encode_ram_block_list,
        encode_section_header,
    )
    dec = StreamDecoder({"ram": PayloadKind.RAM})
    pre = (encode_header() + encode_configuration("m")
           + encode_section_header(SectionType.SECTION_START, 0, "ram", 0, 4)
           + encode_ram_block_list([("pc.ram", ram.size)]) + encode_ram_eos() + encode_footer(0)
           + encode_section_header(SectionType.SECTION_PART, 0))
    dec.receive_data(pre)
    t0 = time.perf_counter()
    for chunk in sink.chunks:
        mv = memoryview(chunk).cast("B")
        pos = 0
        while pos < len(mv):
            buf = dec.get_buffer(4 << 20)
            n = min(len(buf), len(mv) - pos)
            buf[:n] = mv[pos:pos + n]
            pos += n
            dec.buffer_updated(n)
            while (ev := dec.next_event()) is not NEED_DATA:
                load.load_event(ev)
    t1 = time.perf_counter()
    print(f"destination decode+scatter: {sink.n / 1e6 / (t1 - t0):8.0f} MB/s "
          "(includes one extra copy into the decoder buffer)")
    assert np.array_equal(dst.pages[:, 0], ram.pages[:, 0])


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ram-mib", type=int, default=1024)
    main(p.parse_args().ram_mib)
