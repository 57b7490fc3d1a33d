"""QMP server: QEMU 10.0's monitor protocol over UNIX and TCP sockets.

The server speaks QMP byte for byte like ``qemu-system-x86_64 -qmp``, so
``qemu.qmp``, libvirt-style clients and scripts written against QEMU drive
livemig unmodified:

* greeting ``{"QMP": {"version": {...}, "capabilities": []}}`` (no OOB);
* capabilities negotiation (``qmp_capabilities``) before any command;
* requests are JSON objects, parsed by a port of QEMU's JSON streamer
  (``qobject/json-lexer.c``, ``json-streamer.c``, ``json-parser.c``): objects
  may be split across reads or concatenated in one, and errors carry QEMU's
  texts (``JSON parse error, ...``);
* every response and event is one JSON object plus ``"\\r\\n"``, with keys in
  the order QEMU's QDict hash table yields them (``{"return": ..., "id": ...}``,
  ``{"timestamp": ..., "event": ..., "data": ...}``).

Threads: everything here runs on the asyncio loop that called
:meth:`QMPServer.start` (the main thread), except :meth:`QMPServer.emit_event`
and :meth:`QMPServer.request_quit`, which any thread may call. VM commands are
registered by other layers through :class:`~livemig.qmp.registry.CommandRegistry`.

The JSON section (lexer, streamer, parser, encoder) is sans-IO and could
live in a module of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from livemig.qmp import errors
from livemig.qmp.errors import QMPError, error_fields
from livemig.qmp.registry import ArgSpec, Command, CommandRegistry, normalize_args

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# -qmp chardev specification
# ---------------------------------------------------------------------------

_BOOL_TRUE: Final = frozenset({"on", "yes", "true", "y"})
_BOOL_FALSE: Final = frozenset({"off", "no", "false", "n"})
_SOCKET_OPTIONS: Final = frozenset({"server", "wait", "nodelay", "delay", "ipv4", "ipv6"})
_UNIX_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_SUPPORTED_FORMS: Final = "unix:PATH,server=on[,wait=off] or tcp:HOST:PORT,server=on[,wait=off]"


@dataclass(frozen=True)
class ListenSpec:
    """A parsed ``-qmp`` argument: where to listen and whether to wait.

    ``wait``: like QEMU's ``wait=on`` (the default for a server socket),
    :meth:`QMPServer.start` returns only once a first client has connected.
    """

    kind: str  # "unix" or "tcp"
    spec: str
    path: str | None = None
    host: str = ""
    port: int = 0
    wait: bool = True
    nodelay: bool = False
    family: int = socket.AF_UNSPEC


def _split_options(text: str) -> list[str]:
    """Split QemuOpts text on ',' where ',,' stands for a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _parse_bool(spec: str, name: str, value: str) -> bool:
    if value in _BOOL_TRUE:
        return True
    if value in _BOOL_FALSE:
        return False
    raise ValueError(f"-qmp {spec}: Parameter '{name}' expects 'on' or 'off'")


def parse_qmp_spec(spec: str) -> ListenSpec:
    """Parse QEMU's ``-qmp`` chardev shorthand; ValueError names what is wrong.

    Accepted: ``unix:PATH`` and ``tcp:[HOST]:PORT`` (HOST may be ``[v6]``),
    followed by ``server=on`` (or the old ``server``), and optionally
    ``wait=off``/``nowait``, ``nodelay=on``, ``ipv4=on``, ``ipv6=on``.
    """
    if spec.startswith("unix:"):
        kind, rest = "unix", spec[5:]
    elif spec.startswith("tcp:"):
        kind, rest = "tcp", spec[4:]
    else:
        raise ValueError(f"-qmp {spec}: unsupported chardev; livemig supports {_SUPPORTED_FORMS}")
    fields = _split_options(rest)
    address, options = fields[0], fields[1:]
    values: dict[str, bool] = {}
    for option in options:
        if "=" in option:
            name, value = option.split("=", 1)
            if name not in _SOCKET_OPTIONS:
                raise ValueError(f"-qmp {spec}: unsupported option '{name}'")
            values[name] = _parse_bool(spec, name, value)
        elif option in _SOCKET_OPTIONS:
            values[option] = True
        elif option.startswith("no") and option[2:] in _SOCKET_OPTIONS:
            values[option[2:]] = False
        else:
            raise ValueError(f"-qmp {spec}: unsupported option '{option}'")
    if not values.get("server", False):
        raise ValueError(f"-qmp {spec}: only listening sockets are supported, add server=on")
    wait = values.get("wait", True)
    nodelay = values.get("nodelay", False) or not values.get("delay", True)
    if kind == "unix":
        if not address:
            raise ValueError(f"-qmp {spec}: missing socket path")
        if len(os.fsencode(address)) > _UNIX_PATH_MAX:
            raise ValueError(f"-qmp {spec}: UNIX socket path is longer than "
                             f"{_UNIX_PATH_MAX} bytes")
        for name in ("ipv4", "ipv6", "nodelay", "delay"):
            if name in values:
                raise ValueError(f"-qmp {spec}: option '{name}' needs a tcp: socket")
        return ListenSpec("unix", spec, path=address, wait=wait)
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"-qmp {spec}: expected tcp:[HOST]:PORT")
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"-qmp {spec}: expected tcp:HOST:PORT")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"-qmp {spec}: port must be a number from 0 to 65535")
    family = socket.AF_UNSPEC
    if values.get("ipv4") and not values.get("ipv6"):
        family = socket.AF_INET
    elif values.get("ipv6") and not values.get("ipv4"):
        family = socket.AF_INET6
    return ListenSpec("tcp", spec, host=host, port=int(port_text), wait=wait,
                      nodelay=nodelay, family=family)


# ---------------------------------------------------------------------------
# JSON output: QEMU's key order and string escaping
# ---------------------------------------------------------------------------

QDICT_BUCKET_MAX: Final = 512


@functools.lru_cache(maxsize=4096)
def _qdict_bucket(key: str) -> int:
    """QEMU's ``tdb_hash(key) % QDICT_BUCKET_MAX`` (qobject/qdict.c)."""
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % QDICT_BUCKET_MAX


def qdict_order(keys: Iterable[str]) -> list[str]:
    """Keys in the order QEMU iterates a QDict built by inserting them in order.

    QDict is a hash table of 512 buckets walked in bucket order; a bucket is
    a list with the newest entry first. Hence ``{"return", "id"}`` but
    ``{"id", "error"}``, and ``{"micro", "minor", "major"}``.
    """
    keyed = [(_qdict_bucket(key), -index, key) for index, key in enumerate(keys)]
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [key for _, _, key in keyed]


def _valid_codepoint(cp: int) -> bool:
    """util/unicode.c is_valid_codepoint(): no surrogates, no noncharacters."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


_ESCAPED: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
                   "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE: Final = re.compile('["\\\\\x00-\x1f\x7f-\U0010ffff]')


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    simple = _ESCAPED.get(ch)
    if simple is not None:
        return simple
    cp = ord(ch)
    if not _valid_codepoint(cp):
        cp = 0xFFFD
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _quote(text: str) -> str:
    """qobject/json-writer.c quoted_str(): ASCII out, \\uXXXX in upper case."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return format(value, ".17g")  # json_writer_double(): "%.17g"
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"cannot send {type(value).__name__} over QMP")


_END: Final = object()


def qmp_dumps(obj: Any) -> str:
    """Serialise like QEMU's JSON writer (non-pretty): same spacing, escaping,
    float format (``%.17g``) and QDict key order (see :func:`qdict_order`; a
    dict's insertion order stands for QEMU's insertion order, i.e. QAPI
    member order). Iterative, so a 1024-deep ``id`` echoes back fine.
    """
    out: list[str] = []
    # Each frame: (is_object, iterator, [first?])
    stack: list[tuple[bool, Iterator[Any], list[bool]]] = []
    item = obj
    while True:
        if isinstance(item, dict):
            if item:
                out.append("{")
                pairs = [(key, item[key]) for key in qdict_order(item)]
                stack.append((True, iter(pairs), [True]))
            else:
                out.append("{}")
        elif isinstance(item, (list, tuple)):
            if item:
                out.append("[")
                stack.append((False, iter(item), [True]))
            else:
                out.append("[]")
        else:
            out.append(_scalar(item))
        while stack:
            is_object, iterator, first = stack[-1]
            nxt: Any = next(iterator, _END)
            if nxt is _END:
                out.append("}" if is_object else "]")
                stack.pop()
                continue
            if first[0]:
                first[0] = False
            else:
                out.append(", ")
            if is_object:
                key, item = nxt
                if not isinstance(key, str):
                    raise TypeError(f"QMP object keys must be strings, not {key!r}")
                out.append(_quote(key))
                out.append(": ")
            else:
                item = nxt
            break
        else:
            return "".join(out)


def encode_message(msg: dict[str, Any]) -> bytes:
    """One QMP message on the wire: JSON plus CRLF (monitor_puts adds the CR)."""
    return qmp_dumps(msg).encode("ascii") + b"\r\n"


# ---------------------------------------------------------------------------
# JSON input: port of QEMU's lexer (DFA), streamer and parser
# ---------------------------------------------------------------------------

# qobject/json-lexer.c states and qobject/json-parser-int.h token types.
JSON_ERROR: Final = 0
_IN_RECOVERY: Final = 1
_IN_DQ_STRING_ESCAPE: Final = 2
_IN_DQ_STRING: Final = 3
_IN_SQ_STRING_ESCAPE: Final = 4
_IN_SQ_STRING: Final = 5
_IN_ZERO: Final = 6
_IN_EXP_DIGITS: Final = 7
_IN_EXP_SIGN: Final = 8
_IN_EXP_E: Final = 9
_IN_MANTISSA: Final = 10
_IN_MANTISSA_DIGITS: Final = 11
_IN_DIGITS: Final = 12
_IN_SIGN: Final = 13
_IN_KEYWORD: Final = 14
_IN_START: Final = 15
JSON_LCURLY: Final = 16
JSON_RCURLY: Final = 17
JSON_LSQUARE: Final = 18
JSON_RSQUARE: Final = 19
JSON_COLON: Final = 20
JSON_COMMA: Final = 21
JSON_INTEGER: Final = 22
JSON_FLOAT: Final = 23
JSON_KEYWORD: Final = 24
JSON_STRING: Final = 25
_JSON_MIN: Final = JSON_LCURLY
_LOOKAHEAD: Final = 0x80


def _build_lexer_table() -> tuple[bytes, ...]:
    """json_lexer[][] from qobject/json-lexer.c (without interpolation).

    Entries default to JSON_ERROR, consuming the character; ``| _LOOKAHEAD``
    means "emit/switch without consuming, then look at the char again".
    """
    table = [bytearray(256) for _ in range(_IN_START + 1)]

    def put(state: int, chars: Iterable[int] | bytes, value: int) -> None:
        for ch in chars:
            table[state][ch] = value

    digits = b"0123456789"
    put(_IN_RECOVERY, range(0x20), _IN_START | _LOOKAHEAD)
    put(_IN_RECOVERY, range(0x20, 0xFE), _IN_RECOVERY)
    put(_IN_RECOVERY, range(0xFE, 0x100), _IN_START | _LOOKAHEAD)
    put(_IN_RECOVERY, b"\t", _IN_RECOVERY)
    put(_IN_RECOVERY, b"[]{}:,", _IN_START | _LOOKAHEAD)
    for escape, string, quote in ((_IN_DQ_STRING_ESCAPE, _IN_DQ_STRING, b'"'),
                                  (_IN_SQ_STRING_ESCAPE, _IN_SQ_STRING, b"'")):
        put(escape, range(0x20, 0xFE), string)
        put(string, range(0x20, 0xFE), string)
        put(string, b"\\", escape)
        put(string, quote, JSON_STRING)
    put(_IN_ZERO, range(256), JSON_INTEGER | _LOOKAHEAD)
    put(_IN_ZERO, digits, JSON_ERROR)
    put(_IN_ZERO, b".", _IN_MANTISSA)
    put(_IN_EXP_DIGITS, range(256), JSON_FLOAT | _LOOKAHEAD)
    put(_IN_EXP_DIGITS, digits, _IN_EXP_DIGITS)
    put(_IN_EXP_SIGN, digits, _IN_EXP_DIGITS)
    put(_IN_EXP_E, b"-+", _IN_EXP_SIGN)
    put(_IN_EXP_E, digits, _IN_EXP_DIGITS)
    put(_IN_MANTISSA_DIGITS, range(256), JSON_FLOAT | _LOOKAHEAD)
    put(_IN_MANTISSA_DIGITS, digits, _IN_MANTISSA_DIGITS)
    put(_IN_MANTISSA_DIGITS, b"eE", _IN_EXP_E)
    put(_IN_MANTISSA, digits, _IN_MANTISSA_DIGITS)
    put(_IN_DIGITS, range(256), JSON_INTEGER | _LOOKAHEAD)
    put(_IN_DIGITS, digits, _IN_DIGITS)
    put(_IN_DIGITS, b"eE", _IN_EXP_E)
    put(_IN_DIGITS, b".", _IN_MANTISSA)
    put(_IN_SIGN, b"0", _IN_ZERO)
    put(_IN_SIGN, b"123456789", _IN_DIGITS)
    put(_IN_KEYWORD, range(256), JSON_KEYWORD | _LOOKAHEAD)
    put(_IN_KEYWORD, range(ord("a"), ord("z") + 1), _IN_KEYWORD)
    start = table[_IN_START]
    start[ord('"')] = _IN_DQ_STRING
    start[ord("'")] = _IN_SQ_STRING
    start[ord("0")] = _IN_ZERO
    put(_IN_START, b"123456789", _IN_DIGITS)
    start[ord("-")] = _IN_SIGN
    start[ord("{")] = JSON_LCURLY
    start[ord("}")] = JSON_RCURLY
    start[ord("[")] = JSON_LSQUARE
    start[ord("]")] = JSON_RSQUARE
    start[ord(",")] = JSON_COMMA
    start[ord(":")] = JSON_COLON
    put(_IN_START, range(ord("a"), ord("z") + 1), _IN_KEYWORD)
    put(_IN_START, b" \t\r\n", _IN_START)
    return tuple(bytes(row) for row in table)


_LEXER_TABLE: Final = _build_lexer_table()
# Fast paths over runs the DFA would walk one byte at a time.
_DQ_RUN: Final = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]+')
_SQ_RUN: Final = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]+")
_WS_RUN: Final = re.compile(rb"[ \t\r\n]+")
_RECOVERY_RUN: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]+")

QEMU_MAX_TOKEN_SIZE: Final = 64 << 20  # bytes, json-streamer.c MAX_TOKEN_SIZE
QEMU_MAX_TOKEN_COUNT: Final = 2 << 20
QEMU_MAX_NESTING: Final = 1 << 10

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_UINT64_MAX: Final = (1 << 64) - 1


class _ParseError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.desc = errors.JSON_PARSE_ERROR % message


def _cvt4hex(token: bytes, pos: int) -> int:
    text = token[pos:pos + 4]
    if len(text) < 4 or not all(ch in b"0123456789abcdefABCDEF" for ch in text):
        return -1
    return int(text, 16)


def _mod_utf8_codepoint(token: bytes, pos: int) -> tuple[int, int]:
    """util/unicode.c mod_utf8_codepoint(): (codepoint or -1, next position)."""
    byte = token[pos]
    pos += 1
    if byte < 0x80:
        return byte, pos
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = token[pos] if pos < len(token) else 0
        if nxt & 0xC0 != 0x80:
            return -1, pos
        pos += 1
        cp = (cp << 6) | (nxt & 0x3F)
    min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
    if not _valid_codepoint(cp):
        return -1, pos
    if cp < min_cp and not (cp == 0 and length == 2):
        return -1, pos  # overlong, but \xC0\x80 (modified UTF-8 NUL) is fine
    return cp, pos


_SIMPLE_ESCAPES: Final = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
                          ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r",
                          ord("t"): "\t"}


def _parse_string(token: bytes) -> str:
    """json-parser.c parse_string(): token includes its quotes."""
    body = token[1:-1]
    if b"\\" not in body and body.isascii():
        return body.decode("ascii")
    quote = token[0]
    out: list[str] = []
    pos = 1
    while token[pos] != quote:
        ch = token[pos]
        if ch == 0x5C:  # backslash
            begin = pos
            escape = token[pos + 1]
            pos += 2
            simple = _SIMPLE_ESCAPES.get(escape)
            if simple is not None:
                out.append(simple)
                continue
            if escape != ord("u"):
                raise _ParseError("invalid escape sequence in string")
            cp = _cvt4hex(token, pos)
            pos += 4
            if 0xD800 <= cp <= 0xDBFF and token[pos:pos + 2] == b"\\u":
                cp = 0x10000 + ((cp & 0x3FF) << 10)
                trailing = _cvt4hex(token, pos + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp |= trailing & 0x3FF
                    pos += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                shown = token[begin:pos].decode("utf-8", "replace")
                raise _ParseError(f"{shown} is not a valid Unicode character")
            out.append(chr(cp))
        else:
            cp, pos = _mod_utf8_codepoint(token, pos)
            if cp < 0:
                raise _ParseError("invalid UTF-8 sequence in string")
            out.append(chr(cp))
    return "".join(out)


def _parse_literal(kind: int, text: bytes) -> Any:
    if kind == JSON_STRING:
        return _parse_string(text)
    if kind == JSON_INTEGER:
        if len(text) <= 21:  # longer cannot fit 64 bits (and int() caps digits)
            value = int(text)
            if _INT64_MIN <= value <= _UINT64_MAX:
                return value  # QNUM_I64 or QNUM_U64
        return float(text)  # beyond 64 bits: strtod(), like QEMU
    if kind == JSON_FLOAT:
        return float(text)
    # keyword
    if text == b"true":
        return True
    if text == b"false":
        return False
    if text == b"null":
        return None
    raise _ParseError(f"invalid keyword '{text.decode('ascii')}'")


_LITERALS: Final = frozenset({JSON_STRING, JSON_INTEGER, JSON_FLOAT, JSON_KEYWORD})


def _parse_tokens(tokens: list[tuple[int, bytes]]) -> Any:
    """json-parser.c parse_value() over one message's tokens, without recursion.

    QEMU keeps only the first error, so the first failure ends the parse.
    """
    pos = 0
    count = len(tokens)
    # Frames: [is_object, container, pending key or None, expecting_key]
    stack: list[list[Any]] = []

    def take() -> tuple[int, bytes]:
        nonlocal pos
        if pos >= count:
            raise _ParseError("premature EOI")
        token = tokens[pos]
        pos += 1
        return token

    while True:
        # parse_value()
        if pos >= count:
            raise _ParseError("premature EOI")
        kind, text = tokens[pos]
        value: Any
        if kind == JSON_LCURLY or kind == JSON_LSQUARE:
            pos += 1
            if pos >= count:
                raise _ParseError("premature EOI")
            closer = JSON_RCURLY if kind == JSON_LCURLY else JSON_RSQUARE
            if tokens[pos][0] != closer:
                if kind == JSON_LCURLY:
                    stack.append([True, {}, None, True])
                else:
                    stack.append([False, [], None, False])
                continue
            pos += 1
            value = {} if kind == JSON_LCURLY else []
        elif kind in _LITERALS:
            pos += 1
            value = _parse_literal(kind, text)
        else:
            raise _ParseError("expecting value")
        # Hand the value to the enclosing containers, closing those that end.
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if frame[0]:  # object
                if frame[3]:  # value was a key
                    if not isinstance(value, str):
                        raise _ParseError("key is not a string in object")
                    frame[2] = value
                    if take()[0] != JSON_COLON:
                        raise _ParseError("missing : in object pair")
                    frame[3] = False
                    break
                if frame[2] in frame[1]:
                    raise _ParseError("duplicate key")
                frame[1][frame[2]] = value
                kind = take()[0]
                if kind == JSON_RCURLY:
                    stack.pop()
                    value = frame[1]
                    continue
                if kind != JSON_COMMA:
                    raise _ParseError("expected separator in dict")
                frame[3] = True
                break
            frame[1].append(value)
            kind = take()[0]
            if kind == JSON_RSQUARE:
                stack.pop()
                value = frame[1]
                continue
            if kind != JSON_COMMA:
                raise _ParseError("expected separator in list")
            break


ParsedMessage = tuple[Any, str | None]
"""(request, None) for a parsed JSON value, (None, desc) for an error."""


class JSONMessageParser:
    """QEMU's JSON message parser, sans-IO: feed bytes, get messages.

    Same tokens, same message boundaries (a value ends when braces and
    brackets balance), same error texts and lexical resynchronisation
    (after a stray byte, skip to the next structural or control character)
    as QEMU 10.0, which reports a parse error and starts afresh with the
    next token.

    One deliberate difference, for the size and nesting limits: QEMU 10.0
    resets there too, so the rest of the oversized object comes back as a
    flood of further errors. Here, after reporting the limit, the rest of
    that input is dropped silently until its brackets balance, a newline
    outside a string, or a lexical error, then parsing resumes.

    ``max_token_size``: bytes of tokens (whitespace excluded, +1 per token)
    one message may hold; QEMU's is 64 MiB.
    """

    def __init__(self, *, max_token_size: int = QEMU_MAX_TOKEN_SIZE,
                 max_token_count: int = QEMU_MAX_TOKEN_COUNT,
                 max_nesting: int = QEMU_MAX_NESTING) -> None:
        self.max_token_size = max_token_size
        self.max_token_count = max_token_count
        self.max_nesting = max_nesting
        # lexer
        self._state = _IN_START
        self._token = bytearray()
        self._overflow = False  # current token passed max_token_size: not kept
        # streamer
        self._tokens: list[tuple[int, bytes]] = []
        self._token_size = 0
        self._brace = 0
        self._bracket = 0
        self._discarding = False
        self._out: list[ParsedMessage] = []

    def feed(self, data: bytes) -> list[ParsedMessage]:
        """Consume ``data``; return the messages (and errors) it completed."""
        out: list[ParsedMessage] = []
        self._out = out
        table = _LEXER_TABLE
        state = self._state
        token = self._token
        i = 0
        size = len(data)
        while i < size:
            if state == _IN_DQ_STRING or state == _IN_SQ_STRING:
                match = (_DQ_RUN if state == _IN_DQ_STRING else _SQ_RUN).match(data, i)
                if match:
                    if not self._overflow:
                        token += data[i:match.end()]
                        if len(token) > self.max_token_size:
                            self._token_overflow()
                    i = match.end()
                    continue
            elif state == _IN_START:
                match = _WS_RUN.match(data, i)
                if match:
                    if b"\n" in data[i:match.end()]:
                        self._newline()
                    i = match.end()
                    continue
            elif state == _IN_RECOVERY:
                match = _RECOVERY_RUN.match(data, i)
                if match:
                    i = match.end()
                    continue
            ch = data[i]
            consumed = False
            while not consumed:
                nxt = table[state][ch]
                consumed = not nxt & _LOOKAHEAD
                new = nxt & ~_LOOKAHEAD
                if consumed and not self._overflow:
                    token.append(ch)
                if new >= _JSON_MIN:
                    self._process_token(new, bytes(token))
                    token.clear()
                    self._overflow = False
                    new = _IN_START
                elif new == _IN_START:
                    token.clear()
                    self._overflow = False
                    if consumed and ch == 0x0A:
                        self._newline()
                elif new == JSON_ERROR:
                    self._process_token(JSON_ERROR, bytes(token))
                    token.clear()
                    self._overflow = False
                    new = _IN_RECOVERY
                elif new == _IN_RECOVERY:
                    token.clear()
                state = new
            i += 1
            if len(token) > self.max_token_size and not self._overflow:
                self._token_overflow()
        self._state = state
        return out

    # -- streamer (qobject/json-streamer.c json_message_process_token) --

    def _token_overflow(self) -> None:
        """A single token outgrew the limit: report once, drop the rest."""
        self._token.clear()
        self._overflow = True
        self._limit_error(errors.JSON_TOKEN_SIZE_LIMIT, always_discard=True)

    def _limit_error(self, desc: str, *, always_discard: bool = False) -> None:
        self._out.append((None, desc))
        self._tokens = []
        self._token_size = 0
        self._discarding = always_discard or self._brace > 0 or self._bracket > 0
        if not self._discarding:
            self._brace = self._bracket = 0

    def _end_discard(self) -> None:
        self._discarding = False
        self._brace = self._bracket = 0

    def _newline(self) -> None:
        if self._discarding:
            self._end_discard()

    def _process_token(self, kind: int, text: bytes) -> None:
        if kind == JSON_LCURLY:
            self._brace += 1
        elif kind == JSON_RCURLY:
            self._brace -= 1
        elif kind == JSON_LSQUARE:
            self._bracket += 1
        elif kind == JSON_RSQUARE:
            self._bracket -= 1
        if self._discarding:
            if kind == JSON_ERROR or (self._brace <= 0 and self._bracket <= 0):
                self._end_discard()
            return
        if kind == JSON_ERROR:
            self._emit(None, errors.JSON_STRAY % text.decode("utf-8", "replace"))
            return
        if self._token_size + len(text) + 1 > self.max_token_size:
            self._limit_error(errors.JSON_TOKEN_SIZE_LIMIT)
            return
        if len(self._tokens) + 1 > self.max_token_count:
            self._limit_error(errors.JSON_TOKEN_COUNT_LIMIT)
            return
        if self._brace + self._bracket > self.max_nesting:
            self._limit_error(errors.JSON_NESTING_LIMIT)
            return
        self._tokens.append((kind, text))
        self._token_size += len(text)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        try:
            value = _parse_tokens(self._tokens)
        except _ParseError as exc:
            self._emit(None, exc.desc)
        else:
            self._emit(value, None)

    def _emit(self, value: Any, error: str | None) -> None:
        self._brace = self._bracket = 0
        self._tokens = []
        self._token_size = 0
        self._out.append((value, error))


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

_QMP_CAPABILITIES_ARGS: Final = normalize_args(
    {"*enable": ArgSpec("list", items=ArgSpec("str", enum=("oob",)))})
_READ_CHUNK: Final = 64 * 1024  # bytes per read
_CLOSE_GRACE_S: Final = 1.0  # seconds a closing client gets to take its last bytes


class _Listener:
    """One ``-qmp`` socket."""

    def __init__(self, spec: ListenSpec) -> None:
        self.spec = spec
        self.server: asyncio.Server | None = None
        self.path: str | None = None
        self.inode: int | None = None
        self.port: int | None = None
        self.first_client: asyncio.Future[None] | None = None


class _Session:
    """One connected client: its parser and negotiation state."""

    def __init__(self, server: QMPServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.task: asyncio.Task[Any] | None = None
        # Each buffered token costs ~200 bytes of Python objects: bound the count
        # by the byte budget too, or 1 MiB of "1," tokens holds ~120 MiB.
        self.parser = JSONMessageParser(max_token_size=server.max_input_bytes,
                                        max_token_count=max(1024, server.max_input_bytes // 16),
                                        max_nesting=server.max_nesting)
        self.peer = writer.get_extra_info("peername") or writer.get_extra_info("sockname")

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_message(msg))


def _error_response(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


_BuiltinRun = Callable[[_Session, dict[str, Any]], Any]


def _not_via_registry(args: dict[str, Any]) -> Any:
    raise AssertionError("protocol commands run through QMPServer._builtin_run")


class QMPServer:
    """QMP monitor server on the main thread's asyncio loop.

    Usage::

        registry = CommandRegistry()
        registry.register("query-status", query_status)
        server = QMPServer(registry)
        await server.start("unix:/tmp/vm.qmp,server=on,wait=off")
        ...
        server.emit_event("STOP")            # from any thread
        ...
        await server.wait_closed()           # until close() or quit

    ``quit`` is implemented by the VM layer as
    ``registry.register("quit", lambda args: server.request_quit())``: the
    client gets ``{"return": {}}``, then the server closes and
    :meth:`wait_closed` returns, and the process can exit.

    ``max_input_bytes``: largest request (bytes of JSON tokens) accepted;
    ``max_nesting``: deepest request (brackets plus braces). Beyond either
    the client gets QEMU's limit error and the input is dropped.
    ``preconfig``: while True, commands not registered with
    ``allow_preconfig=True`` are refused like QEMU before machine creation.
    """

    def __init__(self, registry: CommandRegistry, *, version: tuple[int, int, int] = (10, 0, 2),
                 package: str = "livemig 0.1.0", max_input_bytes: int = 1 << 20,
                 max_nesting: int = QEMU_MAX_NESTING) -> None:
        self.registry = registry
        self.version = version
        self.package = package
        self.max_input_bytes = max_input_bytes
        self.max_nesting = max_nesting
        self.preconfig = False
        self._listeners: list[_Listener] = []
        self._sessions: set[_Session] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._inflight = 0  # commands being executed or answered, all clients
        self._quit_requested = False
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        # Protocol commands: schema here, session-aware callables beside.
        self._builtins: dict[str, Command] = {
            name: Command(name, _not_via_registry, args, allow_preconfig=True)
            for name, args in (("qmp_capabilities", _QMP_CAPABILITIES_ARGS),
                               ("query-version", {}), ("query-commands", {}))}
        self._builtin_run: dict[str, _BuiltinRun] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-version": self._query_version,
            "query-commands": self._query_commands,
        }

    # -- inspection --

    @property
    def socket_paths(self) -> list[str]:
        """UNIX socket files being listened on."""
        return [lst.path for lst in self._listeners if lst.path is not None]

    @property
    def ports(self) -> list[int]:
        """TCP ports being listened on (the real one when the spec said 0)."""
        return [lst.port for lst in self._listeners if lst.port is not None]

    @property
    def clients(self) -> int:
        """Number of connected clients."""
        return len(self._sessions)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- listening (QMP loop) --

    async def start(self, spec: str) -> None:
        """Listen on one ``-qmp`` chardev spec; call once per ``-qmp``.

        Raises ValueError for a spec livemig does not support, OSError when
        the socket cannot be bound. With ``wait=on`` (QEMU's default for
        ``server=on``) returns only once a first client is connected.
        """
        listen = parse_qmp_spec(spec)
        if self._closing:
            raise RuntimeError("QMP server is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._loop_thread = threading.get_ident()
        elif self._loop is not loop:
            raise RuntimeError("QMP server already runs on another event loop")
        listener = _Listener(listen)
        if listen.wait:
            # Exists before the first accept() can run.
            listener.first_client = loop.create_future()
        callback = functools.partial(self._on_client, listener)
        if listen.kind == "unix":
            assert listen.path is not None
            sock = self._bind_unix(listen.path)
            listener.path = listen.path
            listener.inode = os.stat(listen.path).st_ino
            try:
                listener.server = await asyncio.start_unix_server(callback, sock=sock)
            except BaseException:
                sock.close()
                self._unlink(listener)
                raise
        else:
            sock = self._bind_tcp(listen)
            listener.port = sock.getsockname()[1]
            try:
                listener.server = await asyncio.start_server(callback, sock=sock)
            except BaseException:
                sock.close()
                raise
        self._listeners.append(listener)
        log.info("QMP listening on %s", self._describe(listener))
        if listener.first_client is not None:
            log.info("QMP waiting for connection on %s", self._describe(listener))
            await listener.first_client

    @staticmethod
    def _describe(listener: _Listener) -> str:
        if listener.path is not None:
            return f"unix:{listener.path}"
        return f"tcp:{listener.spec.host}:{listener.port}"

    @staticmethod
    def _bind_unix(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ValueError(f"-qmp unix:{path}: file exists and is not a socket")
            os.unlink(path)  # stale socket from an earlier run, as QEMU does
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Before listen(): until then a connect() is refused, so nobody
            # but the owner ever gets in.
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return sock

    @staticmethod
    def _bind_tcp(listen: ListenSpec) -> socket.socket:
        infos = socket.getaddrinfo(listen.host or None, listen.port, listen.family,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        last: OSError | None = None
        for family, kind, proto, _, address in infos:  # first that binds, like QEMU
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(16)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return sock
        raise OSError(last.errno if last else None,
                      f"-qmp {listen.spec}: Failed to bind socket: "
                      f"{last.strerror if last else 'no address'}")

    # -- clients (QMP loop) --

    async def _on_client(self, listener: _Listener, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        session = _Session(self, reader, writer)
        session.task = asyncio.current_task()
        if listener.spec.nodelay:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sessions.add(session)
        log.debug("QMP client connected: %s", session.peer)
        try:
            session.send(self._greeting())
            if listener.first_client is not None and not listener.first_client.done():
                listener.first_client.set_result(None)
            await writer.drain()
            await self._serve(session)
        except (ConnectionError, OSError) as exc:
            log.debug("QMP client %s: %s", session.peer, exc)
        except asyncio.CancelledError:
            # Only close() cancels this task, which it owns. Ending quietly
            # also spares CPython 3.11's start_server() callback, which calls
            # task.exception() on a cancelled task and logs the error.
            pass
        finally:
            self._sessions.discard(session)
            writer.close()
            log.debug("QMP client gone: %s", session.peer)

    def _greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self._version_info(), "capabilities": []}}

    def _version_info(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": self.package}

    async def _serve(self, session: _Session) -> None:
        """Read, parse and answer requests of one client, in order."""
        while True:
            data = await session.reader.read(_READ_CHUNK)
            if not data:
                return
            for request, parse_error in session.parser.feed(data):
                self._inflight += 1
                try:
                    if parse_error is not None:
                        response = _error_response(errors.GENERIC_ERROR, parse_error)
                    else:
                        response = await self._dispatch(session, request)
                    self._send_response(session, response, request)
                    await session.writer.drain()
                finally:
                    self._inflight -= 1
                if self._quit_requested:
                    self._begin_close()
                    return

    def _send_response(self, session: _Session, response: dict[str, Any],
                       request: Any) -> None:
        try:
            data = encode_message(response)
        except (TypeError, ValueError) as exc:
            log.error("QMP response to %r cannot be encoded: %s", request, exc)
            fallback = _error_response(errors.GENERIC_ERROR, f"internal error: {exc}")
            if "id" in response:
                fallback["id"] = response["id"]
            data = encode_message(fallback)
        if not session.writer.is_closing():
            session.writer.write(data)

    async def _dispatch(self, session: _Session, request: Any) -> dict[str, Any]:
        """qmp_dispatch() plus monitor_qmp_dispatch()'s negotiation hint."""
        response = await self._dispatch_request(session, request)
        if not session.negotiated:
            error = response.get("error")
            if error is not None and error["class"] == errors.COMMAND_NOT_FOUND:
                error["desc"] = errors.EXPECTING_NEGOTIATION
        return response

    async def _dispatch_request(self, session: _Session, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return _error_response(errors.GENERIC_ERROR, errors.INPUT_NOT_OBJECT)
        response = await self._execute(session, request)
        if "id" in request:
            response["id"] = request["id"]
        return response

    async def _execute(self, session: _Session, request: dict[str, Any]) -> dict[str, Any]:
        # qmp_dispatch_check_obj() looks at members in QDict order.
        for key in qdict_order(request):
            value = request[key]
            if key == "execute":
                if not isinstance(value, str):
                    return _error_response(errors.GENERIC_ERROR,
                                           errors.INPUT_MEMBER_NOT_STRING % key)
            elif key == "arguments":
                if not isinstance(value, dict):
                    return _error_response(errors.GENERIC_ERROR,
                                           errors.INPUT_ARGUMENTS_NOT_OBJECT)
            elif key != "id":
                return _error_response(errors.GENERIC_ERROR,
                                       errors.INPUT_MEMBER_UNEXPECTED % key)
        if "execute" not in request:
            return _error_response(errors.GENERIC_ERROR, errors.INPUT_LACKS_EXECUTE)
        name = request["execute"]
        command = self._find_command(session, name)
        if command is None:
            return _error_response(errors.COMMAND_NOT_FOUND, errors.COMMAND_NOT_FOUND_TEXT % name)
        if self.preconfig and not command.allow_preconfig:
            return _error_response(errors.GENERIC_ERROR, errors.COMMAND_NEEDS_MACHINE % name)
        try:
            arguments = command.validate(request.get("arguments", {}))
            builtin = self._builtin_run.get(name) if command is self._builtins.get(name) else None
            if builtin is not None:
                result = builtin(session, arguments)
            elif command.blocking:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(None, command.handler, arguments)
            else:
                result = command.handler(arguments)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fields = error_fields(exc)
            if fields is None:
                log.exception("QMP command %s failed", name)
                return _error_response(errors.GENERIC_ERROR, str(exc) or type(exc).__name__)
            log.debug("QMP command %s: %s: %s", name, *fields)
            return _error_response(*fields)
        return {"return": {} if result is None else result}

    def _find_command(self, session: _Session, name: str) -> Command | None:
        if not session.negotiated:
            # QEMU's qmp_cap_negotiation_commands holds only this one.
            return self._builtins["qmp_capabilities"] if name == "qmp_capabilities" else None
        return self._builtins.get(name) or self.registry.get(name)

    # -- protocol commands --

    def _qmp_capabilities(self, session: _Session, args: dict[str, Any]) -> dict[str, Any]:
        if session.negotiated:
            raise QMPError(errors.NEGOTIATION_COMPLETE, error_class=errors.COMMAND_NOT_FOUND)
        unavailable = list(args.get("enable", []))  # we offer no capability
        if unavailable:
            raise QMPError(errors.CAPABILITY_NOT_AVAILABLE % ", ".join(unavailable))
        session.negotiated = True
        return {}

    def _query_version(self, session: _Session, args: dict[str, Any]) -> dict[str, Any]:
        return self._version_info()

    def _query_commands(self, session: _Session, args: dict[str, Any]) -> list[dict[str, str]]:
        names = list(self._builtins) + self.registry.names()
        return [{"name": name} for name in names]

    # -- events (any thread) --

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` to every client past negotiation. Any thread.

        The timestamp is taken now (wall clock, like QEMU's
        ``g_get_real_time``) and ``data`` is serialised now, so the caller
        may reuse it. From the loop thread the event is written at once (so
        an event a handler emits precedes its response, as in QEMU); from
        other threads it is queued to the loop in call order. Events emitted
        before :meth:`start` or after :meth:`close` are dropped.
        """
        now_us = time.time_ns() // 1000
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000}
        line = encode_message(msg)
        loop = self._loop
        if loop is None or self._closing:
            return
        if threading.get_ident() == self._loop_thread:
            self._broadcast(line)
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._broadcast, line)

    def _broadcast(self, line: bytes) -> None:
        if self._closing:
            return
        for session in list(self._sessions):
            if session.negotiated and not session.writer.is_closing():
                session.writer.write(line)

    # -- shutting down --

    def request_quit(self) -> None:
        """Close the server once the response to the running command is sent.

        For ``quit``: the handler calls this and returns; the client
        receives ``{"return": {}}`` (flushed to the socket), then listeners
        and clients are closed, socket files removed, and
        :meth:`wait_closed` returns. Called when no command is running
        (say, from a signal handler or the engine), it closes at once. Any
        thread. Commands of other clients still running are not cut short:
        the close follows the first response flushed after this call. To
        stop regardless (a signal, a fatal error), ``await close()`` instead.
        """
        self._quit_requested = True
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._quit_if_idle()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._quit_if_idle)

    @property
    def quit_requested(self) -> bool:
        return self._quit_requested

    def _quit_if_idle(self) -> None:
        if self._inflight == 0:
            self._begin_close()

    def _begin_close(self) -> None:
        if self._close_task is None and not self._closing and self._loop is not None:
            self._close_task = self._loop.create_task(self.close())

    async def close(self) -> None:
        """Close listeners and clients; remove the UNIX socket files we made."""
        if self._closing:
            if self._close_task is not None and self._close_task is not asyncio.current_task():
                await asyncio.shield(self._close_task)
            else:
                await self._closed.wait()
            return
        self._closing = True
        try:
            for listener in self._listeners:
                if listener.server is not None:
                    listener.server.close()
                if listener.first_client is not None and not listener.first_client.done():
                    listener.first_client.set_exception(
                        RuntimeError("QMP server closed while waiting for a client"))
            current = asyncio.current_task()
            sessions = list(self._sessions)
            for session in sessions:
                session.writer.close()
            tasks = [s.task for s in sessions if s.task is not None and s.task is not current]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for session in sessions:
                try:
                    await asyncio.wait_for(session.writer.wait_closed(), _CLOSE_GRACE_S)
                except (TimeoutError, ConnectionError, OSError):
                    session.writer.transport.abort()
            for listener in self._listeners:
                if listener.server is not None:
                    await listener.server.wait_closed()
                self._unlink(listener)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Return once the server is closed (by :meth:`close` or a quit)."""
        await self._closed.wait()

    @staticmethod
    def _unlink(listener: _Listener) -> None:
        """Remove our socket file, unless someone else's has replaced it."""
        if listener.path is None:
            return
        try:
            st = os.lstat(listener.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == listener.inode:
                os.unlink(listener.path)
        except FileNotFoundError:
            pass
