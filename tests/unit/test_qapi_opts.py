"""The one QemuOpts parser (livemig.qapi.opts): QEMU's ',,' escapes, implied key, flags."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.qapi.errors import QapiError
from livemig.qapi.opts import Opts, format_opt_value, get_opt_value, parse_option_number, parse_opts


@pytest.mark.parametrize(("text", "implied", "pairs"), [
    ("", None, []),
    ("a=1,b=2", None, [("a", "1"), ("b", "2")]),
    ("accel,id=acc0", "driver", [("driver", "accel"), ("id", "acc0")]),
    ("id=acc0", "driver", [("id", "acc0")]),             # implied only without '='
    ("file=/x,,y,format=raw", None, [("file", "/x,y"), ("format", "raw")]),
    ("a,,b=c", "x", [("x", "a,b=c")]),                     # the implied value escapes too
    ("a,,b=c", None, [("a", "on"), ("", "on"), ("b", "c")]),  # no escaping in names
    ("x=a,,,,b,y=", None, [("x", "a,,b"), ("y", "")]),
    ("k=", None, [("k", "")]),
    (",a=1", "k", [("k", ""), ("a", "1")]),
    ("a=1,", None, [("a", "1")]),
    ("server,nowait", None, [("server", "on"), ("wait", "off")]),
    ("nodelay", None, [("delay", "off")]),                # QEMU's reading, hence its hint
    ("walk,start=1M,end=100M", "program", [("program", "walk"), ("start", "1M"),
                                           ("end", "100M")]),
    ("a=b=c", None, [("a", "b=c")]),
])
def test_parse_opts(text: str, implied: str | None, pairs: list) -> None:
    assert parse_opts(text, implied) == pairs


def test_get_opt_value_stops_at_a_single_comma() -> None:
    assert get_opt_value("a,,b,c") == ("a,b", 4)
    assert get_opt_value("abc") == ("abc", 3)


names = st.text(st.characters(blacklist_characters=",=", codec="ascii"), min_size=1, max_size=8)
values = st.text(st.characters(codec="ascii"), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(names.filter(lambda n: not n.startswith("no")), values),
                max_size=6))
def test_escaped_values_round_trip(pairs: list[tuple[str, str]]) -> None:
    text = ",".join(f"{k}={format_opt_value(v)}" for k, v in pairs)
    assert parse_opts(text) == pairs


@settings(max_examples=200, deadline=None)
@given(values, st.lists(st.tuples(names, values), max_size=4))
def test_implied_first_value_round_trips(first: str, rest: list[tuple[str, str]]) -> None:
    text = ",".join([format_opt_value(first), *(f"{k}={format_opt_value(v)}" for k, v in rest)])
    parsed = parse_opts(text, "driver")
    if "=" in first.split(",")[0] or (not first and not rest):
        return  # an '=' in the first item names it; "" parses to nothing
    assert parsed == [("driver", first), *rest]


def test_opts_lookups_last_wins_and_typed() -> None:
    opts = Opts.parse("accel,size=1M,size=2M,on=yes,n=0x10")
    assert opts.get("size") == "2M" and opts.get_size("size", 0) == 2 << 20
    assert opts.get_bool("on", False) is True and opts.get_bool("absent", True) is True
    assert opts.get_number("n", 0) == 16 and "accel" in opts


@pytest.mark.parametrize(("call", "text"), [
    (lambda: Opts.parse("a=1,bogus=2").check(["a"]), "Invalid parameter 'bogus'"),
    (lambda: Opts.parse("w=maybe").get_bool("w", True), "Parameter 'w' expects 'on' or 'off'"),
    (lambda: Opts.parse("s=lots").get_size("s", 0),
     "Parameter 's' expects a non-negative number below 2^64"),
    (lambda: Opts.parse("s=16E").get_size("s", 0), "Value '16E' is out of range for parameter 's'"),
    (lambda: parse_option_number("n", "x"), "Parameter 'n' expects a number"),
    (lambda: parse_option_number("n", str(1 << 64)),
     f"Value '{1 << 64}' is too large for parameter 'n'"),
])
def test_qemu_texts(call, text: str) -> None:
    with pytest.raises(QapiError) as exc:
        call()
    assert exc.value.desc == text
