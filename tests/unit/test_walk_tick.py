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


# -- image words, options and the pace <-> rate mapping -------------------------------
def test_offsets_are_the_documented_ones():
    assert (WALK_TICK_OFFSET, WALK_PACE_OFFSET, WALK_TAG_OFFSET) == (0x1E8, 0x1EC, 0x1F0)
    assert (WALK_START_OFFSET, WALK_END_OFFSET) == (0x1F4, 0x1F8)


def test_bootsector_image_tick_and_pace_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        bootsector_image(MIB, 2 * MIB, 16)          # type: ignore[misc]
    for bad in ({"tick_pages": -1}, {"pace": -1}, {"pace": 1 << 32}):
        with pytest.raises(ValueError, match="unsigned 32-bit"):
            bootsector_image(MIB, 2 * MIB, **bad)
    top = bootsector_image(MIB, 2 * MIB, tick_pages=0xFFFFFFFF, pace=0xFFFFFFFF)
    assert u32(top, WALK_TICK_OFFSET) == u32(top, WALK_PACE_OFFSET) == 0xFFFFFFFF
    assert len(top) == 512 and top[-2:] == b"\x55\xaa"


def test_walk_option_defaults_and_numbers():
    cfg = GuestConfig.parse_walk("walk")
    assert (cfg.tick_pages, cfg.pace_cycles) == (0, 0)
    assert cfg == GuestConfig()                         # today's behaviour
    cfg = GuestConfig.parse_walk("walk,start=1M,end=16M,tick=0x100,pace=0,rate=1000")
    assert (cfg.tick_pages, cfg.pace_cycles, cfg.rate_pages_per_s) == (256, 0, 1000)
    assert cfg.soft_rate_pages_per_s() == 1000


@pytest.mark.parametrize("spec, text", [
    ("walk,tick=abc", "Parameter 'tick' expects a number"),
    ("walk,pace=1.5", "Parameter 'pace' expects a number"),
    ("walk,pace=", "Parameter 'pace' expects a number"),
    ("walk,tick=-1", "walk tick must be 0 to 4294967295"),
    ("walk,pace=4294967296", "walk pace must be 0 to 4294967295"),
    ("walk,rate=0,pace=100", "walk rate and pace exclude each other"),
    ("walk,ticks=3", "unknown guest option 'ticks'"),
])
def test_bad_walk_options(spec, text):
    with pytest.raises(ValueError, match=text):
        GuestConfig.parse_walk(spec)


def test_pace_wins_over_rate_in_a_config_built_directly():
    cfg = GuestConfig(rate_pages_per_s=123, pace_cycles=52_000)
    assert cfg.soft_rate_pages_per_s() == int(tsc_hz() / 52_000)
    assert GuestConfig(rate_pages_per_s=123).soft_rate_pages_per_s() == 123
    with pytest.raises(ValueError, match="walk pace must be 0 to"):
        GuestConfig(pace_cycles=-5).validate()
    with pytest.raises(ValueError, match="walk tick must be 0 to"):
        GuestConfig(tick_pages=1 << 32).validate()


def test_tsc_rate_is_read_honestly():
    from livemig.machine.tsc import _cpuinfo_tsc_hz, tsc_source
    hz = tsc_hz()
    assert 1e8 < hz < 1e10
    assert tsc_source() in ("KVM_GET_TSC_KHZ", "/proc/cpuinfo cpu MHz")
    if tsc_source() == "KVM_GET_TSC_KHZ":
        nominal, constant = _cpuinfo_tsc_hz()
        if constant:        # KVM's vCPU TSC is the host's: the nominal clock, within 5%
            assert abs(hz - nominal) < 0.05 * nominal, (hz, nominal)


# -- the soft walk's ticks: exact, in order, and as the pages are written ---------------
def reference_walk(npages: int, tick: int, pages: int) -> bytes:
    """guest/walk.S's output after ``pages`` pages of the incrementing passes."""
    out, countdown, passes = bytearray(b"A"), tick, 0
    for i in range(pages):
        if tick:
            countdown -= 1
            if countdown <= 0:
                countdown = tick
                out += b"."
        if (i + 1) % npages == 0:
            passes = (passes + 1) & 0x3F
            if passes == 0:
                out += b"B"
    return bytes(out)


def stepped(cpu: SoftAccelerator, pages: int, batch: int) -> None:
    """Run the soft vCPU's program for the zeroing pass and ``pages`` walked pages."""
    column = cpu.ram.pages[:, 0]
    cpu._step(column, batch)                       # 'A'
    while cpu.phase != 2:
        cpu._step(column, batch)
    while pages:
        pages -= cpu._step(column, min(batch, pages))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("npages, tick, batch", [(8, 3, 5), (8, 8, 64), (5, 1, 4),
                                                  (256, 100, 4096), (7, 0, 3)])
def test_soft_ticks_match_the_guest_program(npages, tick, batch):
    ram = RamBlock("pc.ram", 16 * MIB)
    serial = Recorder()
    writes: list[bytes] = []
    serial.write = lambda data: (writes.append(data), Recorder.write(serial, data))
    guest = GuestConfig(start=MIB, end=MIB + npages * 4096, rate_pages_per_s=0,
                        tick_pages=tick)
    cpu = SoftAccelerator(ram, DirtyLog(ram.npages), serial, guest)
    try:
        cpu.reset()
        pages = 64 * npages * 2 + 3 * npages + 1    # two 'B's and a bit
        stepped(cpu, pages, batch)
        assert bytes(serial.data) == reference_walk(npages, tick, pages)
        assert serial.data.count(b".") == (pages // tick if tick else 0)
        assert all(w in (b"A", b"B", b".") for w in writes)     # one byte a write
    finally:
        cpu.close()
        ram.close()


@pytest.mark.timeout(30)
def test_soft_ticks_keep_their_phase_across_a_migration():
    """The tick count comes from the migrated state, like the KVM guest's %ebp."""
    npages, tick, batch = 10, 4, 3
    ram_a, ram_b = RamBlock("pc.ram", 16 * MIB), RamBlock("pc.ram", 16 * MIB)
    out_a, out_b = Recorder(), Recorder()
    guest = GuestConfig(start=MIB, end=MIB + npages * 4096, rate_pages_per_s=0,
                        tick_pages=tick)
    src = SoftAccelerator(ram_a, DirtyLog(ram_a.npages), out_a, guest)
    dst = SoftAccelerator(ram_b, DirtyLog(ram_b.npages), out_b, guest)
    try:
        stepped(src, 23, batch)
        dst.load_cpu_state(src.save_cpu_state())
        column = ram_b.pages[:, 0]
        left = 64 * npages - 23
        while left:
            left -= dst._step(column, min(batch, left))
        assert bytes(out_a.data + out_b.data) == reference_walk(npages, tick, 64 * npages)
    finally:
        src.close()
        dst.close()
        ram_a.close()
        ram_b.close()


class Stamped(Serial):
    def __init__(self) -> None:
        super().__init__(None)
        self.ticks: list[float] = []

    def write(self, data: bytes) -> None:
        if data == b".":
            self.ticks.append(time.monotonic())


def run_soft_until_ticks(guest: GuestConfig, ticks: int, timeout: float) -> list[float]:
    """Tick times of a real-time soft walk, from its ``ticks``/5-th tick on."""
    ram = RamBlock("pc.ram", 16 * MIB)
    serial = Stamped()
    cpu = SoftAccelerator(ram, DirtyLog(ram.npages), serial, guest)
    try:
        cpu.reset()
        cpu.resume()
        deadline = time.monotonic() + timeout
        while len(serial.ticks) < ticks:
            assert time.monotonic() < deadline, f"{len(serial.ticks)} ticks in {timeout} s"
            time.sleep(0.005)
        cpu.pause()
        return serial.ticks[ticks // 5:ticks]
    finally:
        cpu.close()
        ram.close()


@pytest.mark.timeout(60)
def test_soft_pace_gives_tsc_hz_over_pace_pages_per_s():
    pace, tick = 260_000, 20                        # ~10k pages/s at 2.6 GHz: 2 ms a tick
    expected = tsc_hz() / pace
    stamps = run_soft_until_ticks(GuestConfig(start=MIB, end=3 * MIB, tick_pages=tick,
                                              pace_cycles=pace), 150, 30)
    got = (len(stamps) - 1) * tick / (stamps[-1] - stamps[0])
    assert expected / 2 < got < expected * 2, (got, expected)


@pytest.mark.timeout(60)
def test_soft_ticks_are_spread_as_the_pages_are_written():
    """At 50k pages/s and a tick every 25 pages (0.5 ms), batches of 50 pages would
    lump two ticks together: they come one by one, about 0.5 ms apart."""
    stamps = run_soft_until_ticks(GuestConfig(start=MIB, end=3 * MIB,
                                              rate_pages_per_s=50_000, tick_pages=25), 1000, 30)
    gaps = sorted(b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True))
    median = gaps[len(gaps) // 2]
    assert 0.25e-3 < median < 1e-3, median
