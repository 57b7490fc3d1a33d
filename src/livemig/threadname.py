"""Thread names the kernel knows: ``top -H``, ``perf`` and ``/proc/PID/task``
then show ``vcpu0``, ``live_migration``, ``mig/src/send_0``... instead of
``python`` for every thread (QEMU's ``-name debug-threads=on``)."""

from __future__ import annotations

import ctypes
import threading

_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def name_native_thread(name: str | None = None) -> None:
    """Set the calling thread's kernel name (at most 15 bytes) to ``name`` or its
    Python name. Best effort: profiling aid only, never an error."""
    raw = (name or threading.current_thread().name).encode(errors="replace")[:15]
    try:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
