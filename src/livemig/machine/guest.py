"""What the guest runs: the *walk* program, or a raw boot-sector image.

The walk is the program QEMU's migration tests run (tests/qtest/migration/
i386/a-b-bootblock.S): write ``A`` to COM1 once, zero the first byte of every
4 KiB page in ``[start, end)``, then forever increment the first byte of each
page in turn, writing ``B`` every 64 full passes.

Ticks and pace (issue 11), in the incrementing passes only (the zeroing pass
runs at full speed, silently): ``tick=N`` writes ``.`` to COM1 after every
N pages walked (counted from the first incrementing page), ``pace=C`` makes
the guest busy-wait C TSC cycles (``rdtsc``) after each page. Under KVM that
gives ``tsc_hz / (C + per-page cost)`` pages/s; the soft vCPU, which has no
per-page cost to speak of, runs a paced walk at ``tsc_hz / C`` pages/s
(:meth:`GuestConfig.soft_rate_pages_per_s`, ``machine/tsc.py``).

``rate`` (the soft vCPU's pages/s) and ``pace`` are one knob seen from two
engines: ``-guest walk,...`` refuses both at once; a ``GuestConfig`` built
with both (not from options) runs the soft walk at the pace's rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from livemig.qapi.errors import QapiError
from livemig.qapi.opts import Opts, parse_option_number
from livemig.qapi.string_input import qemu_strtosz

MIB = 1024 * 1024
U32_MAX = 0xFFFFFFFF

# About what QEMU's KVM guest reaches on these machines (a 100 MiB pass in ~0.09 s).
DEFAULT_WALK_RATE_PAGES_PER_S = 280_000

def parse_size(text: str, *, default_unit: str = "") -> int:
    """``512M``, ``2G``, ``1.5k``, ``0x1000`` (QEMU's ``qemu_strtosz``, units powers of 1024).

    A bare number takes ``default_unit`` (``"m"``: mebibytes). ValueError
    when malformed, so callers outside the qapi layer need not know QapiError.
    """
    try:
        return qemu_strtosz(text, default_unit.upper() or "B")
    except QapiError:
        raise ValueError(f"invalid size '{text}'") from None


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
    tick_pages: int = 0           # a '.' on COM1 after every N pages walked; 0 = off
    pace_cycles: int = 0          # TSC cycles the guest waits after each page; 0 = none

    @classmethod
    def parse_walk(cls, spec: str) -> GuestConfig:
        """Parse ``walk[,start=1M,end=100M,rate=N,tick=N,pace=C]`` (QemuOpts,
        ``program`` implied). ``pace`` is the guest's own (TSC cycles per page,
        for KVM and QEMU alike); the soft vCPU then runs at the same
        ``tsc_hz / pace`` pages/s, so ``rate`` and ``pace`` exclude each other."""
        opts = Opts.parse(spec, implied_key="program")
        program = opts.pairs[0][1] if opts.pairs and opts.pairs[0][0] == "program" else None
        if program != "walk":
            first = spec.split(",", 1)[0]
            raise ValueError(f"unknown guest program '{program or first}' (only 'walk')")
        kw: dict[str, int] = {}
        for key, value in opts.pairs[1:]:
            if key in ("start", "end"):
                kw[key] = parse_size(value)
            elif key in ("rate", "tick", "pace"):
                try:
                    number = parse_option_number(key, value)
                except QapiError as exc:
                    raise ValueError(exc.desc) from None
                if key != "rate" and number > U32_MAX:
                    raise ValueError(f"walk {key} must be 0 to {U32_MAX} (a 32-bit word "
                                     f"of the guest), not '{value}'")
                kw[{"rate": "rate_pages_per_s", "tick": "tick_pages",
                    "pace": "pace_cycles"}[key]] = number
            else:
                raise ValueError(f"unknown guest option '{key}'")
        if "rate_pages_per_s" in kw and kw.get("pace_cycles"):
            raise ValueError("walk rate and pace exclude each other: pace sets the rate "
                             "(tsc_hz / pace pages/s on the soft accelerator)")
        cfg = cls(kind="walk", start=kw.get("start", cls.start), end=kw.get("end", cls.end),
                  rate_pages_per_s=kw.get("rate_pages_per_s", cls.rate_pages_per_s),
                  tick_pages=kw.get("tick_pages", 0),
                  pace_cycles=kw.get("pace_cycles", 0))
        if cfg.pace_cycles:     # the rate the soft vCPU will run, for whoever reports it
            cfg = dataclasses.replace(cfg, rate_pages_per_s=cfg.soft_rate_pages_per_s())
        cfg.validate()
        return cfg

    def soft_rate_pages_per_s(self) -> int:
        """The soft vCPU's pages/s: ``tsc_hz / pace_cycles`` when paced (the rate a
        KVM guest with that pace would have without its own per-page cost),
        else ``rate_pages_per_s`` (0: as fast as it can)."""
        if not self.pace_cycles:
            return self.rate_pages_per_s
        from livemig.machine.tsc import tsc_hz
        return max(1, int(tsc_hz() / self.pace_cycles))

    def validate(self, ram_size: int | None = None) -> None:
        if self.kind != "walk":
            return
        if self.start % 4096 or self.end % 4096 or not 0 <= self.start < self.end:
            raise ValueError("walk start and end must be 4 KiB aligned with start < end")
        if self.rate_pages_per_s < 0:
            raise ValueError("walk rate must be >= 0")
        for what, value in (("tick", self.tick_pages), ("pace", self.pace_cycles)):
            if not 0 <= value <= U32_MAX:
                raise ValueError(f"walk {what} must be 0 to {U32_MAX} (a 32-bit word "
                                 f"of the guest), not {value}")
        if ram_size is not None and self.end > ram_size:
            raise ValueError(f"walk end 0x{self.end:x} is beyond guest RAM (0x{ram_size:x})")
