"""The ``channels`` argument through the one visitor: QEMU's MigrationChannel
schema (a flat union inside a flat union) and QEMU 10.0.2's texts, each
checked against ``qemu-system-x86_64 -M none -qmp stdio`` by hand."""

from __future__ import annotations

import pytest

from livemig.qapi.errors import QapiError
from livemig.qapi.schema import MIGRATION_CHANNEL_LIST
from livemig.qapi.visitor import visit
from livemig.transport import FileAddress, InetAddress, TransportError, address_from_channels

INET = {"transport": "socket", "type": "inet", "host": "h", "port": "1"}


def ch(addr, ctype="main"):
    return {"channel-type": ctype, "addr": addr}


@pytest.mark.parametrize(("channels", "desc"), [
    ([ch(INET, "other")], "Parameter 'channel-type' does not accept value 'other'"),
    ([ch({"transport": "pigeon"})], "Parameter 'transport' does not accept value 'pigeon'"),
    ([ch({"transport": "socket", "type": "pipe"})],
     "Parameter 'type' does not accept value 'pipe'"),
    ([ch({**INET, "to": 70000})], "Parameter 'to' expects uint16_t"),
    ([ch({**INET, "bogus": 1})], "Parameter 'channels[0].addr.bogus' is unexpected"),
    ([ch({"transport": "file", "filename": "x", "offset": "a"})],
     "Parameter 'channels[0].addr.offset' expects uint64"),
    ([ch({"transport": "file", "filename": "x", "offset": 1.5})],
     "Parameter 'channels[0].addr.offset' expects uint64"),
])
def test_qemus_texts(channels, desc):
    with pytest.raises(QapiError) as info:
        visit(MIGRATION_CHANNEL_LIST, channels, "channels")
    assert info.value.desc == desc
    with pytest.raises(TransportError) as tinfo:
        address_from_channels(channels)
    assert tinfo.value.desc == desc


def test_variant_members_are_read_from_the_same_object():
    addr = {**INET, "keep-alive": True, "to": 5}
    assert visit(MIGRATION_CHANNEL_LIST, [ch(addr)], "channels") == [ch(addr)]
    assert address_from_channels([ch(addr)]) == InetAddress("h", "1")


def test_a_negative_offset_wraps_as_in_qemus_visitor():
    """QEMU accepts -1 for a uint64 and fails later, truncating the file."""
    addr = address_from_channels([ch({"transport": "file", "filename": "/f", "offset": -1})])
    assert addr == FileAddress("/f", (1 << 64) - 1)


def test_a_member_of_another_variant_is_unexpected():
    with pytest.raises(QapiError, match=r"'channels\[0\].addr.path' is unexpected"):
        visit(MIGRATION_CHANNEL_LIST, [ch({**INET, "path": "/s"})], "channels")
