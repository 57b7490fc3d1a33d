"""TLS-PSK without a VM: OpenSSL's PSK callbacks installed on Python's ``ssl``
contexts (``crypto/psk.py``), ``keys.psk`` read as QEMU reads it, and real
handshakes between ``tls_client`` and ``tls_server`` over a socketpair, plus
``openssl s_client -psk`` (a standard client) against livemig's server side."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import livemig.cli.object_types  # noqa: F401
from livemig.crypto import psk
from livemig.crypto.tlscreds import psk_decode, psk_lookup
from livemig.migration.tls import tls_client, tls_server
from livemig.qapi.errors import QapiError
from livemig.qom.object import ObjectRoot, visit_object_options
from livemig.transport import TransportError
from livemig.transport.channel import SocketChannel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tls_certs
from tls_certs import make_pki, write_psk_dir  # noqa: E402

pytestmark = pytest.mark.timeout(60)

KEY = "9f3c" * 16                    # 32 bytes, as `psktool` makes them
OTHER_KEY = "77" * 32


def test_psk_is_available_in_this_python():
    """The layout checks pass on this CPython and OpenSSL: PSK is real here."""
    assert psk.probe() is None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert psk.ssl_ctx_pointer(ctx) == psk.ssl_ctx_pointer(ctx)
    assert psk.libssl().path.endswith(".so.3")


@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
def test_ssl_ctx_pointer_fails_closed():
    """Not a context of a known method: refused, nothing installed."""
    with pytest.raises(psk.PskUnavailable, match="not one of this libssl's"):
        psk.ssl_ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS))    # TLS_method()
    with pytest.raises(psk.PskUnavailable, match="layout"):
        psk.ssl_ctx_pointer(object())                            # type: ignore[arg-type]


def test_psk_lookup_is_qemus_lookup_key(tmp_path):
    path = tmp_path / "keys.psk"
    path.write_bytes(b"qemux:00\nqemu:0011\r\nqemu:ffff\nbob:zz\n\nalice:\n")
    assert psk_lookup(str(path), "qemu") == "0011\r"      # first line; only \n splits
    assert psk_lookup(str(path), "qem") is None            # a whole name before ':'
    assert psk_lookup(str(path), "bob") == "zz"
    assert psk_lookup(str(path), "alice") == ""
    assert psk_lookup(str(path), "nobody") is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF xg\r", max_size=12))
def test_psk_decode_takes_hex_only(text):
    expect = None
    if text and len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text):
        expect = bytes.fromhex(text)
    assert psk_decode(text) == expect


@pytest.fixture
def objects(tmp_path):
    root = ObjectRoot()
    server = write_psk_dir(tmp_path / "server", {"qemu": KEY, "bob": KEY})
    client = write_psk_dir(tmp_path / "client", {"qemu": KEY, "bob": OTHER_KEY,
                                                 "mallory": KEY})
    add = root.add
    add(visit_object_options({"qom-type": "tls-creds-psk", "id": "srv", "endpoint": "server",
                              "dir": str(server)}))
    for ident, user in (("cli", "qemu"), ("wrongkey", "bob"), ("unknown", "mallory")):
        add(visit_object_options({"qom-type": "tls-creds-psk", "id": ident,
                                  "endpoint": "client", "dir": str(client),
                                  "username": user}))
    add(visit_object_options({"qom-type": "authz-simple", "id": "qemu-only",
                              "identity": "qemu"}))
    add(visit_object_options({"qom-type": "authz-simple", "id": "bob-only",
                              "identity": "bob"}))
    return root


def _pair(objects, client_id: str, server_id: str = "srv", authz: str = ""):
    a, b = socket.socketpair()
    out: dict[str, Any] = {}

    def serve() -> None:
        try:
            out["server"] = tls_server(SocketChannel(b), objects.get(server_id), authz,
                                       objects, timeout=20)
        except TransportError as exc:
            out["error"] = exc
    t = threading.Thread(target=serve)
    t.start()
    try:
        try:
            out["client"] = tls_client(SocketChannel(a), objects.get(client_id), None,
                                       timeout=20)
        except TransportError as exc:
            out["client_error"] = exc
    finally:
        t.join(30)
    assert not t.is_alive()
    return out


def test_psk_handshake_and_both_directions(objects):
    out = _pair(objects, "cli", authz="qemu-only")
    client, server = out["client"], out["server"]
    assert client.ssl_object.version() == "TLSv1.3"
    assert server.ssl_object.cipher()[0].endswith("_SHA256")   # the PSK's hash
    assert psk.psk_was_used(client.ssl_object) and psk.psk_was_used(server.ssl_object)
    assert server.ssl_object.getpeercert() is None        # no certificate at all
    data = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
    got = bytearray(data.size)
    writer = threading.Thread(target=client.sendall, args=(data,))
    writer.start()
    server.read_exact_into(got)
    writer.join(30)
    server.return_path().sendall(b"ack")
    back = bytearray(3)
    client.return_path().read_exact_into(back)
    assert bytes(got) == data.tobytes() and back == b"ack"
    client.close()
    server.close()


def test_wrong_key_fails_both_ends(objects):
    out = _pair(objects, "wrongkey")
    assert "client" not in out and "server" not in out
    assert out["error"].desc.startswith("TLS handshake failed: "), out["error"].desc
    assert "not found" not in out["error"].desc       # bob is known: only the key is wrong
    assert out["client_error"].desc.startswith("TLS handshake failed: ")


def test_unknown_username_is_named_by_the_server(objects, tmp_path):
    out = _pair(objects, "unknown")
    desc = out["error"].desc
    assert desc.startswith("TLS handshake failed: "), desc
    assert desc.endswith(f": Username mallory not found in PSK file "
                         f"{tmp_path}/server/keys.psk"), desc
    # The client cannot tell an unknown name from a wrong key (a random key, as GnuTLS).
    assert out["client_error"].desc == _pair(objects, "wrongkey")["client_error"].desc


def test_authz_asks_about_the_username(objects):
    out = _pair(objects, "cli", authz="bob-only")
    assert out["error"].desc == "TLS PSK authz check for qemu is denied"
    out["client"].close()
    out = _pair(objects, "cli", authz="missing")
    assert out["error"].desc == "Cannot find QAuthZ object ID missing"
    out["client"].close()


def test_server_reads_keys_psk_at_each_handshake(objects, tmp_path):
    """GnuTLS reads the server's file per lookup: an edited file counts at once."""
    (tmp_path / "server" / "keys.psk").write_text(f"qemu:{OTHER_KEY}\n")
    assert "error" in _pair(objects, "cli")
    (tmp_path / "server" / "keys.psk").write_text(f"qemu:{KEY}\n")
    out = _pair(objects, "cli")
    assert "server" in out, out
    out["client"].close()
    out["server"].close()


def test_psk_client_refuses_a_certificate_server(objects, tmp_path):
    """A server that answers with a certificate instead of the key: refused (no CA
    is trusted by a PSK client), as GnuTLS's PSK-only client refuses it."""
    pki = make_pki(tmp_path / "pki")
    objects.add(visit_object_options({"qom-type": "tls-creds-x509", "id": "x509srv",
                                      "endpoint": "server", "dir": str(pki.server),
                                      "verify-peer": False}))
    out = _pair(objects, "cli", server_id="x509srv")
    assert "client" not in out
    assert out["client_error"].desc == "The certificate hasn't got a known issuer"


def test_tls12_peer_uses_a_psk_suite(objects, tmp_path):
    """A TLS 1.2 client (``priority`` without 1.3) still authenticates with the key."""
    objects.add(visit_object_options({"qom-type": "tls-creds-psk", "id": "tls12",
                                      "endpoint": "client", "dir": str(tmp_path / "client"),
                                      "priority": "NORMAL:-VERS-TLS1.3"}))
    out = _pair(objects, "tls12", authz="qemu-only")
    assert "server" in out, out
    assert out["server"].ssl_object.version() == "TLSv1.2"
    assert "PSK" in out["server"].ssl_object.cipher()[0]
    assert psk.psk_was_used(out["client"].ssl_object)
    out["client"].close()
    out["server"].close()


def test_client_object_refusals_in_qemus_words(tmp_path):
    root = ObjectRoot()
    d = write_psk_dir(tmp_path / "c", {"qemu": "xyz1"})

    def add(**props: Any) -> None:
        root.add(visit_object_options({"qom-type": "tls-creds-psk", "id": "p",
                                       "dir": str(d), **props}))
    with pytest.raises(QapiError, match=f"^Username nobody not found in PSK file "
                                        f"{d}/keys.psk$"):
        add(endpoint="client", username="nobody")
    with pytest.raises(QapiError, match=r"^Cannot set PSK client credentials: "):
        add(endpoint="client")                    # default username qemu, bad hex
    with pytest.raises(QapiError, match="^username should not be set when endpoint=server$"):
        add(endpoint="server", username="qemu")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
def test_openssl_s_client_with_the_key_completes_a_handshake(objects):
    """A standard client: ``openssl s_client -psk`` against livemig's PSK server."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    out: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            out["server"] = tls_server(SocketChannel(conn), objects.get("srv"), "qemu-only",
                                       objects, timeout=20)
            got = bytearray(5)
            out["server"].read_exact_into(got)
            out["got"] = bytes(got)
            out["server"].close()           # s_client -quiet ends when the peer does
        except TransportError as exc:
            out["error"] = exc
    t = threading.Thread(target=serve)
    t.start()
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                           "-psk_identity", "qemu", "-psk", KEY, "-quiet"],
                          input=b"hello", capture_output=True, timeout=30)
    t.join(30)
    listener.close()
    assert out.get("got") == b"hello", (out, proc.stderr)
