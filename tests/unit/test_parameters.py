"""livemig.qapi.parameters: defaults, QAPI input errors, migrate_params_check texts, -global."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from livemig.qapi import DEFAULTS, Capabilities, Parameters, QapiError, apply_globals
from livemig.qapi.parameters import (
    ENUMS,
    LIVEMIG_PARAMETERS,
    QEMU_DEFAULTS,
    SCHEMA,
    parse_global_parameter,
)
from livemig.qapi.string_input import parse_size, parse_uint64

pytestmark = pytest.mark.timeout(60)

U64 = 1 << 64

# query-migrate-parameters on 10.0.2 (reference 5.3), in MigrationParameters order.
EXPECTED_DEFAULTS = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False,
    "tls-creds": "", "tls-hostname": "", "tls-authz": "",
    "max-bandwidth": 134217728, "avail-switchover-bandwidth": 0, "downtime-limit": 300,
    "x-checkpoint-delay": 20000, "multifd-channels": 2, "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0, "max-cpu-throttle": 99, "multifd-compression": "none",
    "multifd-zlib-level": 1, "multifd-qatzip-level": 1, "multifd-zstd-level": 1,
    "x-vcpu-dirty-limit-period": 1000, "vcpu-dirty-limit": 1, "mode": "normal",
    "zero-page-detection": "multifd", "direct-io": False,
}


def set_one(name: str, value: Any, params: Parameters | None = None) -> Parameters:
    params = params or Parameters()
    params.set_from_qmp({name: value})
    return params


def error_of(args: dict[str, Any], params: Parameters | None = None, **kw: Any) -> str:
    params = params or Parameters()
    before = params.as_qmp()
    with pytest.raises(QapiError) as exc:
        params.set_from_qmp(args, **kw)
    assert exc.value.error_class == "GenericError"
    assert params.as_qmp() == before  # atomic: nothing applied
    return exc.value.desc


# --- defaults and order -----------------------------------------------------------------

def test_defaults_equal_qemu_dump_in_member_order() -> None:
    """QEMU's members first, in QEMU's order and with its defaults; livemig's
    own (``x-stall-timeout``) after them."""
    assert QEMU_DEFAULTS == EXPECTED_DEFAULTS
    assert list(QEMU_DEFAULTS) == list(EXPECTED_DEFAULTS)
    dump = Parameters().as_qmp()
    assert list(dump) == [*EXPECTED_DEFAULTS, *LIVEMIG_PARAMETERS]
    assert {k: dump[k] for k in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS
    assert dump["x-stall-timeout"] == 0


def test_schema_order_is_migration_parameters_order() -> None:
    assert [n for n in SCHEMA if n != "block-bitmap-mapping"] == list(DEFAULTS)
    order = list(SCHEMA)
    assert order.index("block-bitmap-mapping") == order.index("multifd-zstd-level") + 1


def test_block_bitmap_mapping_absent_until_set() -> None:
    params = Parameters()
    assert "block-bitmap-mapping" not in params.as_qmp()
    params.set_from_qmp({"block-bitmap-mapping": []})
    dump = params.as_qmp()
    assert dump["block-bitmap-mapping"] == []
    assert list(dump) == list(SCHEMA)


def test_typed_accessors_and_units() -> None:
    params = Parameters()
    assert params.downtime_limit_ms == 300
    assert params.max_bandwidth_bytes_per_s == 128 << 20
    assert params.avail_switchover_bandwidth_bytes_per_s == 0
    assert params.multifd_channels == 2
    params.set_from_qmp({"downtime-limit": 10, "max-bandwidth": 1 << 30,
                         "avail-switchover-bandwidth": 5 << 20, "multifd-channels": 8})
    assert (params.downtime_limit_ms, params.max_bandwidth_bytes_per_s,
            params.avail_switchover_bandwidth_bytes_per_s, params.multifd_channels) == (
        10, 1 << 30, 5 << 20, 8)


# --- QAPI-level input errors ------------------------------------------------------------

@pytest.mark.parametrize(("name", "value", "text"), [
    ("multifd-channels", 256, "Parameter 'multifd-channels' expects uint8_t"),
    ("cpu-throttle-initial", 256, "Parameter 'cpu-throttle-initial' expects uint8_t"),
    ("multifd-channels", -1, "Parameter 'multifd-channels' expects uint8_t"),
    ("multifd-channels", "2", "Parameter 'multifd-channels' expects uint64"),
    ("x-checkpoint-delay", 1 << 32, "Parameter 'x-checkpoint-delay' expects uint32_t"),
    ("max-bandwidth", 1.5, "Parameter 'max-bandwidth' expects uint64"),
    ("max-bandwidth", "1", "Parameter 'max-bandwidth' expects uint64"),
    ("max-bandwidth", True, "Parameter 'max-bandwidth' expects uint64"),
    ("max-bandwidth", None, "Parameter 'max-bandwidth' expects uint64"),
    ("max-bandwidth", U64, "Parameter 'max-bandwidth' expects uint64"),
    ("downtime-limit", -(1 << 63) - 1, "Parameter 'downtime-limit' expects uint64"),
    ("cpu-throttle-tailslow", 1,
     "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
    ("direct-io", "yes", "Invalid parameter type for 'direct-io', expected: boolean"),
    ("tls-creds", 5, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ("tls-authz", False, "Invalid parameter type for 'tls-authz', expected: StrOrNull"),
    ("mode", 1, "Invalid parameter type for 'mode', expected: string"),
    ("zero-page-detection", "x", "Parameter 'zero-page-detection' does not accept value 'x'"),
    ("multifd-compression", "qatzip",
     "Parameter 'multifd-compression' does not accept value 'qatzip'"),
    ("mode", "cpr-exec", "Parameter 'mode' does not accept value 'cpr-exec'"),
    ("block-bitmap-mapping", {},
     "Invalid parameter type for 'block-bitmap-mapping', expected: array"),
    ("block-bitmap-mapping", [{"node-name": "n", "alias": "a", "bitmaps": []}],
     "Parameter 'block-bitmap-mapping' is not supported by livemig"),
    ("bogus", 1, "Parameter 'bogus' is unexpected"),
])
def test_input_errors(name: str, value: Any, text: str) -> None:
    assert error_of({name: value}) == text


def test_members_are_visited_in_schema_order_before_unknown_keys() -> None:
    assert error_of({"bogus": 1, "multifd-channels": 256}) == (
        "Parameter 'multifd-channels' expects uint8_t")
    assert error_of({"downtime-limit": "x", "announce-initial": "y"}) == (
        "Parameter 'announce-initial' expects uint64")


@pytest.mark.parametrize(("name", "value", "stored"), [
    ("max-bandwidth", -1, 18446744073709551615),
    ("avail-switchover-bandwidth", -5, 18446744073709551611),
    ("max-postcopy-bandwidth", U64 - 1, U64 - 1),
    ("x-checkpoint-delay", (1 << 32) - 1, (1 << 32) - 1),
    ("tls-creds", None, ""),
    ("tls-hostname", None, ""),
    ("tls-authz", None, ""),
    ("tls-creds", "tls0", "tls0"),
    ("multifd-compression", "zstd", "zstd"),
    ("mode", "cpr-transfer", "cpr-transfer"),
    ("direct-io", True, True),
])
def test_accepted_values_as_qemu_stores_them(name: str, value: Any, stored: Any) -> None:
    assert set_one(name, value).as_qmp()[name] == stored


def test_negative_downtime_wraps_then_fails_range() -> None:
    assert error_of({"downtime-limit": -1}) == (
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms")


# --- migrate_params_check ---------------------------------------------------------------

RANGE = "expects an integer in the range of"
RULES = [
    ("throttle-trigger-threshold", [0, 101], [1, 100],
     f"Parameter 'throttle_trigger_threshold' {RANGE} 1 to 100"),
    ("cpu-throttle-initial", [0, 100], [1, 99],
     f"Parameter 'cpu_throttle_initial' {RANGE} 1 to 99"),
    ("cpu-throttle-increment", [0, 100], [1, 99],
     f"Parameter 'cpu_throttle_increment' {RANGE} 1 to 99"),
    ("downtime-limit", [2000001, U64 - 1], [0, 2000000],
     f"Parameter 'downtime_limit' {RANGE} 0 to (2000 * 1000) ms"),
    ("multifd-channels", [0], [1, 255],
     "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ("multifd-zlib-level", [10, 255], [0, 9],
     "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    ("multifd-qatzip-level", [0, 10], [1, 9],
     "Parameter 'multifd_qatzip_level' expects a value between 1 and 9"),
    ("multifd-zstd-level", [21], [0, 20],
     "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    ("xbzrle-cache-size", [0, 2048, 4095, 3 * 4096, (64 << 20) + 4096], [4096, 1 << 63],
     "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ("max-cpu-throttle", [100, 19], [20, 99],
     f"Parameter 'max_cpu_throttle' {RANGE} cpu_throttle_initial to 99"),
    ("announce-initial", [100001], [0, 100000],
     "Parameter 'announce_initial' expects a value between 0 and 100000"),
    ("announce-max", [100001], [0, 100000],
     "Parameter 'announce_max' expects a value between 0 and 100000"),
    ("announce-rounds", [1001], [0, 1000],
     "Parameter 'announce_rounds' expects a value between 0 and 1000"),
    ("announce-step", [0, 10001], [1, 10000],
     "Parameter 'announce_step' expects a value between 0 and 10000"),
    ("x-vcpu-dirty-limit-period", [0, 1001], [1, 1000],
     "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
    ("vcpu-dirty-limit", [0], [1, U64 - 1],
     "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
]


@pytest.mark.parametrize(("name", "value", "text"),
                         [(n, v, t) for n, bad, _, t in RULES for v in bad])
def test_range_rule_refuses(name: str, value: int, text: str) -> None:
    assert error_of({name: value}) == text


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, _, good, _ in RULES for v in good])
def test_range_rule_accepts_bounds(name: str, value: int) -> None:
    assert set_one(name, value).as_qmp()[name] == value


def test_whole_set_is_checked_not_just_given_members() -> None:
    params = set_one("max-cpu-throttle", 30)
    assert error_of({"cpu-throttle-initial": 40}, params) == (
        f"Parameter 'max_cpu_throttle' {RANGE} cpu_throttle_initial to 99")
    params.set_from_qmp({"cpu-throttle-initial": 50, "max-cpu-throttle": 60})
    assert params.as_qmp()["max-cpu-throttle"] == 60


@pytest.mark.parametrize(("args", "text"), [
    ({"vcpu-dirty-limit": 0, "throttle-trigger-threshold": 0}, "throttle_trigger_threshold"),
    ({"multifd-channels": 0, "downtime-limit": 2000001}, "downtime_limit"),
    ({"announce-step": 0, "xbzrle-cache-size": 1}, "xbzrle_cache_size"),
    ({"x-vcpu-dirty-limit-period": 0, "announce-rounds": 1001}, "announce_rounds"),
])
def test_first_broken_rule_in_qemu_order_is_reported(args: dict, text: str) -> None:
    assert f"'{text}'" in error_of(args)


def test_error_leaves_every_member_unchanged() -> None:
    params = Parameters()
    assert error_of({"downtime-limit": 500, "tls-creds": "x", "multifd-channels": 0}, params)
    assert params.downtime_limit_ms == 300 and params.as_qmp() == DEFAULTS


def test_zero_copy_cross_check_uses_new_values() -> None:
    caps = {"zero-copy-send": True}
    text = "Zero copy only available for non-compressed non-TLS multifd migration"
    assert error_of({"multifd-compression": "zlib"}, caps=caps) == text
    assert error_of({"tls-creds": "tls0"}, caps=caps) == text
    Parameters().set_from_qmp({"tls-creds": None, "downtime-limit": 1}, caps=caps)


def test_mapped_ram_cross_check_uses_current_values_like_qemu() -> None:
    caps = {"mapped-ram": True}
    params = Parameters()
    params.set_from_qmp({"multifd-compression": "zlib"}, caps=caps)  # QEMU checks the old set
    assert error_of({"downtime-limit": 1}, params, caps=caps) == (
        "Mapped-ram only available for non-compressed non-TLS multifd migration")


# --- -global migration.<param> ----------------------------------------------------------

@pytest.mark.parametrize(("prop", "value", "expected"), [
    ("x-downtime-limit", "500", ("downtime-limit", 500)),
    ("downtime-limit", "500", ("downtime-limit", 500)),
    ("x-max-bandwidth", "64M", ("max-bandwidth", 64 << 20)),
    ("max-bandwidth", "1.5G", ("max-bandwidth", 3 << 29)),
    ("avail-switchover-bandwidth", "1k", ("avail-switchover-bandwidth", 1024)),
    ("xbzrle-cache-size", "0x1000", ("xbzrle-cache-size", 4096)),
    ("xbzrle-cache-size", "4096B", ("xbzrle-cache-size", 4096)),
    ("announce-initial", "100", ("announce-initial", 100)),
    ("multifd-channels", "16", ("multifd-channels", 16)),
    ("multifd-channels", "0x10", ("multifd-channels", 16)),
    ("multifd-channels", "010", ("multifd-channels", 8)),
    ("x-checkpoint-delay", "4294967295", ("x-checkpoint-delay", (1 << 32) - 1)),
    ("x-cpu-throttle-tailslow", "on", ("cpu-throttle-tailslow", True)),
    # qapi_bool_parse: exact words, "y"/"n" included (QEMU 10.0.2 refuses "No").
    ("cpu-throttle-tailslow", "no", ("cpu-throttle-tailslow", False)),
    ("cpu-throttle-tailslow", "n", ("cpu-throttle-tailslow", False)),
    ("x-max-bandwidth", "1.", ("max-bandwidth", 1)),
    ("x-throttle-trigger-threshold", "60", ("throttle-trigger-threshold", 60)),
    ("mode", "cpr-reboot", ("mode", "cpr-reboot")),
    ("zero-page-detection", "legacy", ("zero-page-detection", "legacy")),
    ("tls-creds", "tls0", ("tls-creds", "tls0")),
    ("x-vcpu-dirty-limit-period", "500", ("x-vcpu-dirty-limit-period", 500)),
])
def test_global_parameter_parses(prop: str, value: str, expected: tuple) -> None:
    assert parse_global_parameter(prop, value) == expected


NOT_A_SIZE = "Parameter 'x-max-bandwidth' expects a non-negative number below 2^64"


@pytest.mark.parametrize(("prop", "value", "reason"), [
    ("bogus", "1", "Property 'migration.bogus' not found"),
    ("direct-io", "on", "Property 'migration.direct-io' not found"),
    ("x-downtime-limit", "abc", "Parameter 'x-downtime-limit' expects uint64"),
    ("x-downtime-limit", "1.5", "Parameter 'x-downtime-limit' expects uint64"),
    ("multifd-channels", "256", "Parameter 'multifd-channels' expects uint8_t"),
    ("x-checkpoint-delay", "4294967296", "Parameter 'x-checkpoint-delay' expects uint32_t"),
    # As qemu-system-x86_64 10.0.2 reports them (qemu_strtosz: negative is ERANGE).
    ("x-max-bandwidth", "-1", "Value '-1' is out of range for parameter 'x-max-bandwidth'"),
    ("x-max-bandwidth", "1.5", NOT_A_SIZE),
    ("x-max-bandwidth", "12Q", NOT_A_SIZE),
    ("x-max-bandwidth", ".", NOT_A_SIZE),
    ("x-max-bandwidth", "0x1.8k", NOT_A_SIZE),
    ("x-max-bandwidth", "16E", "Value '16E' is out of range for parameter 'x-max-bandwidth'"),
    ("x-cpu-throttle-tailslow", "1",
     "Parameter 'x-cpu-throttle-tailslow' expects 'on' or 'off'"),
    ("x-cpu-throttle-tailslow", "No",
     "Parameter 'x-cpu-throttle-tailslow' expects 'on' or 'off'"),
    ("mode", "bogus", "Parameter 'mode' does not accept value 'bogus'"),
])
def test_global_parameter_errors(prop: str, value: str, reason: str) -> None:
    with pytest.raises(QapiError) as exc:
        parse_global_parameter(prop, value)
    assert exc.value.desc == f"can't apply global migration.{prop}={value}: {reason}"


def test_apply_globals_checks_once_after_all_are_applied() -> None:
    caps, params, warnings = apply_globals([
        ("x-switchover-ack", "on"), ("x-return-path", "on"), ("x-downtime-limit", "100"),
        ("x-downtime-limit", "200"), ("x-zero-blocks", "on"),
    ])
    assert caps.get("switchover-ack") and caps.get("return-path")
    assert params.downtime_limit_ms == 200
    assert warnings == ["zero-blocks capability is deprecated"]
    assert apply_globals([]) == (Capabilities(), Parameters(), [])


@pytest.mark.parametrize(("pairs", "text"), [
    ([("x-switchover-ack", "on")],
     "Capability 'switchover-ack' requires capability 'return-path'"),
    ([("x-xbzrle", "on")], "Capability 'xbzrle' is not supported by livemig"),
    ([("x-downtime-limit", "2000001")],
     f"Parameter 'downtime_limit' {RANGE} 0 to (2000 * 1000) ms"),
    # parameters are checked before capabilities (migration_object_check)
    ([("x-xbzrle", "on"), ("multifd-channels", "0")],
     "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ([("x-bogus", "on")],
     "can't apply global migration.x-bogus=on: Property 'migration.x-bogus' not found"),
])
def test_apply_globals_errors(pairs: list[tuple[str, str]], text: str) -> None:
    with pytest.raises(QapiError) as exc:
        apply_globals(pairs)
    assert exc.value.desc == text


# --- properties -------------------------------------------------------------------------

def valid_value(name: str) -> st.SearchStrategy[Any]:
    ranges = {
        "announce-initial": (0, 100000), "announce-max": (0, 100000),
        "announce-rounds": (0, 1000), "announce-step": (1, 10000),
        "throttle-trigger-threshold": (1, 100), "cpu-throttle-initial": (1, 99),
        "cpu-throttle-increment": (1, 99), "downtime-limit": (0, 2000000),
        "x-checkpoint-delay": (0, (1 << 32) - 1), "multifd-channels": (1, 255),
        "max-cpu-throttle": (1, 99), "multifd-zlib-level": (0, 9),
        "multifd-qatzip-level": (1, 9), "multifd-zstd-level": (0, 20),
        "x-vcpu-dirty-limit-period": (1, 1000), "vcpu-dirty-limit": (1, U64 - 1),
        "x-stall-timeout": (0, U64 - 1),
    }
    qtype = SCHEMA[name]
    if name in ranges:
        return st.integers(*ranges[name])
    if name == "xbzrle-cache-size":
        return st.integers(12, 63).map(lambda shift: 1 << shift)
    if qtype == "size":
        return st.integers(0, U64 - 1)
    if qtype == "bool":
        return st.booleans()
    if qtype == "StrOrNull":
        return st.text(max_size=8)
    if qtype in ENUMS:
        return st.sampled_from(ENUMS[qtype])
    return st.just([])


valid_args = st.fixed_dictionaries({}, optional={n: valid_value(n) for n in SCHEMA})


@settings(max_examples=300, deadline=None)
@given(valid_args)
def test_valid_sets_round_trip_through_set_and_query(args: dict[str, Any]) -> None:
    merged = {**DEFAULTS, **args}
    assume(merged["cpu-throttle-initial"] <= merged["max-cpu-throttle"])
    params = Parameters()
    params.set_from_qmp(args)
    dump = params.as_qmp()
    assert dump == {n: merged[n] for n in SCHEMA if n in merged}
    again = Parameters()
    again.set_from_qmp(dump)
    assert again == params


any_value = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 65), 1 << 65),
                      st.floats(allow_nan=False), st.text(max_size=4),
                      st.sampled_from(["none", "zlib", "legacy", "cpr-reboot"]),
                      st.lists(st.integers(), max_size=1))
any_args = st.dictionaries(st.sampled_from([*SCHEMA, "bogus"]), any_value, max_size=5)


@settings(max_examples=500, deadline=None)
@given(st.one_of(any_args, valid_args))
def test_set_either_raises_or_applies_fully(args: dict[str, Any]) -> None:
    params = Parameters()
    params.set_from_qmp({"downtime-limit": 1234, "tls-creds": "before"})
    before = params.as_qmp()
    try:
        params.set_from_qmp(args)
    except QapiError as exc:
        assert exc.error_class == "GenericError" and exc.desc
        assert params.as_qmp() == before
    else:
        dump = params.as_qmp()
        for name, value in args.items():
            if isinstance(value, int) and not isinstance(value, bool):
                value %= U64
            assert dump[name] == ("" if value is None else value)
        for name in set(before) - set(args):
            assert dump[name] == before[name]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, U64 - 1), st.sampled_from(["", "B", "b", "k", "K", "M", "g", "T", "P", "E"]))
def test_size_strings_scale_by_1024(number: int, unit: str) -> None:
    mul = 1 << (10 * "BKMGTPE".index(unit.upper() or "B"))
    if number * mul < U64:
        assert parse_size("x", f"{number}{unit}") == number * mul
    else:
        with pytest.raises(QapiError, match="is out of range"):
            parse_size("x", f"{number}{unit}")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, U64 - 1))
def test_uint64_strings_round_trip(number: int) -> None:
    assert parse_uint64("x", str(number)) == number
    assert parse_uint64("x", hex(number)) == number
