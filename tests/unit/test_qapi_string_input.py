"""The one size parser (qemu_strtosz) and the one bool parser (qapi_bool_parse)."""

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.machine.guest import parse_size as guest_size
from livemig.qapi.errors import QapiError
from livemig.qapi.string_input import parse_option_size, qapi_bool_parse, qemu_strtosz

U64 = 1 << 64


# Each checked against qemu-system-x86_64 10.0.2 (-global migration.x-max-bandwidth=...).
@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096B", 4096), ("4k", 4096), ("1M", 1 << 20), ("1.5K", 1536),
    (".5M", 1 << 19), ("0x10", 16), ("  7", 7), ("1.", 1), ("1.k", 1024),
    ("1e", 1 << 60), ("1.5e", 3 << 59), ("+5", 5), ("08", 8), ("15E", 15 << 60),
])
def test_strtosz_accepts(text: str, value: int) -> None:
    assert qemu_strtosz(text) == value


@pytest.mark.parametrize(("text", "code"), [
    ("", errno.EINVAL), ("k", errno.EINVAL), ("1Q", errno.EINVAL), ("0x1K", errno.EINVAL),
    ("1.5", errno.EINVAL), ("0x1.8k", errno.EINVAL), ("0x", errno.EINVAL), (".", errno.EINVAL),
    ("-1", errno.ERANGE), ("16E", errno.ERANGE), (str(U64), errno.ERANGE),
])
def test_strtosz_refuses(text: str, code: int) -> None:
    with pytest.raises(QapiError) as exc:
        qemu_strtosz(text)
    assert exc.value.errno == code


def test_default_suffix_and_option_texts() -> None:
    assert qemu_strtosz("256", "M") == 256 << 20 and qemu_strtosz("2G", "M") == 2 << 30
    assert guest_size("64M") == 64 << 20 and guest_size("256", default_unit="m") == 256 << 20
    with pytest.raises(ValueError):
        guest_size("lots")
    with pytest.raises(QapiError, match=r"^Value '-1' is out of range for parameter 'x'$"):
        parse_option_size("x", "-1")
    with pytest.raises(QapiError,
                       match=r"^Parameter 'x' expects a non-negative number below 2\^64$"):
        parse_option_size("x", "1.5")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 13) - 1), st.integers(0, 999), st.sampled_from("KMGTP"))
def test_fractions_are_exact_like_qemu(whole: int, frac: int, unit: str) -> None:
    mul = 1 << (10 * "BKMGTPE".index(unit))
    text = f"{whole}.{frac:03d}{unit}"
    assert qemu_strtosz(text) == whole * mul + int(float(f"0.{frac:03d}") * U64) * mul // U64


@pytest.mark.parametrize(("word", "state"), [
    ("on", True), ("yes", True), ("true", True), ("y", True),
    ("off", False), ("no", False), ("false", False), ("n", False),
])
def test_bool_words(word: str, state: bool) -> None:
    assert qapi_bool_parse("b", word) is state


@pytest.mark.parametrize("word", ["ON", "True", "1", "0", "", "maybe"])
def test_bool_refusals(word: str) -> None:
    with pytest.raises(QapiError) as exc:
        qapi_bool_parse("b", word)
    assert exc.value.desc == "Parameter 'b' expects 'on' or 'off'"
