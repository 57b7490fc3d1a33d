"""livemig.qapi.capabilities: names, order, QEMU 10.0's migrate_caps_check texts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.qapi import CAPABILITIES, IMPLEMENTED, Capabilities, QapiError, caps_check
from livemig.qapi.capabilities import (
    GLOBAL_PROPERTY,
    MIGRATION_IN_PROGRESS,
    parse_global_capability,
)

pytestmark = pytest.mark.timeout(60)

ALL_OFF = dict.fromkeys(CAPABILITIES, False)
BACKGROUND_SNAPSHOT_INCOMPATIBLE = [
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
    "return-path", "multifd", "pause-before-switchover", "auto-converge", "release-ram",
    "rdma-pin-all", "xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
]


def caps(*names: str) -> dict[str, bool]:
    return {**ALL_OFF, **dict.fromkeys(names, True)}


def check(*names: str, incoming_started: bool = False, params: dict | None = None) -> list[str]:
    return caps_check(ALL_OFF, caps(*names), incoming_started=incoming_started, params=params)


def items(*names: str, state: bool = True) -> list[dict]:
    return [{"capability": name, "state": state} for name in names]


def test_enum_order_is_qemus() -> None:
    assert CAPABILITIES == (
        "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
        "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
        "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
        "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
        "switchover-ack", "dirty-limit", "mapped-ram",
    )


def test_query_lists_all_off_in_enum_order_state_first() -> None:
    listed = Capabilities().as_qmp_list()
    assert [item["capability"] for item in listed] == list(CAPABILITIES)
    assert all(list(item) == ["state", "capability"] for item in listed)
    assert not any(item["state"] for item in listed)


def test_global_properties_match_reference_table() -> None:
    assert GLOBAL_PROPERTY["x-switchover-ack"] == "switchover-ack"
    assert GLOBAL_PROPERTY["mapped-ram"] == "mapped-ram"
    assert GLOBAL_PROPERTY["x-colo"] == "x-colo"
    without_property = set(CAPABILITIES) - set(GLOBAL_PROPERTY.values())
    assert without_property == {
        "pause-before-switchover", "dirty-bitmaps", "postcopy-blocktime",
        "late-block-activate", "x-ignore-shared", "validate-uuid",
    }
    for prop, cap in GLOBAL_PROPERTY.items():
        assert prop in (cap, "x-" + cap)


def test_implemented_set() -> None:
    assert IMPLEMENTED == {"events", "return-path", "switchover-ack", "pause-before-switchover",
                           "validate-uuid", "multifd", "zero-blocks", "auto-converge",
                           "late-block-activate", "postcopy-ram", "postcopy-blocktime",
                           "zero-copy-send"}


# --- migrate_caps_check rules, each with QEMU's text ------------------------------------

@pytest.mark.parametrize(("enabled", "incoming", "params", "text"), [
    (("postcopy-ram", "x-ignore-shared"), False, None,
     "Postcopy is not compatible with ignore-shared"),
    (("postcopy-ram", "multifd"), False, None, "Postcopy is not yet compatible with multifd"),
    (("zero-copy-send",), False, None,
     "Zero copy only available for non-compressed non-TLS multifd migration"),
    (("zero-copy-send", "multifd", "xbzrle"), False, None,
     "Zero copy only available for non-compressed non-TLS multifd migration"),
    (("zero-copy-send", "multifd"), False, {"multifd-compression": "zlib", "tls-creds": ""},
     "Zero copy only available for non-compressed non-TLS multifd migration"),
    (("zero-copy-send", "multifd"), False, {"multifd-compression": "none", "tls-creds": "tls0"},
     "Zero copy only available for non-compressed non-TLS multifd migration"),
    (("postcopy-preempt",), False, None, "Postcopy preempt requires postcopy-ram"),
    (("postcopy-preempt", "postcopy-ram"), True, None,
     "Postcopy preempt must be set before incoming starts"),
    (("multifd",), True, None, "Multifd must be set before incoming starts"),
    (("switchover-ack",), False, None,
     "Capability 'switchover-ack' requires capability 'return-path'"),
    (("dirty-limit", "auto-converge"), False, None,
     "dirty-limit conflicts with auto-converge either of then available currently"),
    (("multifd", "xbzrle"), False, None, "Multifd is not compatible with xbzrle"),
    (("mapped-ram", "xbzrle"), False, None, "Mapped-ram migration is incompatible with xbzrle"),
    (("mapped-ram", "postcopy-ram"), False, None,
     "Mapped-ram migration is incompatible with postcopy"),
])
def test_qemu_rule_texts(enabled: tuple[str, ...], incoming: bool, params: dict | None,
                         text: str) -> None:
    with pytest.raises(QapiError) as exc:
        check(*enabled, incoming_started=incoming, params=params)
    assert str(exc.value) == exc.value.desc == text
    assert exc.value.error_class == "GenericError"


@pytest.mark.parametrize("other", BACKGROUND_SNAPSHOT_INCOMPATIBLE)
def test_background_snapshot_incompatibilities(other: str) -> None:
    with pytest.raises(QapiError, match=f"^Background-snapshot is not compatible with {other}$"):
        check("background-snapshot", other)


def test_background_snapshot_names_first_incompatible_in_qemu_order() -> None:
    with pytest.raises(QapiError, match="with postcopy-ram$"):
        check("background-snapshot", "xbzrle", "postcopy-ram")


@pytest.mark.parametrize(("enabled", "incoming", "text"), [
    # rule 12 (multifd/incoming) precedes rule 13 (switchover-ack/return-path)
    (("multifd", "switchover-ack"), True, "Multifd must be set before incoming starts"),
    # rule 9 (zero copy) precedes rule 16 (multifd + xbzrle)
    (("zero-copy-send", "multifd", "xbzrle"), False, "Zero copy only available"),
    # rule 13 precedes rule 14
    (("switchover-ack", "dirty-limit", "auto-converge"), False, "Capability 'switchover-ack'"),
    # rule 5 precedes rule 12
    (("postcopy-ram", "multifd"), True, "Postcopy is not yet compatible with multifd"),
])
def test_rules_run_in_qemu_order(enabled: tuple[str, ...], incoming: bool, text: str) -> None:
    with pytest.raises(QapiError, match=f"^{text}"):
        check(*enabled, incoming_started=incoming)


@pytest.mark.parametrize(
    "cap", sorted(set(CAPABILITIES) - IMPLEMENTED - {"postcopy-preempt"})
)
def test_unimplemented_capability_is_refused_by_name(cap: str) -> None:
    with pytest.raises(QapiError) as exc:
        check(cap)
    assert exc.value.desc == f"Capability '{cap}' is not supported by livemig"
    assert exc.value.error_class == "GenericError"


@pytest.mark.parametrize(("enabled", "refused"), [
    (("postcopy-preempt", "postcopy-ram"), "postcopy-preempt"),
    (("dirty-limit",), "dirty-limit"),  # QEMU's KVM dirty-ring rule is not modelled
    (("auto-converge", "xbzrle"), "xbzrle"),  # auto-converge is implemented, xbzrle not
])
def test_livemig_refusal_comes_after_qemu_rules(enabled: tuple[str, ...], refused: str) -> None:
    with pytest.raises(QapiError, match=f"^Capability '{refused}' is not supported by livemig$"):
        check(*enabled)


@pytest.mark.parametrize("enabled", [
    (), ("events",), ("return-path",), ("return-path", "switchover-ack"),
    ("pause-before-switchover",), ("validate-uuid",), ("multifd",),
    tuple(IMPLEMENTED - {"zero-blocks", "postcopy-ram"}),
    tuple(IMPLEMENTED - {"zero-blocks", "multifd", "zero-copy-send"}),
])
def test_implemented_sets_pass(enabled: tuple[str, ...]) -> None:
    assert check(*enabled) == []


def test_zero_blocks_is_a_warning_only() -> None:
    assert check("zero-blocks") == ["zero-blocks capability is deprecated"]


# --- Capabilities.set_from_qmp ----------------------------------------------------------

def test_set_and_query() -> None:
    c = Capabilities()
    assert c.set_from_qmp(items("return-path", "switchover-ack"), migration_running=False,
                          incoming_started=False) == []
    assert c.get("switchover-ack") and c.get("return-path") and not c.get("events")
    states = {item["capability"]: item["state"] for item in c.as_qmp_list()}
    assert states == caps("return-path", "switchover-ack")


def test_return_path_off_while_switchover_ack_on_is_refused() -> None:
    c = Capabilities()
    c.set_from_qmp(items("return-path", "switchover-ack"), migration_running=False,
                   incoming_started=False)
    with pytest.raises(QapiError, match="requires capability 'return-path'"):
        c.set_from_qmp(items("return-path", state=False), migration_running=False,
                       incoming_started=False)
    assert c.get("return-path")


def test_error_leaves_set_unchanged() -> None:
    c = Capabilities()
    c.set_from_qmp(items("events"), migration_running=False, incoming_started=False)
    before = c.as_qmp_list()
    with pytest.raises(QapiError, match="'xbzrle' is not supported"):
        c.set_from_qmp(items("return-path", "validate-uuid", "xbzrle"),
                       migration_running=False, incoming_started=False)
    assert c.as_qmp_list() == before


def test_refused_while_migration_runs() -> None:
    c = Capabilities()
    with pytest.raises(QapiError, match=f"^{MIGRATION_IN_PROGRESS}$"):
        c.set_from_qmp(items("events"), migration_running=True, incoming_started=False)
    assert not c.get("events")


def test_argument_errors_come_before_migration_running() -> None:
    with pytest.raises(QapiError, match="does not accept value 'bogus'"):
        Capabilities().set_from_qmp(items("bogus"), migration_running=True,
                                    incoming_started=False)


def test_later_duplicate_wins() -> None:
    c = Capabilities()
    c.set_from_qmp(items("events") + items("events", state=False), migration_running=False,
                   incoming_started=False)
    assert not c.get("events")


def test_multifd_on_blocks_every_later_set_once_incoming_started() -> None:
    # QEMU 10.0 tests the new value (fixed in 10.1): observed behaviour.
    c = Capabilities()
    c.set_from_qmp(items("multifd"), migration_running=False, incoming_started=False)
    with pytest.raises(QapiError, match="^Multifd must be set before incoming starts$"):
        c.set_from_qmp(items("events"), migration_running=False, incoming_started=True)
    assert not c.get("events")


def test_empty_list_still_runs_the_check() -> None:
    c = Capabilities({"multifd": True})
    assert c.set_from_qmp([], migration_running=False, incoming_started=False) == []
    with pytest.raises(QapiError, match="Multifd must be set"):
        c.set_from_qmp([], migration_running=False, incoming_started=True)


def test_zero_blocks_warning_returned_and_applied() -> None:
    c = Capabilities()
    warnings = c.set_from_qmp(items("zero-blocks"), migration_running=False,
                              incoming_started=False)
    assert warnings == ["zero-blocks capability is deprecated"] and c.get("zero-blocks")


@pytest.mark.parametrize(("arg", "text"), [
    ({"capability": "events"}, "Invalid parameter type for 'capabilities', expected: array"),
    (["events"], "Invalid parameter type for 'capabilities[0]', expected: object"),
    ([{"state": True}], "Parameter 'capabilities[0].capability' is missing"),
    ([{"capability": 1, "state": True}],
     "Invalid parameter type for 'capabilities[0].capability', expected: string"),
    ([{"capability": "bogus", "state": True}],
     "Parameter 'capability' does not accept value 'bogus'"),
    ([{"capability": "events"}], "Parameter 'capabilities[0].state' is missing"),
    ([{"capability": "events", "state": 1}],
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ([{"capability": "events", "state": True}, {"capability": "events", "state": "true"}],
     "Invalid parameter type for 'capabilities[1].state', expected: boolean"),
    ([{"capability": "events", "state": None}],
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ([{"capability": "events", "state": True, "bogus": 1}],
     "Parameter 'capabilities[0].bogus' is unexpected"),
])
def test_argument_errors(arg: object, text: str) -> None:
    c = Capabilities()
    with pytest.raises(QapiError) as exc:
        c.set_from_qmp(arg, migration_running=False, incoming_started=False)
    assert exc.value.desc == text
    assert c == Capabilities()


# --- -global migration.<prop> -----------------------------------------------------------

@pytest.mark.parametrize("prop", sorted(GLOBAL_PROPERTY))
def test_every_global_property_parses(prop: str) -> None:
    assert parse_global_capability(prop, "on") == (GLOBAL_PROPERTY[prop], True)


# qapi_bool_parse, as qemu-system-x86_64 10.0.2 applies -global: exact words, y/n too.
@pytest.mark.parametrize(("word", "state"), [
    ("on", True), ("yes", True), ("true", True), ("y", True),
    ("off", False), ("no", False), ("false", False), ("n", False),
])
def test_global_bool_words(word: str, state: bool) -> None:
    assert parse_global_capability("x-return-path", word) == ("return-path", state)


@pytest.mark.parametrize(("prop", "value", "text"), [
    ("x-bogus", "on",
     "can't apply global migration.x-bogus=on: Property 'migration.x-bogus' not found"),
    ("switchover-ack", "on", ("can't apply global migration.switchover-ack=on: "
                              "Property 'migration.switchover-ack' not found")),
    ("x-switchover-ack", "maybe", ("can't apply global migration.x-switchover-ack=maybe: "
                                   "Parameter 'x-switchover-ack' expects 'on' or 'off'")),
    ("x-events", "1", ("can't apply global migration.x-events=1: "
                       "Parameter 'x-events' expects 'on' or 'off'")),
    ("x-events", "ON", ("can't apply global migration.x-events=ON: "
                        "Parameter 'x-events' expects 'on' or 'off'")),
    ("x-events", "True", ("can't apply global migration.x-events=True: "
                          "Parameter 'x-events' expects 'on' or 'off'")),
])
def test_global_errors(prop: str, value: str, text: str) -> None:
    with pytest.raises(QapiError) as exc:
        parse_global_capability(prop, value)
    assert exc.value.desc == text


# --- properties -------------------------------------------------------------------------

item_strategy = st.fixed_dictionaries(
    {"capability": st.sampled_from(CAPABILITIES), "state": st.booleans()}
)


@settings(max_examples=300, deadline=None)
@given(st.lists(item_strategy, max_size=8), st.booleans(), st.booleans())
def test_set_is_all_or_nothing(batch: list[dict], running: bool, incoming: bool) -> None:
    c = Capabilities({"events": True})
    before = c.as_dict()
    try:
        c.set_from_qmp(batch, migration_running=running, incoming_started=incoming)
    except QapiError as exc:
        assert exc.error_class == "GenericError" and exc.desc
        assert c.as_dict() == before
    else:
        expected = dict(before)
        expected.update((item["capability"], item["state"]) for item in batch)
        assert c.as_dict() == expected
        assert not running
        assert {name for name, on in expected.items() if on} <= IMPLEMENTED


@settings(max_examples=200, deadline=None)
@given(st.sets(st.sampled_from(sorted(IMPLEMENTED))))
def test_valid_sets_round_trip_through_set_and_query(enabled: set[str]) -> None:
    if "switchover-ack" in enabled:
        enabled = enabled | {"return-path"}
    if "postcopy-ram" in enabled:
        enabled = enabled - {"multifd"}       # "Postcopy is not yet compatible with multifd"
    if "multifd" not in enabled:
        enabled = enabled - {"zero-copy-send"}    # "Zero copy only available for ... multifd"
    c = Capabilities()
    c.set_from_qmp([{"capability": n, "state": n in enabled} for n in CAPABILITIES],
                   migration_running=False, incoming_started=False)
    assert {i["capability"] for i in c.as_qmp_list() if i["state"]} == enabled
    again = Capabilities()
    again.set_from_qmp([{"capability": i["capability"], "state": i["state"]}
                        for i in c.as_qmp_list()],
                       migration_running=False, incoming_started=False)
    assert again == c
