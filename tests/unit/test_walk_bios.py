"""The walk firmware (guest/walk-bios.S, shipped as walk-bios.bin): its layout,
its patching, and that guest/build.sh reproduces both shipped images."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.machine.guest import MIB
from livemig.machine.kvm import (
    BOOTSECTOR_SIZE,
    WALK_BIOS_PATH,
    WALK_BIOS_SIZE,
    WALK_BIOS_TAG,
    WALK_BIOS_TAG_OFFSET,
    WALK_BOOTSECTOR_PATH,
    WALK_END_MAX,
    WALK_END_OFFSET,
    WALK_PACE_OFFSET,
    WALK_START_OFFSET,
    WALK_TICK_OFFSET,
    bootsector_image,
    walk_bios_image,
)

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "guest" / "build.sh"
RESET_VECTOR = 0xFFF0       # 4 GiB - 16, as an offset in an image that ends at 4 GiB
LOADER = 0x200
BIOS_SEG = 0xF000           # the image's alias below 1 MiB, at 0xf0000


def test_shipped_firmware_layout():
    """64 KiB (QEMU wants multiples of 64 KiB), the boot sector first, and at the
    reset vector a far jump (0xea, offset, segment) to the loader through 0xf0000."""
    bios = WALK_BIOS_PATH.read_bytes()
    assert len(bios) == WALK_BIOS_SIZE == 64 * 1024
    assert bios[:BOOTSECTOR_SIZE] == WALK_BOOTSECTOR_PATH.read_bytes()
    op, offset, segment = struct.unpack_from("<BHH", bios, RESET_VECTOR)
    assert (op, offset, segment) == (0xEA, LOADER, BIOS_SEG)
    assert bios[WALK_BIOS_TAG_OFFSET:WALK_BIOS_TAG_OFFSET + 4] == WALK_BIOS_TAG
    assert bios[LOADER] == 0xFA                                  # cli
    assert bios[WALK_BIOS_TAG_OFFSET + 4:] == bytes(WALK_BIOS_SIZE - WALK_BIOS_TAG_OFFSET - 4)


def test_default_firmware_walks_one_to_hundred_mib():
    assert walk_bios_image(1 * MIB, 100 * MIB) == WALK_BIOS_PATH.read_bytes()


@given(start=st.integers(0, WALK_END_MAX // 4096 - 1), pages=st.integers(1, 1 << 20),
       tick=st.integers(0, 0xFFFFFFFF), pace=st.integers(0, 0xFFFFFFFF))
def test_firmware_patches_only_the_boot_sector_words(start, pages, tick, pace):
    start *= 4096
    end = min(start + pages * 4096, WALK_END_MAX)
    bios = walk_bios_image(start, end, tick_pages=tick, pace=pace)
    base = WALK_BIOS_PATH.read_bytes()
    assert bios[:BOOTSECTOR_SIZE] == bootsector_image(start, end, tick_pages=tick, pace=pace)
    assert bios[BOOTSECTOR_SIZE:] == base[BOOTSECTOR_SIZE:]
    words = {o: struct.unpack_from("<I", bios, o)[0]
             for o in (WALK_START_OFFSET, WALK_END_OFFSET, WALK_TICK_OFFSET, WALK_PACE_OFFSET)}
    assert words == {WALK_START_OFFSET: start, WALK_END_OFFSET: end,
                     WALK_TICK_OFFSET: tick, WALK_PACE_OFFSET: pace}


def test_firmware_checks_what_the_boot_sector_checks():
    with pytest.raises(ValueError, match="aligned"):
        walk_bios_image(1 * MIB + 1, 5 * MIB)
    with pytest.raises(ValueError, match="32-bit"):
        walk_bios_image(1 * MIB, 5 * MIB, pace=1 << 32)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld", "objcopy", "nm", "cmp")),
                    reason="GNU binutils (as, ld, objcopy, nm) or cmp not installed")
@pytest.mark.timeout(60)
def test_build_reproduces_both_shipped_images(tmp_path):
    sector, bios = tmp_path / "walk.bin", tmp_path / "walk-bios.bin"
    subprocess.run(["sh", str(BUILD_SH), str(sector), str(bios)], check=True,
                   capture_output=True)
    assert sector.read_bytes() == WALK_BOOTSECTOR_PATH.read_bytes(), (
        "guest/walk.S and walk-bootsector.bin disagree: run guest/build.sh")
    assert bios.read_bytes() == WALK_BIOS_PATH.read_bytes(), (
        "guest/walk-bios.S and walk-bios.bin disagree: run guest/build.sh")
