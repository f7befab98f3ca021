#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine, as root: the Debian packages the suite drives,
# then a virtualenv (.venv) with the project and its Python dependencies. Safe to run every time:
# it installs only what is missing and reinstalls the venv only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "ci/setup.sh: must run as root (namespaces, veth, tc, netfilter)" >&2
    exit 2
fi

DEBS=(mininet iproute2 iptables nftables tcpdump tshark ethtool procps iputils-ping python3 python3-venv chromium
      qemu-system-x86 busybox-static cpio gcc libc6-dev zstd)
missing=()
for pkg in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "ci/setup.sh: installing Debian packages: ${missing[*]}"
    # tshark asks whether non-root users may capture; answer for it.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "ci/setup.sh: $PYTHON is older than 3.11" >&2
    exit 2
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "ci/setup.sh: creating .venv"
    rm -rf .venv
    "$PYTHON" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
