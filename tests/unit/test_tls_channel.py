"""TLS pieces without a VM: the iovec gather, the DN livemig hands to authz,
and a TlsChannel pair over a real socketpair (OpenSSL both ends)
with one thread writing while another reads the same TLS stream."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import livemig.cli.object_types  # noqa: F401
from livemig.migration.tls import peer_name, tls_client, tls_server
from livemig.qom.object import ObjectRoot, visit_object_options
from livemig.transport import TransportError
from livemig.transport.channel import IOVEC, SocketChannel
from livemig.transport.tls import gather_iovec, iovec_chunks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tls_certs
from tls_certs import CLIENT_DN, make_pki  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["hdr", "ram"]), st.integers(0, 40),
                          st.sampled_from([0, 1, 8, 13, 4096, 8192, 3 * 4096])),
                max_size=30))
def test_gather_iovec_is_the_concatenation(entries):
    ram = np.random.default_rng(1).integers(0, 256, 48 * 4096, dtype=np.uint8)
    hdr = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)
    iov = np.zeros(len(entries), IOVEC)
    parts = []
    for i, (where, start, length) in enumerate(entries):
        buf = ram if where == "ram" else hdr
        offset = start * 4096 if where == "ram" else start * 50
        length = min(length, buf.size - offset)
        iov[i] = (buf.ctypes.data + offset, length)
        parts.append(buf[offset:offset + length])
    expected = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    assert np.array_equal(gather_iovec(iov), expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=40), st.integers(1, 9000))
def test_iovec_chunks_cut_in_order_within_the_limit(lengths, limit):
    iov = np.zeros(len(lengths), IOVEC)
    iov["base"] = np.arange(len(lengths), dtype=np.uint64)
    iov["len"] = lengths
    parts = iovec_chunks(iov, limit)
    assert np.array_equal(np.concatenate(parts) if parts else iov[:0], iov)
    for part in parts:
        assert part.size >= 1
        assert int(part["len"].sum()) <= limit or part.size == 1


def test_peer_name_is_qemus_gnutls_spelling():
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "A, B+C"),),
                        (("commonName", " x#"), ("userId", "7")))}
    assert peer_name(cert) == "C=GB,O=A\\, B\\+C,CN=\\ x#+UID=7"


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    root = ObjectRoot()
    for ident, endpoint, directory in (("srv", "server", pki.server),
                                       ("cli", "client", pki.client)):
        root.add(visit_object_options({"qom-type": "tls-creds-x509", "id": ident,
                                       "endpoint": endpoint, "dir": str(directory)}))
    root.add(visit_object_options({"qom-type": "authz-simple", "id": "who",
                                   "identity": CLIENT_DN}))
    root.add(visit_object_options({"qom-type": "authz-simple", "id": "nobody",
                                   "identity": "CN=nobody"}))
    return root


def _pair(creds, *, authz: str = "who", hostname: str = "localhost"):
    a, b = socket.socketpair()
    out: dict = {}

    def serve() -> None:
        try:
            out["server"] = tls_server(SocketChannel(b), creds.get("srv"), authz, creds)
        except TransportError as exc:
            out["error"] = exc
    t = threading.Thread(target=serve)
    t.start()
    try:
        client = tls_client(SocketChannel(a), creds.get("cli"), hostname)
    finally:
        t.join(30)
    return client, out


def test_both_directions_at_once_on_one_tls_stream(creds):
    client, out = _pair(creds)
    server = out["server"]
    data = np.random.default_rng(3).integers(0, 256, 8 << 20, dtype=np.uint8)
    back = bytes(range(256)) * 4096
    got = bytearray(data.size)
    got_back = bytearray(len(back))
    rp = client.return_path()               # the source's return-path reader

    def server_side() -> None:
        server.return_path().sendall(back)  # while it reads the stream below
    t = threading.Thread(target=server_side)
    t.start()
    reader = threading.Thread(target=rp.read_exact_into, args=(got_back,))
    reader.start()
    writer = threading.Thread(target=client.sendall, args=(data,))
    writer.start()
    server.read_exact_into(got)
    for th in (t, reader, writer):
        th.join(30)
    assert bytes(got) == data.tobytes() and bytes(got_back) == back
    assert client.bytes_sent == data.size
    client.close()
    assert server.recv_into(bytearray(10)) == 0      # EOF after the peer closed
    server.close()


def test_authz_and_hostname_refusals_in_qemus_words(creds):
    with pytest.raises(TransportError) as exc:
        _pair(creds, hostname="wrong.example")
    assert exc.value.desc == "Certificate does not match the hostname wrong.example"
    client, out = _pair(creds, authz="nobody")
    assert out["error"].desc == f"TLS x509 authz check for {CLIENT_DN} is denied"
    client.close()
    client, out = _pair(creds, authz="missing")
    assert out["error"].desc == "Cannot find QAuthZ object ID missing"
    client.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0, 7, 4096, 2 * 4096]), min_size=1, max_size=12),
       st.integers(0, 100))
def test_scatter_is_gathers_inverse(lengths, cut):
    from livemig.transport.tls import scatter_iovec, truncate_iovec
    ram = np.zeros(64 * 4096, np.uint8)
    iov = np.zeros(len(lengths), IOVEC)
    offset = 0
    for i, length in enumerate(lengths):
        iov[i] = (ram.ctypes.data + offset, length)
        offset += length + 4096                 # gaps stay zero
    data = np.random.default_rng(4).integers(1, 256, int(iov["len"].sum()), dtype=np.uint8)
    scatter_iovec(iov, data)
    assert np.array_equal(gather_iovec(iov), data)
    assert int(ram.astype(bool).sum()) == data.size   # nothing written outside
    n = data.size * cut // 100
    part = truncate_iovec(iov, n)
    assert int(part["len"].sum()) == n
