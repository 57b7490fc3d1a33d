"""QMP's JSON codec (livemig.qmp.qjson), sans-IO: bytes in, messages out, and back.

Expected texts and bytes are QEMU 10.0's (qobject/json-*.c).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.qmp.qjson import JSONMessageParser, encode_message, qdict_order, qmp_dumps

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, '
            b'"package": "livemig 0.1.0"}, "capabilities": []}}\r\n')


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"execute":foo}\n', [(None, "JSON parse error, invalid keyword 'foo'")]),
    (b"}", [(None, "JSON parse error, expecting value")]),
    (b'{"a" }', [(None, "JSON parse error, missing : in object pair")]),
    (b"[1,]", [(None, "JSON parse error, expecting value")]),
    (b"[1 2]", [(None, "JSON parse error, expected separator in list")]),
    (b'{"a": 1 "b": 2}', [(None, "JSON parse error, expected separator in dict")]),
    (b'{"a": 1, "a": 2}', [(None, "JSON parse error, duplicate key")]),
    (b"{1: 2}", [(None, "JSON parse error, key is not a string in object")]),
    (b'"\\x"', [(None, "JSON parse error, invalid escape sequence in string")]),
    (b'"\\uD800"', [(None, "JSON parse error, \\uD800 is not a valid Unicode character")]),
    (b'"\xc3"', [(None, "JSON parse error, invalid UTF-8 sequence in string")]),
    (b"01 ", [(None, "JSON parse error, stray '01'")]),
    (b"{'single': 'quotes'}", [({"single": "quotes"}, None)]),
    (b'"\\uD83D\\uDE00"', [("\U0001F600", None)]),
    (b"18446744073709551615 18446744073709551616 ", [
        ((1 << 64) - 1, None), (float(1 << 64), None)]),
])
def test_json_parser_matches_qemu(data: bytes, expected: list) -> None:
    assert JSONMessageParser().feed(data) == expected


def test_json_writer_matches_qemu() -> None:
    assert qmp_dumps({"a": "\u00e9\U0001F600\x7f\n\"", "b": 0.1, "c": 0.0, "d": [], "e": {}}) == (
        '{"d": [], "e": {}, "a": "\\u00E9\\uD83D\\uDE00\\u007F\\n\\"", '
        '"b": 0.10000000000000001, "c": 0}')
    # VersionTriple, VersionInfo, greeting and event key orders seen on QEMU 10.0.2.
    assert encode_message({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                                               "package": "livemig 0.1.0"},
                                   "capabilities": []}}) == GREETING
    assert qdict_order(["event", "timestamp", "data"]) == ["timestamp", "event", "data"]
    assert qdict_order(["status", "running"]) == ["status", "running"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)).filter(
        lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE))),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_json_round_trip_in_any_chunking(value: Any, cuts: list[int]) -> None:
    wire = (qmp_dumps([value]) + "\r\n").encode()
    parser = JSONMessageParser()
    got = []
    previous = 0
    for cut in sorted(cut % (len(wire) + 1) for cut in cuts) + [len(wire)]:
        got += parser.feed(wire[previous:cut])
        previous = cut
    assert got == [([value], None)]
    assert json.loads(wire) == [value]


def test_codec_is_sans_io() -> None:
    """Importing the codec pulls in neither asyncio nor sockets (nor the QMP server)."""
    code = ("import sys, livemig.qmp.qjson; "
            "print(sorted(m for m in ('asyncio', 'socket', 'livemig.qmp.server') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
