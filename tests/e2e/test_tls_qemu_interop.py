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
from tls_certs import CLIENT_DN, Pki, make_pki  # noqa: E402

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
