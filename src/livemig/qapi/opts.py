"""QEMU's QemuOpts ``k=v,k=v`` parser (``util/qemu-option.c``), once for every option.

``-device``, ``-guest``, ``-accel``, ``-machine``, ``-name``, ``-m``,
``-drive`` and the ``-global driver=...,property=...,value=...`` form all
go through :func:`parse_opts`, so they agree on QEMU's rules:

* a value runs to the next single ``,``; ``,,`` stands for a literal comma;
* a name runs to the first ``=`` or ``,`` (no escaping in names);
* the first item without ``=`` is the value of ``implied_key`` when given
  (``-device accel,id=a`` is ``driver=accel``), else a short-form boolean:
  ``foo`` is ``foo=on`` and ``nofoo`` is ``foo=off`` (deprecated in QEMU);
* an empty item (``a=1,,`` at the end aside) is a flag with an empty name.

Unlike QEMU, ``id`` stays in the list (QEMU moves it to the QemuOpts id).

A chardev spec such as ``-qmp unix:PATH,server=on,wait=off`` is
``parse_opts(text_after_"unix:", implied_key="path")`` (QEMU's
``qemu_chr_parse_compat``), booleans read with :meth:`Opts.get_bool`.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterable, Iterator
from typing import Final

from livemig.qapi.errors import (
    INVALID_PARAMETER,
    INVALID_PARAMETER_VALUE,
    NUMBER_EXPECTED,
    QapiError,
)
from livemig.qapi.string_input import UINT64_LIMIT, UINT_RE, parse_option_size, qapi_bool_parse

TOO_LARGE: Final = "Value '%s' is too large for parameter '%s'"


def get_opt_value(text: str, start: int = 0) -> tuple[str, int]:
    """The value at ``text[start:]`` up to a single ``,`` (``,,`` is a comma).

    Returns ``(value, index of the ending ',' or len(text))``, as QEMU's
    ``get_opt_value``.
    """
    out: list[str] = []
    i = start
    while True:
        comma = text.find(",", i)
        if comma < 0:
            out.append(text[i:])
            return "".join(out), len(text)
        if text.startswith(",,", comma):
            out.append(text[i:comma + 1])
            i = comma + 2
            continue
        out.append(text[i:comma])
        return "".join(out), comma


def parse_opts(text: str, implied_key: str | None = None) -> list[tuple[str, str]]:
    """Split QemuOpts ``text`` into ``(name, value)`` pairs, in order (QEMU's ``opts_do_parse``).

    ``implied_key``: the list's ``implied_opt_name`` (``driver`` for
    ``-device``), used for a first item that has no ``=``. Never fails:
    what QEMU would refuse is an unknown name, checked by :meth:`Opts.check`.
    """
    pairs: list[tuple[str, str]] = []
    first = implied_key
    i, n = 0, len(text)
    while i < n:
        end = i
        while end < n and text[end] not in "=,":
            end += 1
        if end < n and text[end] == "=":
            name = text[i:end]
            value, i = get_opt_value(text, end + 1)
        elif first is not None:
            name = first
            value, i = get_opt_value(text, i)
        else:
            name, i = text[i:end], end
            if name.startswith("no"):
                name, value = name[2:], "off"
            else:
                value = "on"
        first = None
        pairs.append((name, value))
        if i < n:  # skip the separating comma
            i += 1
    return pairs


def format_opt_value(value: str) -> str:
    """``value`` escaped for a QemuOpts string (each ``,`` doubled)."""
    return value.replace(",", ",,")


def parse_option_number(name: str, value: str) -> int:
    """A number option (``qemu_strtou64(value, NULL, 0)``: a ``-`` wraps), with QEMU's texts."""
    m = UINT_RE.fullmatch(value)
    if m is None:
        raise QapiError(INVALID_PARAMETER_VALUE % (name, NUMBER_EXPECTED), errno=_errno.EINVAL)
    digits = m.group(2)
    base = 16 if digits[:2].lower() == "0x" else 8 if len(digits) > 1 and digits[0] == "0" else 10
    number = int(digits, base)
    if number >= UINT64_LIMIT:
        raise QapiError(TOO_LARGE % (value, name), errno=_errno.ERANGE)
    return -number % UINT64_LIMIT if m.group(1) == "-" else number


class Opts:
    """A parsed option list with QemuOpts' typed look-ups (the last occurrence wins)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = list(pairs)

    @classmethod
    def parse(cls, text: str, implied_key: str | None = None) -> Opts:
        return cls(parse_opts(text, implied_key))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.pairs)

    def __contains__(self, name: object) -> bool:
        return any(key == name for key, _ in self.pairs)

    def get(self, name: str, default: str | None = None) -> str | None:
        """``qemu_opt_get``: the last value given for ``name``."""
        for key, value in reversed(self.pairs):
            if key == name:
                return value
        return default

    def get_bool(self, name: str, default: bool) -> bool:
        value = self.get(name)
        return default if value is None else qapi_bool_parse(name, value)

    def get_size(self, name: str, default: int) -> int:
        value = self.get(name)
        return default if value is None else parse_option_size(name, value)

    def get_number(self, name: str, default: int) -> int:
        value = self.get(name)
        return default if value is None else parse_option_number(name, value)

    def check(self, allowed: Iterable[str]) -> None:
        """QEMU's ``opt_validate``: the first name not in ``allowed`` is refused."""
        names = set(allowed)
        for key, _ in self.pairs:
            if key not in names:
                raise QapiError(INVALID_PARAMETER % key)
