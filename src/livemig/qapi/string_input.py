"""QEMU's scalar string parsers: sizes, booleans, unsigned integers.

One implementation each, shared by every place a string becomes a typed
value: ``-global migration.*`` (``qapi/string-input-visitor.c``), QemuOpts
options (``-m``, ``-guest``, ``-device``...), and ``file:PATH,offset=N``.
Errors carry QEMU's texts, without the ``can't apply global ...:`` or
``-opt VALUE:`` prefix, which the caller adds.
"""

from __future__ import annotations

import errno as _errno
import re
from typing import Final

from livemig.qapi.errors import (
    BOOL_EXPECTED,
    EINVAL_TEXT,
    ERANGE_TEXT,
    INVALID_PARAMETER_VALUE,
    SIZE_EXPECTED,
    SIZE_OUT_OF_RANGE,
    QapiError,
)

UINT64_LIMIT: Final = 1 << 64
UINT64_MAX: Final = UINT64_LIMIT - 1

# qapi/qapi-util.c qapi_bool_parse(): exact, case-sensitive words.
BOOL_WORDS: Final[dict[str, bool]] = {
    "on": True, "yes": True, "true": True, "y": True,
    "off": False, "no": False, "false": False, "n": False,
}
# qemu_strtou64(base 0): decimal, 0x hex, 0 octal; a leading '-' wraps like strtoull.
UINT_RE: Final = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
# util/cutils.c suffix_mul(): B, K, M, G, T, P, E (any case), powers of 1024.
SIZE_SUFFIXES: Final = "BKMGTPE"
_SPACE: Final = " \t\n\v\f\r"
_DECIMAL: Final = re.compile(r"[+]?[0-9]+")
_HEX: Final = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+)")
# What strtod reads of the fraction copy (which never holds an 'e': QEMU cuts it there).
_STRTOD: Final = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")


def _suffix_mul(c: str) -> int:
    i = SIZE_SUFFIXES.find(c.upper()) if len(c) == 1 else -1
    return 1 << (10 * i) if i >= 0 else 0


def _einval() -> QapiError:
    return QapiError(EINVAL_TEXT, errno=_errno.EINVAL)


def _erange() -> QapiError:
    return QapiError(ERANGE_TEXT, errno=_errno.ERANGE)


def qemu_strtosz(text: str, default_suffix: str = "B") -> int:
    """Bytes from ``N[.F][BKMGTPE]`` or ``0xHEX``, as QEMU's ``qemu_strtosz`` reads it.

    ``default_suffix`` applies when no unit is given (``qemu_strtosz_MiB``
    uses ``M``). Raises :class:`QapiError` with ``errno`` EINVAL (malformed,
    including a fraction of a byte or trailing text) or ERANGE (negative,
    or above 2**64-1), and strerror's text as ``desc``.
    """
    s = text.lstrip(_SPACE)
    if s.startswith("-"):
        # parse_uint() refuses negative numbers with ERANGE.
        if re.fullmatch(r"-[0-9]+", s) or _HEX.fullmatch(s):
            raise _erange()
        raise _einval()
    m = _DECIMAL.match(s)
    fraction = 0.0
    if m is not None and int(m.group()) == 0 and s[m.end():m.end() + 1] in ("x", "X"):
        # Looks like hex: reparse, and insist on no fraction or unit.
        h = _HEX.match(s)
        if h is None:
            raise _einval()
        val, rest = int(h.group(1), 16), s[h.end():]
        if val > UINT64_MAX:
            raise _erange()
        if rest[:1] == "." or (rest and _suffix_mul(rest[0])):
            raise _einval()
    elif (m is not None and s[m.end():m.end() + 1] == ".") or (m is None and "." in s):
        val = int(m.group()) if m is not None else 0
        rest = s[m.end():] if m is not None else s
        if m is not None and not rest[1:2].isdigit():
            rest = rest[1:]  # "1." and "1.k": no fraction digits
        else:
            copy = re.split("[eE]", rest, maxsplit=1)[0]
            f = _STRTOD.match(copy)
            if f is None:
                raise _einval()
            fraction = float(f.group())
            rest = rest[f.end():]
    elif m is not None:
        val, rest = int(m.group()), s[m.end():]
    else:
        raise _einval()
    mul = _suffix_mul(rest[:1]) if rest else 0
    if mul:
        rest = rest[1:]
    else:
        mul = _suffix_mul(default_suffix)
    if rest:
        raise _einval()
    if val > UINT64_MAX:
        raise _erange()
    if mul == 1:
        if fraction:
            raise _einval()  # no fractional bytes
        return val
    # 64.64 fixed point, like QEMU's exact fraction * mul.
    valf = min(int(fraction * UINT64_LIMIT), UINT64_MAX)
    result = val * mul + ((valf * mul) >> 64)
    if result > UINT64_MAX:
        raise _erange()
    return result


def parse_option_size(name: str, text: str) -> int:
    """A size option or property, with ``parse_option_size``'s texts."""
    try:
        return qemu_strtosz(text)
    except QapiError as exc:
        if exc.errno == _errno.ERANGE:
            raise QapiError(SIZE_OUT_OF_RANGE % (text, name)) from None
        raise QapiError(INVALID_PARAMETER_VALUE % (name, SIZE_EXPECTED)) from None


# The name the -global code and its tests use.
parse_size = parse_option_size


def qapi_bool_parse(name: str, text: str) -> bool:
    """on/yes/true/y or off/no/false/n, exactly (QemuOpts booleans and ``-global``)."""
    state = BOOL_WORDS.get(text)
    if state is None:
        raise QapiError(INVALID_PARAMETER_VALUE % (name, BOOL_EXPECTED))
    return state


parse_bool = qapi_bool_parse


def parse_uint64(name: str, text: str) -> int:
    """An unsigned 64-bit integer, as ``qemu_strtou64(text, NULL, 0, ...)`` reads it."""
    m = UINT_RE.fullmatch(text)
    if m is not None:
        digits = m.group(2)
        if digits[:2].lower() == "0x":
            value = int(digits, 16)
        else:
            value = int(digits, 8 if len(digits) > 1 and digits[0] == "0" else 10)
        if value < UINT64_LIMIT:
            return -value % UINT64_LIMIT if m.group(1) == "-" else value
    raise QapiError(INVALID_PARAMETER_VALUE % (name, "uint64"))
