"""The serial port (COM1, port 0x3f8): where guest output goes.

``-serial file:PATH`` appends every byte the guest writes to the file,
flushed at once, so a test can watch the walk's ``A`` and ``B`` markers.
"""

from __future__ import annotations

import threading
from typing import BinaryIO

COM1_PORT = 0x3F8


class Serial:
    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._file: BinaryIO | None = open(path, "ab", buffering=0) if path else None
        self._lock = threading.Lock()
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            self.bytes_written += len(data)
            if self._file is not None:
                self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
