"""The ``accel`` device: a VFIO-like accelerator that needs preparation.

It is the device the seed is about. It has device memory (dirtied while the
guest runs), and precopy *initial data* that the destination must receive
before it can prepare its resources (allocate and touch its memory, and the
hardware setup latency ``prepare-ms``). With switchover-ack the destination
prepares while the source still runs and approves when done; without it the
same preparation happens while the final state loads, inside the downtime.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import numpy as np

from livemig.machine.guest import parse_size
from livemig.qapi.opts import parse_opts

CHUNK_BYTES = 64 * 1024  # dirty-tracking granule of device memory


@dataclass(frozen=True)
class AccelDeviceConfig:
    id: str
    size: int = 64 << 20
    init_size: int = 4 << 20
    prepare_ms: int = 400
    dirty_rate_mb_s: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> AccelDeviceConfig:
        """Parse ``accel,id=acc0,size=64M,init-size=4M,prepare-ms=400[,dirty-rate=MB/s]``."""
        pairs = parse_opts(spec, implied_key="driver")
        if not pairs or pairs[0][0] != "driver":
            raise ValueError("Parameter 'driver' is missing")
        return cls.from_opts(pairs[0][1], pairs[1:])

    @classmethod
    def from_opts(cls, driver: str, pairs: list[tuple[str, str]]) -> AccelDeviceConfig:
        """From ``-device`` options already split by the QemuOpts parser."""
        if driver != "accel":
            raise ValueError(f"'{driver}' is not a valid device model name")
        kw: dict[str, object] = {}
        for key, value in pairs:
            if key == "id":
                kw["id"] = value
            elif key == "size":
                kw["size"] = parse_size(value)
            elif key == "init-size":
                kw["init_size"] = parse_size(value)
            elif key == "prepare-ms":
                kw["prepare_ms"] = int(value)
            elif key == "dirty-rate":
                kw["dirty_rate_mb_s"] = float(value)
            else:
                raise ValueError(f"Property 'accel.{key}' not found")
        if "id" not in kw:
            raise ValueError("device 'accel' needs an id")
        cfg = cls(**kw)  # type: ignore[arg-type]
        if cfg.size <= 0 or cfg.size % CHUNK_BYTES:
            raise ValueError(f"accel size must be a positive multiple of {CHUNK_BYTES} bytes")
        if not 0 <= cfg.init_size <= 1 << 30 or cfg.prepare_ms < 0 or cfg.dirty_rate_mb_s < 0:
            raise ValueError("accel init-size, prepare-ms and dirty-rate must be >= 0")
        return cfg


class AccelDevice:
    """Device state. Source: memory and initial data exist from the start.
    Destination: arrays are filled by the load, resources by :meth:`prepare`."""

    def __init__(self, config: AccelDeviceConfig, *, incoming: bool) -> None:
        self.config = config
        self.memory = np.zeros(config.size, dtype=np.uint8)
        self.init_data = np.zeros(config.init_size, dtype=np.uint8)
        if not incoming:
            # Deterministic content so digests mean something across runs.
            seed = int.from_bytes(hashlib.sha256(config.id.encode()).digest()[:8], "big")
            rng = np.random.default_rng(seed)
            self.memory[:] = rng.integers(0, 256, config.size, dtype=np.uint8)
            self.init_data[:] = rng.integers(0, 256, config.init_size, dtype=np.uint8)
        self.dirty_chunks = np.zeros(config.size // CHUNK_BYTES, dtype=bool)
        self.lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self.prepared = threading.Event()
        self.prepare_seconds: float | None = None
        self._resources: np.ndarray | None = None
        self._running = threading.Event()
        self._dirtier: threading.Thread | None = None
        self._closed = False

    # -- guest-driven activity ---------------------------------------------------
    def vm_state_change(self, running: bool) -> None:
        """The device dirties its memory only while the guest runs."""
        if running:
            self._running.set()
            if self._dirtier is None and self.config.dirty_rate_mb_s > 0:
                self._dirtier = threading.Thread(target=self._dirty_loop,
                                                 name=f"{self.config.id}-dirty", daemon=True)
                self._dirtier.start()
        else:
            self._running.clear()
            with self.lock:  # a write in flight finishes before we return
                pass

    def _dirty_loop(self) -> None:
        rate = self.config.dirty_rate_mb_s * 1e6
        nchunks = len(self.dirty_chunks)
        i = 0
        t0, done = time.monotonic(), 0
        while not self._closed:
            if not self._running.wait(0.1):
                t0, done = time.monotonic(), 0
                continue
            with self.lock:
                if not self._running.is_set():
                    continue
                lo = (i % nchunks) * CHUNK_BYTES
                self.memory[lo:lo + CHUNK_BYTES:4096] += 1
                self.dirty_chunks[i % nchunks] = True
            i += 1
            done += CHUNK_BYTES
            ahead = done / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(min(ahead, 0.05))

    # -- destination preparation --------------------------------------------------
    def prepare(self) -> None:
        """Allocate and touch the device's resources, then model the hardware
        setup latency. Idempotent; safe to race (the first caller does it)."""
        # Its own lock: loading device data (self.lock) must go on meanwhile.
        with self._prepare_lock:
            if self.prepared.is_set():
                return
            t0 = time.monotonic()
            self._resources = np.ones(self.config.size, dtype=np.uint8)  # touched
            remaining = self.config.prepare_ms / 1000 - (time.monotonic() - t0)
            if remaining > 0:
                time.sleep(remaining)
            self.prepare_seconds = time.monotonic() - t0
            self.prepared.set()

    def digest(self) -> str:
        with self.lock:
            h = hashlib.sha256(self.memory.data)
            h.update(self.init_data.data)
            return h.hexdigest()

    def close(self) -> None:
        self._closed = True
        self._running.set()
        if self._dirtier is not None:
            self._dirtier.join(timeout=1)
