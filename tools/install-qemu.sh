#!/usr/bin/env bash
# Install QEMU 10 (qemu-system-x86_64 and qemu-img), the reference livemig is
# compared with (livemig bench, the conformance tests). Idempotent; needs root.
#
#   Debian 12 (bookworm): QEMU 10 is in bookworm-backports; this script adds
#                         that suite from the archive the machine already uses.
#   Debian 13+, Ubuntu 25.10+: the distribution's own qemu-system-x86 is 10.x.
#   Other distributions: install QEMU >= 10.0 with the package manager
#                         (Fedora: qemu-system-x86-core; Arch: qemu-base).
#
# Without QEMU, livemig bench runs livemig alone and the conformance tests
# skip with the reason.
set -euo pipefail
want=10
have_major() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p'
}
if [ "$(have_major)" -ge "$want" ]; then
  qemu-system-x86_64 --version | head -1
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "install-qemu: run as root" >&2; exit 1; }
. /etc/os-release
export DEBIAN_FRONTEND=noninteractive
suite=()
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  mirror=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$mirror" ] || { echo "install-qemu: no Debian mirror in the apt sources" >&2; exit 1; }
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg \
    > /etc/apt/sources.list.d/livemig-bookworm-backports.sources
  suite=(-t bookworm-backports)
elif [ "${ID:-}" != debian ] && [ "${ID:-}" != ubuntu ]; then
  echo "install-qemu: on ${PRETTY_NAME:-this system}, install QEMU >= $want.0 with its" \
       "package manager" >&2
  exit 1
fi
apt-get update -qq
apt-get install -y -qq "${suite[@]}" qemu-system-x86 qemu-utils >/dev/null
if [ "$(have_major)" -lt "$want" ]; then
  echo "install-qemu: got $(qemu-system-x86_64 --version | head -1); livemig compares" \
       "with QEMU $want" >&2
  exit 1
fi
qemu-system-x86_64 --version | head -1
