"""What the guest runs: the *walk* program, or a raw boot-sector image.

The walk is the program QEMU's migration tests run (tests/qtest/migration/
i386/a-b-bootblock.S): write ``A`` to COM1 once, zero the first byte of every
4 KiB page in ``[start, end)``, then forever increment the first byte of each
page in turn, writing ``B`` every 64 full passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIB = 1024 * 1024

# About what QEMU's KVM guest reaches on these machines (a 100 MiB pass in ~0.09 s).
DEFAULT_WALK_RATE_PAGES_PER_S = 280_000

_SIZE_RE = re.compile(r"^(\d+)([kKmMgGtT]?)[bB]?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Parse ``512M``, ``2G``, ``4096``; a bare number takes ``default_unit``."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"invalid size '{text}'")
    unit = (m.group(2) or default_unit).lower()
    return int(m.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class GuestConfig:
    """The guest program. ``kind`` is ``walk`` or ``image`` (a raw boot sector).

    Addresses are guest-physical byte addresses; ``rate_pages_per_s`` 0 means
    as fast as the accelerator can.
    """

    kind: str = "walk"
    start: int = 1 * MIB
    end: int = 100 * MIB
    rate_pages_per_s: int = DEFAULT_WALK_RATE_PAGES_PER_S
    image_path: str | None = None

    @classmethod
    def parse_walk(cls, spec: str) -> GuestConfig:
        """Parse ``walk[,start=1M,end=100M,rate=N]`` (QEMU-style key=value list)."""
        parts = spec.split(",")
        if parts[0] != "walk":
            raise ValueError(f"unknown guest program '{parts[0]}' (only 'walk')")
        kw: dict[str, int] = {}
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"guest option '{item}' needs a value")
            if key in ("start", "end"):
                kw[key] = parse_size(value, default_unit="")
            elif key == "rate":
                kw["rate_pages_per_s"] = int(value)
            else:
                raise ValueError(f"unknown guest option '{key}'")
        cfg = cls(kind="walk", **kw)
        cfg.validate()
        return cfg

    def validate(self, ram_size: int | None = None) -> None:
        if self.kind != "walk":
            return
        if self.start % 4096 or self.end % 4096 or not 0 <= self.start < self.end:
            raise ValueError("walk start and end must be 4 KiB aligned with start < end")
        if self.rate_pages_per_s < 0:
            raise ValueError("walk rate must be >= 0")
        if ram_size is not None and self.end > ram_size:
            raise ValueError(f"walk end 0x{self.end:x} is beyond guest RAM (0x{ram_size:x})")
