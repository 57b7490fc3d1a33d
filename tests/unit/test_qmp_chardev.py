"""The chardev parsers (livemig.qmp.chardev): ``-chardev``, and the ``-qmp``/``-serial``
compat forms, with QEMU 10.0.2's texts (checked against qemu-system-x86_64). Pure."""

from __future__ import annotations

import pytest

from livemig.qmp.chardev import ChardevError, parse_chardev, parse_compat, parse_qmp_spec


@pytest.mark.parametrize("spec,text", [
    ("stdio", "chardev backend 'stdio' is not supported by livemig"),
    ("mon:stdio", "chardev backend 'mon' is not supported by livemig"),
    ("bogus", "'bogus' is not a valid char driver"),
    ("unix:/tmp/x,server=on,telnet=on", "option 'telnet' is not supported by livemig"),
    ("unix:/tmp/x,server=on,wait=maybe", "Parameter 'wait' expects 'on' or 'off'"),
    ("unix:/tmp/x,wait=off", "'wait' option is incompatible with socket in client connect mode"),
    ("tcp:localhost:http,server=on", "address resolution failed for localhost:http"),
    ("tcp:localhost:70000,server=on", "address resolution failed for localhost:70000"),
    ("unix:/" + "x" * 120 + ",server=on", "is too long"),
    ("unix:/tmp/q.sock,server=on,nobogus", "Invalid parameter 'bogus'"),
    ("null", "livemig's QMP monitor needs a socket"),
])
def test_qmp_spec_errors_name_the_option(spec: str, text: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_qmp_spec(spec)
    assert str(exc.value).startswith(f"-qmp {spec}: ") and text in str(exc.value)


def test_qmp_spec_forms() -> None:
    spec = parse_qmp_spec("unix:/run/a,,b.sock,server,nowait")
    assert (spec.kind, spec.path, spec.server, spec.wait) == ("unix", "/run/a,b.sock", True, False)
    spec = parse_qmp_spec("tcp::4444,server=on,wait=off,nodelay=on")
    assert (spec.kind, spec.host, spec.port, spec.wait, spec.nodelay) == (
        "tcp", "", 4444, False, True)
    spec = parse_qmp_spec("tcp:[::1]:0,server=on")
    assert (spec.host, spec.port, spec.wait) == ("::1", 0, True)
    # QEMU's default is a client: connect out, no wait.
    spec = parse_qmp_spec("unix:/tmp/x")
    assert (spec.server, spec.wait, spec.option, spec.id) == (False, False, "-qmp",
                                                               "compat_monitor0")
    assert parse_qmp_spec("tcp:127.0.0.1:4444,server=off").server is False


@pytest.mark.parametrize("text,error", [
    ("socket,path=/tmp/x", "chardev: no id specified"),
    ("bogus,id=m", "'bogus' is not a valid char driver name"),
    ("pty,id=m", "chardev backend 'pty' is not supported by livemig"),
    ("socket,id=m,path=/tmp/x,host=h", "None or one of 'path', 'fd' or 'host' option required."),
    ("socket,id=m,path=/x,server=on,wait=off,fd=3",
     "None or one of 'path', 'fd' or 'host' option required."),
    ("socket,id=m", "Unable to parse FD number "),
    ("socket,id=m,port=5", "Unable to parse FD number "),
    ("socket,id=m,fd=x", "Unable to parse FD number x"),
    ("socket,id=m,host=127.0.0.1", "chardev: socket: no port given"),
    ("socket,id=m,path=/tmp/x,server=on,wait=off,bogus=1", "Invalid parameter 'bogus'"),
    ("socket,id=m,path=/tmp/x,server=maybe", "Parameter 'server' expects 'on' or 'off'"),
    ("socket,id=m,path=/tmp/x,server=off,wait=off",
     "'wait' option is incompatible with socket in client connect mode"),
    ("socket,id=m,path=/tmp/x,server=on,reconnect=1", "option 'reconnect' is not supported"),
    ("file,id=m", "chardev: file: no filename given"),
    ("null,id=m,path=/x", "Invalid parameter 'path'"),
])
def test_chardev_errors_are_qemus(text: str, error: str) -> None:
    with pytest.raises(ChardevError) as exc:
        parse_chardev(text)
    assert str(exc.value).startswith(error)   # QEMU's texts exactly; livemig's then say more


def test_chardev_forms() -> None:
    c = parse_chardev("socket,id=mon,path=/tmp/m.sock,server=on,wait=off")
    assert (c.id, c.backend, c.kind, c.path, c.server, c.wait) == (
        "mon", "socket", "unix", "/tmp/m.sock", True, False)
    c = parse_chardev("socket,id=mon,path=/tmp/m.sock,server=on")
    assert c.wait is True                       # QEMU's default for a server
    c = parse_chardev("socket,id=mon,path=/tmp/m.sock")
    assert (c.server, c.wait) == (False, False)  # QEMU's default: client
    c = parse_chardev("socket,id=mon,host=127.0.0.1,port=4444")
    assert (c.kind, c.host, c.port, c.server) == ("tcp", "127.0.0.1", 4444, False)
    c = parse_chardev("socket,id=mon,fd=7")
    assert (c.kind, c.fd, c.server) == ("fd", 7, False)
    c = parse_chardev("socket,id=a,,b,path=/tmp/x,,y")   # ',,' is a comma, as QemuOpts
    assert (c.id, c.path) == ("a,b", "/tmp/x,y")
    assert parse_chardev("null,id=n").backend == "null"
    assert parse_chardev("file,id=f,path=/tmp/f").path == "/tmp/f"
    assert c.describe() == "unix:/tmp/x,y"
    assert parse_chardev("socket,id=m,path=/p,server=on").describe() == "unix:/p,server=on"


def test_compat_forms() -> None:
    assert parse_compat("null", "serial0").backend == "null"
    assert parse_compat("none", "serial0").backend == "none"
    f = parse_compat("file:/tmp/a,b", "serial0")        # verbatim, as QEMU
    assert (f.backend, f.path) == ("file", "/tmp/a,b")
    u = parse_compat("unix:/tmp/s,server=on,wait=off", "serial0")
    assert (u.kind, u.path, u.server, u.wait, u.id) == ("unix", "/tmp/s", True, False, "serial0")
    t = parse_compat("tcp:127.0.0.1:0,server=on,wait=off", "serial0")
    assert (t.kind, t.host, t.port, t.server, t.wait) == ("tcp", "127.0.0.1", 0, True, False)
    with pytest.raises(ChardevError) as exc:
        parse_compat("tcp:127.0.0.1", "serial0")
    assert str(exc.value) == ""     # QEMU prints only -serial's own line for it
