#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for BlockPull: QEMU, libvirt, kubectl, and a virtualenv
# (.venv) with the project and its test tools. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v qemu-system-x86_64 >/dev/null || packages+=(qemu-system-x86)
command -v qemu-img >/dev/null || packages+=(qemu-utils)
command -v kubectl >/dev/null || packages+=(kubernetes-client)
# libvirt: the daemon and virsh for the tests' private libvirtd (tests/support/virtlab; none is
# started system-wide), and the headers, compiler and pkg-config that libvirt-python builds with.
command -v libvirtd >/dev/null || packages+=(libvirt-daemon-system)
command -v virsh >/dev/null || packages+=(libvirt-clients)
pkg-config --exists libvirt 2>/dev/null || packages+=(libvirt-dev)
command -v gcc >/dev/null || packages+=(gcc)
command -v pkg-config >/dev/null || packages+=(pkg-config)
# promtool tests the PrometheusRule alerts in deploy/monitoring/ (Debian ships it with prometheus).
command -v promtool >/dev/null || packages+=(prometheus)
# The kubectl plugin's terminal test drives its live view in a real terminal.
command -v tmux >/dev/null || packages+=(tmux)
if ((${#packages[@]})); then
    echo "setup: installing ${packages[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ] \
    || [ tests/support/pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    # The product (editable, with its dev tools) and, as a distribution of its own, the
    # test-only code: the QEMU lab and the Kubernetes API stand-in (never in the product wheel).
    .venv/bin/python -m pip install -q -e '.[dev]' -e tests/support
    touch .venv/.installed
fi
