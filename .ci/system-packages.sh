#!/usr/bin/env bash
# System packages the tests use beyond Python: an OpenSSH server (on-device
# benchmarks against a local sshd), ARM cross compilers (TVM cross builds, the BlockFFN
# kernels' NEON build) and qemu-user to run that build,
# `file` / binutils (to check what was built), and g++ (C-simulation of generated HLS C++). Debian and Ubuntu only;
# installs only what is missing, as root or through sudo. Safe to rerun.
set -euo pipefail

PACKAGES=(g++ openssh-server gcc-aarch64-linux-gnu g++-aarch64-linux-gnu gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf qemu-user file binutils)

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-packages: not a Debian/Ubuntu system; install these with your package manager: ${PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "system-packages: need root or sudo to install: ${missing[*]}" >&2
    exit 1
fi

apt() {
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -o=Dpkg::Use-Pty=0 "$@"
}

echo "system-packages: installing ${missing[*]}"
# The package lists may be stale or absent on a fresh machine: update only when the first try fails.
if ! apt install -y --no-install-recommends "${missing[@]}" >/dev/null; then
    apt update >/dev/null
    apt install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
