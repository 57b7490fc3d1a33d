"""Migration over TLS between two ``livemig run`` processes (issue 14).

Credentials are made by the test (``tests/tls_certs.py``, ``cryptography``;
``keys.psk`` files for the PSK cases); both VMs get ``tls-creds-x509`` or
``tls-creds-psk`` objects over QMP (``object-add``) and the ``tls-*``
parameters. Every hostile case checks the same three things: the
destination loads nothing and stays ``inmigrate`` (its listener still open),
the source fails with the cause and its guest runs on, and a correct
migration to that same destination then completes byte for byte.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    assert_same_guest,
    run_with,
    start_incoming,
    start_pair,
    wait_completed,
)
from e2e_helpers import runstate, wait_guest_runs, wait_until
from qemu.qmp import ExecuteError

from livemig.cli.driver import Vm
from livemig.migration.return_path import CHANNEL_ERROR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tls_certs
from tls_certs import CLIENT_DN, Pki, client_dir_variant, make_pki, write_psk_dir  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def add_creds(vm: Vm, directory: Path, endpoint: str, ident: str = "tls0",
                    **extra: Any) -> None:
    await vm.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": ident,
                                  "endpoint": endpoint, "dir": str(directory), **extra})


async def tls_pair(vms, pki: Pki, *, caps: dict[str, bool] | None = None,
                   src_dir: Path | None = None, authz: str | None = None,
                   multifd: int = 0, src_creds: dict[str, Any] | None = None,
                   ) -> tuple[Vm, Vm, str]:
    """A source and a TLS destination listening on tcp (with the source's creds set)."""
    src, dst = await _start(vms, caps, multifd)
    await add_creds(src, src_dir or pki.client, "client", **(src_creds or {}))
    await add_creds(dst, pki.server, "server")
    return src, dst, await _tls_params(src, dst, authz, multifd)


async def _start(vms, caps: dict[str, bool] | None, multifd: int) -> tuple[Vm, Vm]:
    caps = dict(caps or {})
    if multifd:
        caps["multifd"] = True
    return await start_pair(vms, src_caps=caps or None)


async def _tls_params(src: Vm, dst: Vm, authz: str | None, multifd: int) -> str:
    """``tls-creds tls0`` on both (and ``tls-authz`` = an authz-simple for ``authz``
    on the destination), then the destination listens: the URI."""
    params: dict[str, Any] = {"tls-creds": "tls0"}
    if multifd:
        params["multifd-channels"] = multifd
    await src.set_params(**params)
    if authz is not None:
        await dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0",
                                       "identity": authz})
        params["tls-authz"] = "auth0"
    await dst.set_params(**params)
    return await start_incoming(dst)


async def migrate_ok(src: Vm, dst: Vm, uri: str) -> dict[str, Any]:
    await src.cmd("migrate", uri=uri)
    info = await wait_completed(src, timeout=60)
    assert info["status"] == "completed", info
    assert (await wait_completed(dst, timeout=60))["status"] == "completed"
    await assert_same_guest(src, dst)
    return info


@pytest.mark.parametrize("caps,multifd", [
    ({}, 0),
    ({"return-path": True, "switchover-ack": True, "events": True}, 0),
    ({"return-path": True}, 4),
], ids=["main", "return-path", "multifd-4"])
def test_tls_migration_completes_byte_exact(vms, pki, caps, multifd):
    async def body():
        src, dst, uri = await tls_pair(vms, pki, caps=caps, multifd=multifd,
                                       authz=CLIENT_DN)
        await migrate_ok(src, dst, uri)
    run_with(vms, body)


# -- nobody who fails a check gets a guest loaded --------------------------------------------

RP = {"return-path": True}   # without a reply the source can never switch over


async def assert_refused(src: Vm | None, dst: Vm, *, dst_says: str | None = None
                         ) -> str | None:
    """The destination is still waiting (runstate inmigrate, listener open, nothing
    loaded); the source failed and its guest runs on. Returns the source's error."""
    if dst_says is not None:
        await wait_until(lambda: _in_stderr(dst, dst_says), 30,
                         f"destination to report {dst_says!r}")
    error = None
    if src is not None:
        info = await wait_completed(src, timeout=60)
        assert info["status"] == "failed", info
        error = info.get("error-desc")
        assert error
        assert await runstate(src) == "running"
        await wait_guest_runs(src)
    assert await runstate(dst) == "inmigrate"
    info = await dst.cmd("query-migrate")
    assert info["status"] == "setup" and info.get("socket-address"), info
    return error


async def _in_stderr(vm: Vm, text: str) -> bool:
    return text in vm.stderr_text()


async def then_correct_migration(src: Vm, dst: Vm, uri: str, pki: Pki) -> None:
    """The same source, with the right credentials, to the same destination."""
    await src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "good",
                                   "endpoint": "client", "dir": str(pki.client)})
    await src.set_params(**{"tls-creds": "good", "tls-hostname": ""})
    await migrate_ok(src, dst, uri)


def test_plaintext_source_to_tls_destination(vms, pki):
    async def body():
        src, dst, uri = await tls_pair(vms, pki, caps=RP)
        await src.set_params(**{"tls-creds": ""})           # "" is off
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst, dst_says="TLS handshake failed")
        assert error == CHANNEL_ERROR
        await then_correct_migration(src, dst, uri, pki)
    run_with(vms, body)


def test_tls_source_to_plaintext_destination(vms, pki):
    async def body():
        src, dst = await start_pair(vms, src_caps=RP)
        await add_creds(src, pki.client, "client")
        await src.set_params(**{"tls-creds": "tls0"})
        uri = await start_incoming(dst)
        await src.cmd("migrate", uri=uri)
        info = await wait_completed(src, timeout=60)
        assert info["status"] == "failed", info
        assert info["error-desc"].startswith("TLS handshake failed"), info
        assert await runstate(src) == "running"
        await wait_guest_runs(src)
        # The plaintext destination took the ClientHello for a stream: it failed, loaded
        # nothing and still waits (exit-on-error off).
        dinfo = await wait_completed(dst, timeout=60)
        assert dinfo["status"] == "failed", dinfo
        assert await runstate(dst) == "inmigrate"
        # A correct migration: to a TLS destination.
        dst2 = await vms.start("dst2", devices=list(dst.spec.devices), incoming="defer",
                               paused=True, walk_rate=dst.spec.walk_rate,
                               walk_end=dst.spec.walk_end)
        await dst2.set_caps(**RP)
        await add_creds(dst2, pki.server, "server")
        await dst2.set_params(**{"tls-creds": "tls0"})
        await migrate_ok(src, dst2, await start_incoming(dst2))
    run_with(vms, body)


def test_source_does_not_know_the_servers_ca(vms, pki, tmp_path):
    async def body():
        other = client_dir_variant(tmp_path, pki, "other-ca-trust", other_ca=True)
        # Trust another CA (its certificate as ca-cert.pem): the server is unknown.
        (other / "ca-cert.pem").write_bytes((other / "client-cert.pem").read_bytes())
        src, dst, uri = await tls_pair(vms, pki, caps=RP, src_dir=other)
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst)
        assert error == "The certificate hasn't got a known issuer"
        await then_correct_migration(src, dst, uri, pki)
    run_with(vms, body)


@pytest.mark.parametrize("variant,reason", [
    ("other-ca", "The certificate hasn't got a known issuer"),
    ("expired", "The certificate has expired"),
])
def test_destination_refuses_a_bad_client_certificate(vms, pki, tmp_path, variant, reason):
    async def body():
        bad = client_dir_variant(tmp_path, pki, variant, other_ca=variant == "other-ca",
                                 expired=variant == "expired")
        if variant == "expired":
            # The source's own sanity check refuses it first, in QEMU's words...
            src, dst = await start_pair(vms, src_caps=RP)
            with pytest.raises(ExecuteError, match=r"^The client certificate .*"
                                                   r"client-cert\.pem has expired$"):
                await add_creds(src, bad, "client")
            await src.cmd("quit")
            await dst.cmd("quit")
        # ... so the test turns it off to let the destination see the certificate.
        src, dst, uri = await tls_pair(vms, pki, caps=RP, src_dir=bad, authz=CLIENT_DN,
                                       src_creds={"sanity-check": False})
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst, dst_says=reason)
        # QEMU's return-path text, with the alert the destination's TLS sent.
        assert error is not None and error.startswith(CHANNEL_ERROR + " (TLS: "), error
        assert "ALERT" in error, error
        await then_correct_migration(src, dst, uri, pki)
    run_with(vms, body)


def test_hostname_mismatch(vms, pki):
    async def body():
        src, dst, uri = await tls_pair(vms, pki, caps=RP)
        await src.set_params(**{"tls-hostname": "wrong.example"})
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst)
        assert error == "Certificate does not match the hostname wrong.example"
        await then_correct_migration(src, dst, uri, pki)
    run_with(vms, body)


def test_client_identity_not_in_authz(vms, pki):
    async def body():
        src, dst, uri = await tls_pair(vms, pki, caps=RP, authz="CN=someone-else")
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst, dst_says=f"TLS x509 authz check for "
                                                        f"{CLIENT_DN} is denied")
        assert error == CHANNEL_ERROR       # it hung up after the handshake, as QEMU does
        # The rule allows this client now: the same destination takes it.
        await dst.cmd("object-del", id="auth0")
        await dst.cmd("object-add", **{"qom-type": "authz-list", "id": "auth0",
                                       "rules": [{"match": "C=GB,*,CN=livemig-client",
                                                  "policy": "allow", "format": "glob"}]})
        await then_correct_migration(src, dst, uri, pki)
    run_with(vms, body)


def _port(uri: str) -> tuple[str, int]:
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    return host, int(port)


def _client_hello(pki: Pki) -> bytes:
    """The first flight of a real TLS client (a memory BIO handshake), for truncation."""
    ctx = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "stall"])
def test_hostile_handshakes(vms, pki, kind):
    async def body():
        src, dst, uri = await tls_pair(vms, pki, caps=RP)
        peer = socket.create_connection(_port(uri), timeout=10)
        try:
            hello = _client_hello(pki)
            if kind == "garbage":
                peer.sendall(os.urandom(4096))
                peer.close()
            elif kind == "truncated":
                peer.sendall(hello[:len(hello) // 2])
                peer.close()
            else:
                peer.sendall(hello[:20])      # and then nothing, connection kept open
            if kind != "stall":
                await assert_refused(None, dst, dst_says="TLS handshake failed")
            else:
                await assert_refused(None, dst)
            # While the staller still holds its connection, a correct source gets through.
            await then_correct_migration(src, dst, uri, pki)
        finally:
            peer.close()
    run_with(vms, body)


def test_openssl_s_client_completes_a_handshake(vms, pki):
    """A standard client, with the test creds, against a livemig TLS listener."""
    async def body():
        src, dst, uri = await tls_pair(vms, pki)
        host, port = _port(uri)
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"{host}:{port}", "-verify_return_error",
            "-CAfile", str(pki.client / "ca-cert.pem"),
            "-cert", str(pki.client / "client-cert.pem"),
            "-key", str(pki.client / "client-key.pem"), "-verify_hostname", "localhost",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        text = out.decode(errors="replace")
        assert "Verify return code: 0 (ok)" in text, text
        assert "Protocol  : TLSv1.3" in text or "TLSv1.3" in text, text
        # It passed every check and then sent no stream: like QEMU, the destination
        # takes it for the migration, finds it empty, fails and loads nothing.
        dinfo = await wait_completed(dst, timeout=30)
        assert dinfo["status"] == "failed" and "Truncated" in dinfo["error-desc"], dinfo
        assert await runstate(dst) == "inmigrate"
    run_with(vms, body)


# -- pre-shared keys: tls-creds-psk (OpenSSL's PSK callbacks, crypto/psk.py) -------------------

PSK_KEY = "5a17" * 16
PSK_WRONG = "00" * 32


@pytest.fixture
def psk(tmp_path) -> tuple[Path, Path]:
    """(server dir, client dir): the server knows qemu and bob; the client has qemu's
    key, a wrong key for bob, and a key for mallory, whom the server does not know."""
    return (write_psk_dir(tmp_path / "psk-server", {"qemu": PSK_KEY, "bob": PSK_KEY}),
            write_psk_dir(tmp_path / "psk-client", {"qemu": PSK_KEY, "bob": PSK_WRONG,
                                                    "mallory": PSK_KEY}))


async def add_psk(vm: Vm, directory: Path, endpoint: str, ident: str = "tls0",
                  **extra: Any) -> None:
    await vm.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": ident,
                                  "endpoint": endpoint, "dir": str(directory), **extra})


async def psk_pair(vms, dirs: tuple[Path, Path], *, username: str | None = None,
                   caps: dict[str, bool] | None = None, authz: str | None = None,
                   multifd: int = 0) -> tuple[Vm, Vm, str]:
    src, dst = await _start(vms, caps, multifd)
    await add_psk(src, dirs[1], "client", **({"username": username} if username else {}))
    await add_psk(dst, dirs[0], "server")
    return src, dst, await _tls_params(src, dst, authz, multifd)


async def then_correct_psk_migration(src: Vm, dst: Vm, uri: str, client_dir: Path) -> None:
    await add_psk(src, client_dir, "client", "good")       # username qemu, the right key
    await src.set_params(**{"tls-creds": "good"})
    await migrate_ok(src, dst, uri)


@pytest.mark.parametrize("caps,multifd", [
    ({}, 0),
    ({"return-path": True, "switchover-ack": True, "events": True}, 0),
    ({"return-path": True}, 4),
], ids=["main", "return-path", "multifd-4"])
def test_psk_migration_completes_byte_exact(vms, psk, caps, multifd):
    async def body():
        src, dst, uri = await psk_pair(vms, psk, caps=caps, multifd=multifd, authz="qemu")
        await migrate_ok(src, dst, uri)
    run_with(vms, body)


@pytest.mark.parametrize("username,dst_says", [
    ("bob", "TLS handshake failed: BINDER_DOES_NOT_VERIFY"),
    ("mallory", "TLS handshake failed: BINDER_DOES_NOT_VERIFY: Username mallory not found "
                "in PSK file"),
], ids=["wrong-key", "unknown-username"])
def test_psk_refusals(vms, psk, username, dst_says):
    async def body():
        src, dst, uri = await psk_pair(vms, psk, username=username, caps=RP)
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst, dst_says=dst_says)
        # The source cannot tell a wrong key from an unknown name (GnuTLS's way too).
        assert error == "TLS handshake failed: SSLV3_ALERT_ILLEGAL_PARAMETER", error
        await then_correct_psk_migration(src, dst, uri, psk[1])
    run_with(vms, body)


def test_psk_username_not_in_authz(vms, psk):
    async def body():
        src, dst, uri = await psk_pair(vms, psk, username="bob", caps=RP, authz="qemu")
        # bob's key is right on this source: only the authz rule refuses him.
        await src.cmd("object-del", id="tls0")
        (psk[1] / "keys.psk").write_text(f"qemu:{PSK_KEY}\nbob:{PSK_KEY}\n")
        await add_psk(src, psk[1], "client", username="bob")
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst, dst_says="TLS PSK authz check for bob "
                                                        "is denied")
        assert error == CHANNEL_ERROR       # it hung up after the handshake
        await then_correct_psk_migration(src, dst, uri, psk[1])
    run_with(vms, body)


def test_x509_source_to_psk_destination(vms, pki, psk):
    async def body():
        src, dst, uri = await psk_pair(vms, psk, caps=RP)
        await add_creds(src, pki.client, "client", "x509")
        await src.set_params(**{"tls-creds": "x509"})
        await src.cmd("migrate", uri=uri)
        error = await assert_refused(src, dst, dst_says="TLS handshake failed")
        assert error is not None and error.startswith("TLS handshake failed: "), error
        await then_correct_psk_migration(src, dst, uri, psk[1])
    run_with(vms, body)
