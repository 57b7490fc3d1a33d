"""TLS between livemig and QEMU 10.0.2 with the same x509 credentials directories.

The machines differ (QEMU's q35 against livemig-pc), so no migration between
them can load; but each side's TLS and its checks run before a byte of the
stream is read, so the other side's answer tells whether TLS interoperates:

* livemig source -> QEMU destination (``tls-authz`` = the client's DN as
  livemig spells it): QEMU accepts the handshake and the identity, then
  refuses the stream: ``Machine type received is 'livemig-pc-10.0' and local
  is 'pc-q35-10.0'``; with another identity QEMU says ``TLS x509 authz check
  for <DN> is denied``, naming the DN it computed: livemig's spelling.
* QEMU source -> livemig destination: livemig's handshake and authz accept
  QEMU's GnuTLS client, then the load fails on QEMU's machine type.

The same both ways with ``tls-creds-psk`` (the same ``keys.psk`` files), and
the PSK refusals (wrong key, unknown username, authz) with QEMU's texts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_with, start_incoming, wait_completed
from e2e_helpers import runstate, wait_until

from livemig.cli.bench import walk_image
from livemig.cli.driver import QEMU_BINARY, Vm, VmSpec, qemu_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tls_certs
from tls_certs import CLIENT_DN, Pki, make_pki, write_psk_dir  # noqa: E402

pytestmark = [
    pytest.mark.skipif(qemu_available() is None,
                       reason=f"{QEMU_BINARY} is not installed: nothing to talk TLS with"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def start_qemu(vms, tmp_path: Path, name: str, *, incoming: bool) -> Vm:
    image = walk_image(str(tmp_path / f"{name}.img"), "16M")
    spec = VmSpec(engine="qemu", name=name, ram="64M", accel="auto", boot_image=image,
                  incoming="defer" if incoming else None, paused=incoming)
    vm = await Vm.start(spec, vms.workdir, timeout=30)
    vms.vms.append(vm)
    return vm


async def creds(vm: Vm, directory: Path, endpoint: str) -> None:
    await vm.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                  "endpoint": endpoint, "dir": str(directory)})


@pytest.mark.parametrize("identity", [CLIENT_DN, "CN=someone-else"])
def test_livemig_source_to_qemu_destination(vms, pki, tmp_path, identity):
    async def body():
        src = await vms.start("src", walk_end="16M")
        dst = await start_qemu(vms, tmp_path, "qdst", incoming=True)
        await creds(src, pki.client, "client")
        await creds(dst, pki.server, "server")
        await dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0",
                                       "identity": identity})
        await src.set_params(**{"tls-creds": "tls0"})
        await dst.set_params(**{"tls-creds": "tls0", "tls-authz": "auth0"})
        uri = await start_incoming(dst)
        await src.cmd("migrate", uri=uri)
        info = await wait_completed(src, timeout=60)
        assert info["status"] == "failed", info
        assert await runstate(src) == "running"
        if identity == CLIENT_DN:
            # TLS and the authz rule passed: what QEMU refuses is livemig's machine.
            await wait_until(lambda: _said(dst, "livemig-pc"), 30, "QEMU's machine error")
            assert "authz check" not in dst.stderr_text()
        else:
            # QEMU names the DN it computed from livemig's certificate: livemig's spelling.
            await wait_until(lambda: _said(dst, f"TLS x509 authz check for {CLIENT_DN} "
                                                "is denied"), 30, "QEMU's authz refusal")
    run_with(vms, body)


async def _said(vm: Vm, text: str) -> bool:
    return text in vm.stderr_text()


def test_qemu_source_to_livemig_destination(vms, pki, tmp_path):
    async def body():
        src = await start_qemu(vms, tmp_path, "qsrc", incoming=False)
        dst = await vms.start("dst", walk_end="16M", incoming="defer", paused=True)
        await creds(src, pki.client, "client")
        await creds(dst, pki.server, "server")
        await dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0",
                                       "identity": CLIENT_DN})
        await src.set_params(**{"tls-creds": "tls0"})
        await dst.set_params(**{"tls-creds": "tls0", "tls-authz": "auth0"})
        uri = await start_incoming(dst)
        await src.cmd("migrate", uri=uri)
        dinfo = await wait_completed(dst, timeout=60)
        # Through TLS and authz: the stream was read, and it is QEMU's machine.
        assert dinfo["status"] == "failed", dinfo
        assert "pc-q35" in dinfo["error-desc"], dinfo
        assert "TLS" not in dst.stderr_text(), dst.stderr_text()
        assert await runstate(dst) == "inmigrate"
        info = await wait_completed(src, timeout=60)
        assert info["status"] in ("failed", "completed"), info   # no return path: QEMU
    run_with(vms, body)


@pytest.mark.parametrize("case", ["nope", "not-creds", "server-creds", "unix-no-hostname"])
def test_tls_parameter_errors_like_qemu(vms, pki, tmp_path, case):
    """The same bad ``tls-*`` setting on a QEMU and a livemig source, each migrating
    to a listener that accepts: the same ``error-desc``."""
    import socket

    async def one(vm: Vm, uri: str) -> str:
        await creds(vm, pki.server, "server")      # a server endpoint: wrong on a source
        await vm.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0",
                                      "identity": "x"})
        target = {"nope": "nope", "not-creds": "auth0", "server-creds": "tls0",
                  "unix-no-hostname": "tls0"}[case]
        if case == "unix-no-hostname":
            await vm.cmd("object-del", id="tls0")
            await creds(vm, pki.client, "client")
        await vm.set_params(**{"tls-creds": target})
        await vm.cmd("migrate", uri=uri)
        info = await wait_completed(vm, timeout=60)
        assert info["status"] == "failed", info
        assert await runstate(vm) == "running"
        return info["error-desc"]

    async def body():
        if case == "unix-no-hostname":
            path = str(tmp_path / "mig.sock")
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            uri = f"unix:{path}"
        else:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        listener.listen(16)
        try:
            # QEMU 10 checks the hostname after the handshake, which this silent
            # listener never answers: livemig alone for that case (QEMU's text from
            # crypto/tlssession.c).
            q = (None if case == "unix-no-hostname" else
                 await one(await start_qemu(vms, tmp_path, "qsrc", incoming=False), uri))
            lm = await one(await vms.start("src", walk_end="16M"), uri)
        finally:
            listener.close()
        expected = {"nope": "No TLS credentials with id 'nope'",
                    "not-creds": "Object with id 'auth0' is not TLS credentials",
                    "server-creds": "Expected TLS credentials for a client endpoint",
                    "unix-no-hostname": "No hostname for certificate validation"}[case]
        assert q in (expected, None)
        assert lm == expected
    run_with(vms, body)


# -- tls-creds-psk: livemig's OpenSSL PSK callbacks against QEMU's GnuTLS ----------------------

PSK_KEY = "c0ffee" * 10 + "abcd"          # 32 bytes
PSK_WRONG = "11" * 32


@pytest.fixture
def psk(tmp_path) -> tuple[Path, Path]:
    """(server dir, client dir), as in test_tls_e2e: the server knows qemu and bob,
    the client has a wrong key for bob and a key for mallory (unknown to the server)."""
    return (write_psk_dir(tmp_path / "psk-server", {"qemu": PSK_KEY, "bob": PSK_KEY}),
            write_psk_dir(tmp_path / "psk-client", {"qemu": PSK_KEY, "bob": PSK_WRONG,
                                                    "mallory": PSK_KEY}))


async def psk_creds(vm: Vm, directory: Path, endpoint: str, **extra: str) -> None:
    await vm.cmd("object-add", **{"qom-type": "tls-creds-psk", "id": "tls0",
                                  "endpoint": endpoint, "dir": str(directory), **extra})


async def _psk_migrate(src: Vm, dst: Vm, psk: tuple[Path, Path], username: str | None,
                       authz: str | None) -> dict:
    await psk_creds(src, psk[1], "client", **({"username": username} if username else {}))
    await psk_creds(dst, psk[0], "server")
    dparams = {"tls-creds": "tls0"}
    if authz is not None:
        await dst.cmd("object-add", **{"qom-type": "authz-simple", "id": "auth0",
                                       "identity": authz})
        dparams["tls-authz"] = "auth0"
    await src.set_params(**{"tls-creds": "tls0"})
    await dst.set_params(**dparams)
    await src.cmd("migrate", uri=await start_incoming(dst))
    return await wait_completed(src, timeout=60)


async def _source_failed_and_runs(src: Vm, info: dict) -> None:
    assert info["status"] == "failed", info
    assert await runstate(src) == "running"


# What QEMU 10.0.2 says (GnuTLS 3.7.9) when the key does not match, seen here: as a
# source, of the alert livemig's OpenSSL sends; as a destination, of a bad binder
# (an unknown username too: GnuTLS tries a random key for it).
QEMU_SOURCE_BAD_KEY = "TLS handshake failed: A TLS fatal alert has been received."
QEMU_DESTINATION_BAD_KEY = "TLS handshake failed: An illegal parameter has been received."


@pytest.mark.parametrize("case", ["ok", "wrong-key", "unknown-username", "authz"])
def test_psk_qemu_source_to_livemig_destination(vms, psk, tmp_path, case):
    username = {"wrong-key": "bob", "unknown-username": "mallory"}.get(case)
    dst_says = {"ok": None, "wrong-key": "TLS handshake failed: BINDER_DOES_NOT_VERIFY",
                "unknown-username": "Username mallory not found in PSK file",
                "authz": "TLS PSK authz check for qemu is denied"}[case]

    async def body():
        src = await start_qemu(vms, tmp_path, "qsrc", incoming=False)
        dst = await vms.start("dst", walk_end="16M", incoming="defer", paused=True)
        info = await _psk_migrate(src, dst, psk, username,
                                  "someone-else" if case == "authz" else "qemu")
        if case == "ok":
            # Through the PSK handshake and authz: the stream was read, QEMU's machine.
            dinfo = await wait_completed(dst, timeout=60)
            assert dinfo["status"] == "failed" and "pc-q35" in dinfo["error-desc"], dinfo
            assert "TLS" not in dst.stderr_text(), dst.stderr_text()
            assert info["status"] in ("failed", "completed"), info   # no return path: QEMU
        else:
            await _source_failed_and_runs(src, info)
            await wait_until(lambda: _said(dst, dst_says), 30, f"livemig's {dst_says!r}")
            if case != "authz":
                assert info["error-desc"] == QEMU_SOURCE_BAD_KEY, info
            dinfo = await dst.cmd("query-migrate")
            assert dinfo["status"] == "setup", dinfo          # still listening
        assert await runstate(dst) == "inmigrate"
    run_with(vms, body)


@pytest.mark.parametrize("case", ["ok", "wrong-key", "unknown-username", "authz"])
def test_psk_livemig_source_to_qemu_destination(vms, psk, tmp_path, case):
    username = {"wrong-key": "bob", "unknown-username": "mallory"}.get(case)

    async def body():
        src = await vms.start("src", walk_end="16M")
        dst = await start_qemu(vms, tmp_path, "qdst", incoming=True)
        info = await _psk_migrate(src, dst, psk, username,
                                  "someone-else" if case == "authz" else "qemu")
        await _source_failed_and_runs(src, info)
        if case in ("ok", "authz"):
            # QEMU 10.0.2 asks no authz about a PSK session (crypto/tlssession.c: a
            # "nop" check), so even the "authz" case reaches QEMU's machine check.
            await wait_until(lambda: _said(dst, "livemig-pc"), 30, "QEMU's machine error")
            assert "authz" not in dst.stderr_text()
        else:
            assert info["error-desc"].startswith("TLS handshake failed: "), info
            await wait_until(lambda: _said(dst, QEMU_DESTINATION_BAD_KEY), 30,
                             "QEMU's handshake error")
            assert (await dst.cmd("query-migrate"))["status"] == "setup"
    run_with(vms, body)
