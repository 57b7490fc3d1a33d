"""The walk boot sector: its layout, its patching, its build, and a boot in QEMU."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvm_harness import KVM_OK, KVM_WHY

from livemig.machine.guest import MIB
from livemig.machine.kvm import (
    WALK_BOOTSECTOR_PATH,
    WALK_END_MAX,
    WALK_END_OFFSET,
    WALK_START_OFFSET,
    WALK_TAG,
    WALK_TAG_OFFSET,
    bootsector_image,
)

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "guest" / "build.sh"
QEMU = "/usr/bin/qemu-system-x86_64"


def u32(image: bytes, offset: int) -> int:
    return struct.unpack_from("<I", image, offset)[0]


def test_checked_in_image_layout():
    image = WALK_BOOTSECTOR_PATH.read_bytes()
    assert len(image) == 512
    assert image[510:] == b"\x55\xaa"
    assert image[WALK_TAG_OFFSET:WALK_TAG_OFFSET + 4] == WALK_TAG
    assert u32(image, WALK_START_OFFSET) == 1 * MIB
    assert u32(image, WALK_END_OFFSET) == 100 * MIB


def test_bootsector_image_patches_only_the_two_words():
    base = WALK_BOOTSECTOR_PATH.read_bytes()
    image = bootsector_image(2 * MIB, 7 * MIB)
    assert len(image) == 512 and image[510:] == b"\x55\xaa"
    assert u32(image, WALK_START_OFFSET) == 2 * MIB
    assert u32(image, WALK_END_OFFSET) == 7 * MIB
    changed = {i for i in range(512) if image[i] != base[i]}
    assert changed <= set(range(WALK_START_OFFSET, WALK_START_OFFSET + 4)) | set(
        range(WALK_END_OFFSET, WALK_END_OFFSET + 4))
    assert bootsector_image(1 * MIB, 100 * MIB) == base


@given(start=st.integers(0, WALK_END_MAX // 4096 - 1), pages=st.integers(1, 1 << 20))
def test_bootsector_image_round_trips_any_valid_range(start, pages):
    start *= 4096
    end = min(start + pages * 4096, WALK_END_MAX)
    image = bootsector_image(start, end)
    assert (u32(image, WALK_START_OFFSET), u32(image, WALK_END_OFFSET)) == (start, end)


@pytest.mark.parametrize("start,end,why", [
    (1 * MIB + 1, 5 * MIB, "aligned"),
    (1 * MIB, 5 * MIB + 2048, "aligned"),
    (5 * MIB, 5 * MIB, "start < end"),
    (6 * MIB, 5 * MIB, "start < end"),
    (-4096, 5 * MIB, "start < end"),
    (1 * MIB, 1 << 32, "32-bit"),
])
def test_bootsector_image_rejects_bad_ranges(start, end, why):
    with pytest.raises(ValueError, match=why):
        bootsector_image(start, end)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld", "objcopy", "nm")),
                    reason="GNU binutils (as, ld, objcopy, nm) not installed")
@pytest.mark.timeout(60)
def test_build_reproduces_the_checked_in_image(tmp_path):
    out = tmp_path / "walk.bin"
    # Both outputs into tmp_path: the second (the firmware) defaults to the package.
    subprocess.run(["sh", str(BUILD_SH), str(out), str(tmp_path / "walk-bios.bin")],
                   check=True, capture_output=True)
    assert out.read_bytes() == WALK_BOOTSECTOR_PATH.read_bytes(), (
        "guest/walk.S and walk-bootsector.bin disagree: run guest/build.sh")


@pytest.mark.skipif(not Path(QEMU).exists(), reason=f"QEMU not installed ({QEMU})")
@pytest.mark.skipif(not KVM_OK, reason=f"KVM not usable here: {KVM_WHY}")
@pytest.mark.timeout(120)
def test_boots_in_qemu(tmp_path):
    """SeaBIOS loads it from a raw drive and it runs: 'A', then 'B's.

    The disk is padded to 1 MiB: SeaBIOS on q35 (AHCI) fails with "could not
    read the boot disk" on a disk smaller than one CHS cylinder (16 x 63
    sectors), which a bare 512-byte file is."""
    disk = tmp_path / "walk.img"
    disk.write_bytes(bootsector_image(1 * MIB, 5 * MIB).ljust(1 * MIB, b"\0"))
    serial = tmp_path / "serial.txt"
    proc = subprocess.Popen(
        [QEMU, "-M", "q35,accel=kvm", "-m", "150M", "-display", "none", "-nodefaults",
         "-serial", f"file:{serial}", "-drive", f"file={disk},format=raw"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        out = b""
        while time.monotonic() < deadline and proc.poll() is None:
            out = serial.read_bytes() if serial.exists() else b""
            if out.startswith(b"A") and b"B" in out:
                break
            time.sleep(0.05)
        running = proc.poll() is None
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert running, f"QEMU exited early ({proc.returncode}): {err.decode(errors='replace')}"
    assert out.startswith(b"A") and b"B" in out, f"serial output {out[:20]!r} within 60 s"
    assert set(out[1:]) == {ord("B")}
