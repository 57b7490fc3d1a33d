"""The -qmp chardev spec parser (livemig.qmp.chardev): pure, no sockets."""

from __future__ import annotations

import pytest

from livemig.qmp.chardev import parse_qmp_spec


@pytest.mark.parametrize("spec", [
    "stdio", "mon:stdio", "unix:/tmp/x", "unix:/tmp/x,server=off", "unix:,server=on",
    "unix:/tmp/x,server=on,telnet=on", "unix:/tmp/x,server=on,wait=maybe",
    "tcp:localhost,server=on", "tcp:localhost:http,server=on", "tcp:localhost:70000,server=on",
    "unix:/tmp/x,server=on,nodelay=on", "unix:/" + "x" * 120 + ",server=on",
])
def test_unsupported_specs_are_clear_value_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="-qmp"):
        parse_qmp_spec(spec)


def test_spec_forms() -> None:
    spec = parse_qmp_spec("unix:/run/a,,b.sock,server,nowait")
    assert (spec.kind, spec.path, spec.wait) == ("unix", "/run/a,b.sock", False)
    spec = parse_qmp_spec("tcp::4444,server=on,wait=off,nodelay=on")
    assert (spec.kind, spec.host, spec.port, spec.wait, spec.nodelay) == (
        "tcp", "", 4444, False, True)
    spec = parse_qmp_spec("tcp:[::1]:0,server=on")
    assert (spec.host, spec.port, spec.wait) == ("::1", 0, True)


def test_qmp_options_use_the_shared_qemuopts_parser() -> None:
    spec = parse_qmp_spec("unix:/tmp/a,,b.sock,server=on,nowait")
    assert spec.path == "/tmp/a,b.sock" and spec.wait is False
    with pytest.raises(ValueError, match="unsupported option 'bogus'"):
        parse_qmp_spec("unix:/tmp/q.sock,server=on,nobogus")
