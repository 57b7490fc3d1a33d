"""QMP's JSON, sans-IO: a port of QEMU 10.0's JSON lexer, streamer, parser and writer.

Bytes in, ``(value, error)`` pairs out (:class:`JSONMessageParser`); values
in, bytes out (:func:`qmp_dumps`, :func:`encode_message`). No sockets, no
asyncio, nothing but the standard library: the server (``qmp/server.py``)
is a thin shell that reads a socket and feeds this module, and the tests
feed it torn, concatenated and hostile chunks directly.

What is QEMU's here, and why it lives in this module:

* message boundaries and error texts of ``qobject/json-lexer.c``,
  ``json-streamer.c`` and ``json-parser.c`` (``JSON parse error, ...``,
  ``JSON token size limit exceeded``, ...). The texts themselves come from
  ``livemig.qapi.errors``, the one table of QEMU's texts (pure data, a
  layer below ``livemig.qmp``), so the module needs nothing of the QMP
  layer and no text is written twice.
* the output format of ``qobject/json-writer.c`` (spacing, ``\\uXXXX`` in
  upper case, ``%.17g`` floats) and QDict's key order
  (:func:`qdict_order`). It stays: it is what makes our bytes equal QEMU's
  (``{"return": ..., "id": ...}``, ``{"timestamp": ..., "event": ...,
  "data": ...}``), and it is cheap. One cached hash per distinct key and a
  sort per object: a ``query-migrate`` reply (20 keys) encodes in 23 us
  against 18 us in plain insertion order, next to 65 us for a whole
  ``query-version`` round trip over a UNIX socket on the same loop
  (2026-12, the 2-core dev machine).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final

from livemig.qapi.errors import (
    JSON_NESTING_LIMIT,
    JSON_PARSE_ERROR,
    JSON_STRAY,
    JSON_TOKEN_COUNT_LIMIT,
    JSON_TOKEN_SIZE_LIMIT,
)

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
        self.desc = JSON_PARSE_ERROR % message


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

    def pending(self) -> bool:
        """Whether fed bytes begin a value not yet complete (for ``qobject_from_json``'s
        "Expecting at most one JSON value" after a first value)."""
        return bool(self._tokens or self._token)

    def _token_overflow(self) -> None:
        """A single token outgrew the limit: report once, drop the rest."""
        self._token.clear()
        self._overflow = True
        self._limit_error(JSON_TOKEN_SIZE_LIMIT, always_discard=True)

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
            self._emit(None, JSON_STRAY % text.decode("utf-8", "replace"))
            return
        if self._token_size + len(text) + 1 > self.max_token_size:
            self._limit_error(JSON_TOKEN_SIZE_LIMIT)
            return
        if len(self._tokens) + 1 > self.max_token_count:
            self._limit_error(JSON_TOKEN_COUNT_LIMIT)
            return
        if self._brace + self._bracket > self.max_nesting:
            self._limit_error(JSON_NESTING_LIMIT)
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
