"""QEMU's string input visitor (``qapi/string-input-visitor.c``) for ``-global`` values.

``-global migration.<prop>=<value>`` reaches a property as a string; these
parse it the way QEMU does and fail with QEMU's texts (without the
``can't apply global ...:`` prefix, which the caller adds).
"""

from __future__ import annotations

import re
from typing import Final

from livemig.qapi.errors import INVALID_PARAMETER_TYPE, INVALID_PARAMETER_VALUE, QapiError

UINT64_LIMIT: Final = 1 << 64

_BOOL_WORDS: Final = {"on": True, "yes": True, "true": True,
                      "off": False, "no": False, "false": False}
# qemu_strtou64(base 0): decimal, 0x hex, 0 octal; a leading '-' wraps like strtoull.
_UINT_RE: Final = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
# qemu_strtosz: integer (or hex), optional fraction, optional unit (powers of 1024).
_SIZE_RE: Final = re.compile(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+)(\.[0-9]+)?([bkmgtpeBKMGTPE]?)")
_SIZE_UNITS: Final = "BKMGTPE"


def parse_bool(name: str, text: str) -> bool:
    """on/yes/true or off/no/false, any case."""
    state = _BOOL_WORDS.get(text.lower())
    if state is None:
        raise QapiError(INVALID_PARAMETER_TYPE % (name, "boolean"))
    return state


def parse_uint64(name: str, text: str) -> int:
    """An unsigned 64-bit integer, as ``qemu_strtou64(text, NULL, 0, ...)`` reads it."""
    m = _UINT_RE.fullmatch(text)
    if m is not None:
        digits = m.group(2)
        if digits[:2].lower() == "0x":
            value = int(digits, 16)
        else:
            value = int(digits, 8 if len(digits) > 1 and digits[0] == "0" else 10)
        if value < UINT64_LIMIT:
            return -value % UINT64_LIMIT if m.group(1) == "-" else value
    raise QapiError(INVALID_PARAMETER_VALUE % (name, "uint64"))


def parse_size(name: str, text: str) -> int:
    """A size in bytes ("4096", "64M", "1.5G"), as ``parse_option_size`` reads it."""
    m = _SIZE_RE.fullmatch(text)
    if m is not None:
        digits, fraction, unit = m.groups()
        hexa = digits[:2].lower() == "0x"
        mul = 1 << (10 * _SIZE_UNITS.index(unit.upper() or "B"))
        # No fraction with hex, and a fraction needs a unit above bytes.
        if not (hexa and fraction) and not (fraction and float(fraction) and mul == 1):
            value = int(digits, 16 if hexa else 10) * mul + int(float(fraction or "0") * mul)
            if value >= UINT64_LIMIT:
                raise QapiError(f"Value '{text}' is out of range for parameter '{name}'")
            return value
    raise QapiError(INVALID_PARAMETER_VALUE % (name, "a non-negative number below 2^64"))
