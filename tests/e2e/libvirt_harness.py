"""Two libvirt daemons on one machine, as two hosts (issue 18's setup).

Each ``libvirtd`` runs in its own mount and UTS namespace (``unshare``) with
private ``/etc/libvirt``, ``/run/libvirt``, ``/var/{lib,cache,log}/libvirt``
bind-mounted from a directory of its own, its own hostname and ``host_uuid``
(libvirt refuses to migrate to "the same host" by either), and a
``qemu.conf`` that runs emulators as root with no security driver, no
cgroups and no namespaces. ``virsh`` reaches each through its socket
(``qemu:///system?socket=...``). The daemon's QMP traffic is logged
(``qemu_monitor`` filter) so a test can read what libvirt sent.

Used by ``tests/e2e/test_libvirt.py``; by hand::

    python3 tests/e2e/libvirt_harness.py /tmp/libvirt-pair   # starts A and B, prints URIs
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

# Inside the namespace -> the directory under the daemon's root bound there.
_BINDS = (("/etc/libvirt", "etc"), ("/run/libvirt", "run"), ("/var/lib/libvirt", "lib"),
          ("/var/cache/libvirt", "cache"), ("/var/log/libvirt", "log"))
PACKAGES = ("libvirt-daemon-driver-qemu", "libvirt-daemon", "libvirt-clients")


def libvirt_missing() -> str | None:
    """Why two daemons cannot run here (None: they can)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool in ("libvirtd", "virsh", "unshare"):
        if shutil.which(tool, path=path) is None:
            return f"{tool} not installed (Debian: apt-get install {' '.join(PACKAGES)})"
    if os.geteuid() != 0:
        return "two libvirt daemons need root (mount namespaces, qemu.conf user=root)"
    probe = subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True)
    if probe.returncode:
        return f"unshare --mount --uts failed: {probe.stderr.decode().strip()}"
    return None


def install_libvirt() -> str | None:
    """Install the Debian packages if apt can (CI); returns why not, or None."""
    if libvirt_missing() is None:
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return libvirt_missing()
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                   capture_output=True, timeout=240)
    return libvirt_missing()


@dataclass
class Daemon:
    """One libvirtd in its own namespaces, rooted at ``root``."""

    name: str
    root: str
    migration_ports: tuple[int, int]
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return os.path.join(self.root, "run", "libvirt-sock")

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log(self) -> str:
        return os.path.join(self.root, "log", "libvirtd.log")

    def domain_log(self, domain: str) -> str:
        """libvirt's per-domain log: the emulator's command line and its stderr."""
        return os.path.join(self.root, "log", "qemu", f"{domain}.log")

    def path(self, inside: str) -> str:
        """Where a path inside the daemon's namespace lives outside it."""
        for target, sub in _BINDS:
            if inside == target or inside.startswith(target + "/"):
                return os.path.join(self.root, sub, inside[len(target) + 1:])
        return inside

    def write_config(self) -> None:
        for _, sub in _BINDS:
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        low, high = self.migration_ports
        etc = os.path.join(self.root, "etc")
        with open(os.path.join(etc, "libvirtd.conf"), "w") as f:
            f.write(f'host_uuid = "{self.host_uuid}"\n'
                    'unix_sock_group = "root"\nunix_sock_rw_perms = "0700"\n'
                    'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                    'log_filters = "1:qemu.qemu_monitor 1:qemu.qemu_process 3:*"\n'
                    'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"\n')
        with open(os.path.join(etc, "qemu.conf"), "w") as f:
            f.write('user = "root"\ngroup = "root"\nsecurity_driver = "none"\n'
                    "dynamic_ownership = 0\nremember_owner = 0\n"
                    "cgroup_controllers = [ ]\nnamespaces = [ ]\n"
                    f"migration_port_min = {low}\nmigration_port_max = {high}\n"
                    'stdio_handler = "file"\n')
        # libvirt.conf (for clients started inside) and nothing else: no default network.
        open(os.path.join(etc, "libvirt.conf"), "w").close()
        # The QEMU driver resolves its built-in user before it reads qemu.conf: give the
        # namespace a passwd/group with Debian's libvirt-qemu (the host's stay untouched).
        for name, line in (("passwd", "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/bin/false"),
                           ("group", "libvirt-qemu:x:64055:\nkvm:x:64056:")):
            with open(f"/etc/{name}") as f:
                text = f.read()
            with open(os.path.join(self.root, name), "w") as f:
                f.write(text if "\nlibvirt-qemu:" in text else text.rstrip("\n") + f"\n{line}\n")

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        for target, _ in _BINDS:
            os.makedirs(target, exist_ok=True)   # the mount points (empty on the host)
        script = "".join(f"mount --bind {os.path.join(self.root, sub)} {target} && "
                         for target, sub in (*_BINDS, ("/etc/passwd", "passwd"),
                                             ("/etc/group", "group")))
        script += (f"hostname livemig-{self.name} && exec libvirtd "
                   f"--config /etc/libvirt/libvirtd.conf "
                   f"--pid-file {os.path.join(self.root, 'libvirtd.pid')}")
        stderr = open(os.path.join(self.root, "libvirtd.stderr"), "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True)
        stderr.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd {self.name} exited {self.proc.returncode}: "
                                   + self.stderr_text())
            if os.path.exists(self.socket) and self.virsh("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd {self.name} did not answer: {self.stderr_text()}")
            time.sleep(0.1)

    def stderr_text(self) -> str:
        with open(os.path.join(self.root, "libvirtd.stderr"), errors="replace") as f:
            return f.read()[-2000:]

    def virsh(self, *args: str, check: bool = True, timeout: float = 120,
              ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
        return result

    def stop(self) -> None:
        """Destroy its domains (their emulators are its children), then end it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        listed = self.virsh("list", "--name", check=False)
        for domain in listed.stdout.split():
            self.virsh("destroy", domain, check=False)
        self.proc.send_signal(signal.SIGTERM)   # unshare exec'd sh, sh exec'd libvirtd
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_pair(workdir: str, first_port: int = 23100) -> tuple[Daemon, Daemon]:
    """Daemons A and B, each with its own migration port range."""
    a = Daemon("a", os.path.join(workdir, "a"), (first_port, first_port + 49))
    b = Daemon("b", os.path.join(workdir, "b"), (first_port + 50, first_port + 99))
    a.start()
    try:
        b.start()
    except BaseException:
        a.stop()
        raise
    return a, b


if __name__ == "__main__":
    pair = start_pair(sys.argv[1] if len(sys.argv) > 1 else "/tmp/libvirt-pair")
    for daemon in pair:
        print(f"{daemon.name}: pid {daemon.proc.pid if daemon.proc else '?'} {daemon.uri}")
