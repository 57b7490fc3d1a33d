"""The walk guest's RAM invariant (QEMU's check_guests_ram).

Every page's first byte equals the previous page's, except at most one
step where it is exactly one less (mod 256): where the incrementing pass
was interrupted. Anything else means a page was lost or not re-sent.
"""

from __future__ import annotations

import numpy as np


def check_walk_pattern(first_bytes: np.ndarray, max_report: int = 10) -> list[str]:
    """Return up to ``max_report`` inconsistencies (empty list = pattern holds)."""
    b = np.asarray(first_bytes, dtype=np.uint8)
    if b.size < 2:
        return []
    step = (b[1:].astype(np.int16) - b[:-1].astype(np.int16)) % 256
    bad = np.flatnonzero(step != 0)
    problems: list[str] = []
    hit_edge = False
    for i in bad:
        if step[i] == 255 and not hit_edge:
            hit_edge = True
            continue
        problems.append(f"Memory content inconsistency at page {i + 1} "
                        f"last_byte = {b[i]:x} current = {b[i + 1]:x} hit_edge = {int(hit_edge)}")
        if len(problems) >= max_report:
            break
    return problems
