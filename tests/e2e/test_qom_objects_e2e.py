"""QOM objects side by side with QEMU 10.0.2: ``object-add`` / ``object-del`` over
QMP and ``-object`` on the command line, same inputs, same answers.

QEMU runs as ``-M none -qmp stdio`` (no guest needed for objects); livemig's QMP
side runs in process (``tests/qmp_inprocess.py``); the command-line checks start
both binaries with one bad ``-object`` each and compare their one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from livemig.cli.driver import QEMU_BINARY, qemu_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for qmp_inprocess
from qmp_inprocess import InProcessFleet, inprocess_fleet, run_in_fleet  # noqa: E402

pytestmark = [
    pytest.mark.skipif(qemu_available() is None,
                       reason=f"{QEMU_BINARY} is not installed: nothing to compare with"),
    pytest.mark.timeout(90),
]


@pytest.fixture
def inproc(tmp_path):
    yield from inprocess_fleet(tmp_path)


def _qemu_version_ok() -> bool:
    out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    return "version 10.0." in out


def outcome(reply: dict[str, Any]) -> tuple:
    if "error" in reply:
        return ("error", reply["error"]["class"], reply["error"]["desc"])
    return ("return", reply["return"])


def qemu_outcomes(commands: list[dict[str, Any]]) -> list[tuple]:
    """Each command's answer from ``qemu-system-x86_64 -M none -qmp stdio``."""
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    proc = subprocess.run([QEMU_BINARY, "-M", "none", "-nodefaults", "-display", "none",
                           "-qmp", "stdio"], input="\n".join(map(json.dumps, lines)) + "\n",
                          capture_output=True, text=True, timeout=60)
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    replies = [r for r in replies if "event" not in r and "QMP" not in r]
    return [outcome(r) for r in replies[1:1 + len(commands)]]


def livemig_outcomes(fleet: InProcessFleet, commands: list[dict[str, Any]]) -> list[tuple]:
    async def body() -> list[tuple]:
        vm = await fleet.start("qom", paused=True)
        out = []
        for cmd in commands:
            try:
                out.append(("return", await vm.qmp.execute(cmd["execute"],
                                                           cmd.get("arguments"))))
            except ExecuteError as exc:
                out.append(("error", exc.error_class, exc.error.error.desc))
        return out
    return run_in_fleet(fleet, body)


def add(**args: Any) -> dict[str, Any]:
    return {"execute": "object-add", "arguments": args}


def delete(**args: Any) -> dict[str, Any]:
    return {"execute": "object-del", "arguments": args}


SIMPLE = {"qom-type": "authz-simple"}
SEQUENCE = [
    add(), add(**{"qom-type": "x"}), add(**{"qom-type": 1, "id": "a"}),
    add(**SIMPLE, id="a"), add(**SIMPLE, id="a", identity="x"),
    add(**SIMPLE, id="a", identity="x"),                      # duplicate id
    add(**{"qom-type": "authz-list", "id": "a"}),               # duplicate, other type
    add(**SIMPLE, id="b", identity=3), add(**SIMPLE, id="b", identity="x", bogus=1),
    add(**SIMPLE, id="1b", identity="x"), add(**SIMPLE, id="", identity="x"),
    add(**SIMPLE, identity="x"), add(**SIMPLE, id="b", props={"identity": "x"}),
    add(**SIMPLE, id="a.b-c_d", identity="x"),
    delete(id="zz"), delete(), delete(id="a"), delete(id="a"),
    add(**SIMPLE, id="a", identity="again"),                   # the id is free again
    add(**{"qom-type": "authz-list", "id": "al", "policy": "deny",
           "rules": [{"match": "CN=*", "policy": "allow", "format": "glob"}]}),
    add(**{"qom-type": "authz-list", "id": "al2", "policy": "bogus"}),
    add(**{"qom-type": "authz-list", "id": "al3", "rules": [{"match": "a"}]}),
    add(**{"qom-type": "authz-list", "id": "al3", "rules": [{"policy": "allow"}]}),
    add(**{"qom-type": "authz-list", "id": "al3",
           "rules": [{"match": "x", "policy": "allow", "format": "regex"}]}),
    add(**{"qom-type": "authz-list", "id": "al4", "rules": "x"}),
    add(**{"qom-type": "authz-listfile", "id": "l2"}),
    # TLS credentials: QEMU's properties, defaults and file checks.
    add(**{"qom-type": "tls-creds-x509", "id": "t", "endpoint": "server",
           "dir": "/nonexistent-livemig"}),
    add(**{"qom-type": "tls-creds-x509", "id": "t", "endpoint": "client",
           "dir": "/nonexistent-livemig"}),
    add(**{"qom-type": "tls-creds-x509", "id": "t"}),
    add(**{"qom-type": "tls-creds-x509", "id": "t", "endpoint": "bogus", "dir": "/"}),
    add(**{"qom-type": "tls-creds-x509", "id": "t", "verify-peer": "yes", "dir": "/"}),
    add(**{"qom-type": "tls-creds-x509", "id": "t", "loaded": True, "dir": "/"}),
    add(**{"qom-type": "tls-creds-psk", "id": "p", "endpoint": "server",
           "dir": "/nonexistent-livemig", "username": "u"}),
    add(**{"qom-type": "tls-creds-psk", "id": "p", "endpoint": "client",
           "dir": "/nonexistent-livemig"}),
    add(**{"qom-type": "tls-creds-psk", "id": "p", "endpoint": "server",
           "dir": "/nonexistent-livemig"}),
]


def test_object_add_and_del_answer_like_qemu(inproc):
    if not _qemu_version_ok():
        pytest.skip("the expected answers are QEMU 10.0's")
    q = qemu_outcomes(SEQUENCE)
    assert len(q) == len(SEQUENCE)
    # QEMU's own texts, pinned, so a drift on either side shows.
    assert q[0] == ("error", "GenericError", "Parameter 'qom-type' is missing")
    assert q[5] == ("error", "GenericError",
                    "attempt to add duplicate property 'a' to object (type 'container')")
    assert q[9] == ("error", "GenericError", "Parameter 'id' expects an identifier")
    assert q[14] == ("error", "GenericError", "object 'zz' not found")
    lm = livemig_outcomes(inproc, SEQUENCE)
    for cmd, a, b in zip(SEQUENCE, q, lm, strict=True):
        assert b == a, cmd


BAD_OBJECTS = [
    "authz-simple,id=a", "authz-simple,identity=x", "bogus,id=a", "id=a",
    "authz-simple,id=a,identity=x,foo=bar", "authz-simple,id=1a,identity=x",
    '{"qom-type":"authz-simple","id":"a","identity":1}',
    '{"qom-type":"authz-simple"',
    '{"qom-type":"authz-simple","id":"a","identity":"x"} x',
    '{"qom-type":"authz-simple","id":"a","identity":"x","foo":1}',
    "authz-list,id=a,rules.0.match=x",
    "authz-listfile,id=a,filename=/x,refresh=maybe",
    "tls-creds-x509,id=t,dir=/tmp,verify-peer=maybe",
    "tls-creds-x509,id=t,dir=/tmp,endpoint=both",
]


def _first_lines(argv: list[str], prog: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc
    text = proc.stderr.replace(f"{prog}: ", "PROG: ")
    return "\n".join(line for line in text.splitlines() if "warning" not in line)


@pytest.mark.parametrize("spec", BAD_OBJECTS)
def test_bad_object_option_fails_like_qemu(spec):
    if not _qemu_version_ok():
        pytest.skip("the expected texts are QEMU 10.0's")
    q = _first_lines([QEMU_BINARY, "-M", "none", "-nodefaults", "-display", "none",
                      "-object", spec], "qemu-system-x86_64")
    lm = _first_lines([sys.executable, "-m", "livemig", "run", "-S", "-object", spec],
                      "livemig")
    assert q.startswith(f"PROG: -object {spec}: ")
    assert lm == q


def test_duplicate_object_option_fails_like_qemu():
    argv = ["-object", "authz-simple,id=a,identity=x", "-object", "authz-simple,id=a,identity=y"]
    q = _first_lines([QEMU_BINARY, "-M", "none", "-nodefaults", "-display", "none", *argv],
                     "qemu-system-x86_64")
    lm = _first_lines([sys.executable, "-m", "livemig", "run", "-S", *argv], "livemig")
    assert q == "PROG: -object authz-simple,id=a,identity=y: Duplicate ID 'a' for object"
    assert lm == q


def test_object_add_is_in_query_qmp_schema(inproc):
    """object-add's arguments are the ObjectOptions union, variants by qom-type."""
    async def body() -> list[dict[str, Any]]:
        vm = await inproc.start("schema", paused=True)
        return await vm.qmp.execute("query-qmp-schema")
    entities = run_in_fleet(inproc, body)
    types = {e["name"]: e for e in entities}
    add_cmd = next(e for e in entities if e["name"] == "object-add")
    union = types[add_cmd["arg-type"]]
    assert union["tag"] == "qom-type"
    assert [m["name"] for m in union["members"]] == ["qom-type", "id"]
    cases = {v["case"]: types[v["type"]] for v in union["variants"]}
    assert [m["name"] for m in cases["authz-simple"]["members"]] == ["identity"]
    assert {m["name"] for m in cases["authz-listfile"]["members"]} == {"filename", "refresh"}
    delete_cmd = next(e for e in entities if e["name"] == "object-del")
    assert [m["name"] for m in types[delete_cmd["arg-type"]]["members"]] == ["id"]


def test_object_that_fails_to_complete_at_start_fails_like_qemu():
    """A -object that parses but cannot complete: QEMU prints the error without the
    option's location (it is created after parsing), and so does livemig."""
    spec = "tls-creds-x509,id=t,endpoint=server,dir=/nonexistent-livemig"
    q = _first_lines([QEMU_BINARY, "-M", "none", "-nodefaults", "-display", "none",
                      "-object", spec], "qemu-system-x86_64")
    lm = _first_lines([sys.executable, "-m", "livemig", "run", "-S", "-object", spec],
                      "livemig")
    assert q == ("PROG: Unable to access credentials /nonexistent-livemig/ca-cert.pem: "
                 "No such file or directory")
    assert lm == q


def test_tls_creds_files_checked_like_qemu(inproc, tmp_path):
    """Real credential directories (made here): what each engine says of each."""
    if not _qemu_version_ok():
        pytest.skip("the expected answers are QEMU 10.0's")
    from tls_certs import client_dir_variant, make_pki
    pki = make_pki(tmp_path / "pki")
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca-cert.pem").write_bytes((pki.server / "ca-cert.pem").read_bytes())
    expired = client_dir_variant(tmp_path, pki, "expired", expired=True)
    x509 = {"qom-type": "tls-creds-x509"}
    commands = [
        add(**x509, id="s1", endpoint="server", dir=str(pki.server)),
        add(**x509, id="c1", endpoint="client", dir=str(pki.client)),
        add(**x509, id="s2", endpoint="server", dir=str(only_ca)),    # no server cert
        add(**x509, id="c2", endpoint="client", dir=str(only_ca)),    # client cert optional
        add(**x509, id="c3", endpoint="client", dir=str(expired)),
        add(**x509, id="c4", endpoint="client", dir=str(expired), **{"sanity-check": False}),
        delete(id="s1"), delete(id="s1"),
    ]
    q = qemu_outcomes(commands)
    assert q[2] == ("error", "GenericError", f"Unable to access credentials {only_ca}/"
                                             "server-cert.pem: No such file or directory")
    assert q[4] == ("error", "GenericError",
                    f"The client certificate {expired}/client-cert.pem has expired")
    lm = livemig_outcomes(inproc, commands)
    for cmd, a, b in zip(commands, q, lm, strict=True):
        assert b == a, cmd


def test_tls_creds_psk_checked_like_qemu(inproc, tmp_path):
    """``tls-creds-psk`` with real ``keys.psk`` files: the same answers, including
    QEMU's key lookup (first line, whole name) and its text for a key that is not hex."""
    if not _qemu_version_ok():
        pytest.skip("the expected answers are QEMU 10.0's")
    from tls_certs import write_psk_dir
    good = write_psk_dir(tmp_path / "good", {"qemu": "00ff" * 16, "bob": "12" * 32})
    bad = write_psk_dir(tmp_path / "bad", {"qemux": "00", "qemu": "xyz1", "bob": "0 1"})
    psk = {"qom-type": "tls-creds-psk"}
    commands = [
        add(**psk, id="c1", endpoint="client", dir=str(good)),                  # username qemu
        add(**psk, id="c2", endpoint="client", dir=str(good), username="bob"),
        add(**psk, id="c3", endpoint="client", dir=str(good), username="nobody"),
        add(**psk, id="c4", endpoint="client", dir=str(bad)),                   # not hex
        add(**psk, id="c5", endpoint="client", dir=str(bad), username="bob"),   # a space
        add(**psk, id="c6", endpoint="client", dir=str(bad), username="qem"),
        add(**psk, id="s1", endpoint="server", dir=str(bad)),          # read at handshakes
        add(**psk, id="s2", endpoint="server", dir=str(good), username="qemu"),
        add(**psk, id="c7", endpoint="client", dir=str(good), priority="NORMAL:-VERS-TLS1.3"),
        delete(id="c1"), delete(id="s1"),
    ]
    q = qemu_outcomes(commands)
    assert q[0] == q[1] == q[6] == ("return", {})
    assert q[2] == ("error", "GenericError",
                    f"Username nobody not found in PSK file {good}/keys.psk")
    lm = livemig_outcomes(inproc, commands)
    for cmd, a, b in zip(commands, q, lm, strict=True):
        assert b == a, cmd
