"""The walk's ticks and pace: image words, options, the soft vCPU's ticks."""

from __future__ import annotations

import struct
import time

import pytest

from livemig.machine.dirty_log import DirtyLog
from livemig.machine.guest import MIB, GuestConfig
from livemig.machine.kvm import (
    WALK_END_OFFSET,
    WALK_PACE_OFFSET,
    WALK_START_OFFSET,
    WALK_TAG_OFFSET,
    WALK_TICK_OFFSET,
    bootsector_image,
)
from livemig.machine.ram import RamBlock
from livemig.machine.serial import Serial
from livemig.machine.soft import SoftAccelerator
from livemig.machine.tsc import tsc_hz


def u32(image: bytes, off: int) -> int:
    return struct.unpack_from("<I", image, off)[0]


def test_tick_and_pace_words_beside_the_walk_range():
    image = bootsector_image(2 * MIB, 8 * MIB, tick_pages=256, pace=26000)
    assert (u32(image, WALK_TICK_OFFSET), u32(image, WALK_PACE_OFFSET)) == (256, 26000)
    assert (u32(image, WALK_START_OFFSET), u32(image, WALK_END_OFFSET)) == (2 * MIB, 8 * MIB)
    assert image[WALK_TAG_OFFSET:WALK_TAG_OFFSET + 4] == b"LMWK"
    plain = bootsector_image(2 * MIB, 8 * MIB)
    assert u32(plain, WALK_TICK_OFFSET) == 0 and u32(plain, WALK_PACE_OFFSET) == 0
    assert plain[:WALK_TICK_OFFSET] == image[:WALK_TICK_OFFSET]     # code untouched
    with pytest.raises(ValueError, match="unsigned 32-bit"):
        bootsector_image(MIB, 2 * MIB, tick_pages=1 << 32)


def test_guest_options():
    cfg = GuestConfig.parse_walk("walk,end=8M,tick=32,pace=26000")
    assert (cfg.tick_pages, cfg.pace_cycles) == (32, 26000)
    assert cfg.rate_pages_per_s == int(tsc_hz() / 26000)     # the soft vCPU's mapping
    assert GuestConfig.parse_walk("walk,tick=5").rate_pages_per_s == \
        GuestConfig().rate_pages_per_s
    with pytest.raises(ValueError, match="exclude each other"):
        GuestConfig.parse_walk("walk,rate=1000,pace=100")
    with pytest.raises(ValueError, match="0 to 4294967295"):
        GuestConfig.parse_walk("walk,tick=4294967296")


class Recorder(Serial):
    def __init__(self) -> None:
        super().__init__(None)
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


@pytest.mark.timeout(30)
def test_the_soft_walk_ticks_every_n_pages_walked():
    ram = RamBlock("pc.ram", 16 * MIB)
    serial = Recorder()
    guest = GuestConfig(start=MIB, end=2 * MIB, rate_pages_per_s=50_000, tick_pages=16)
    cpu = SoftAccelerator(ram, DirtyLog(ram.npages), serial, guest)
    try:
        cpu.reset()
        cpu.resume()
        deadline = time.monotonic() + 20
        while serial.data.count(b".") < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu.pause()
        walked = cpu.passes * 256 + (cpu.page - 256)    # 256 pages a pass from page 256
        ticks = serial.data.count(b".")
        assert serial.data.startswith(b"A")
        assert ticks == walked // 16
    finally:
        cpu.close()
        ram.close()
