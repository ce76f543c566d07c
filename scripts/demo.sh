#!/usr/bin/env bash
# Set up if needed, then run the demo: a real three-image qcow2 chain, a real QEMU, and
# `blockpull pull` flattening the disk while QEMU runs, proven with qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python scripts/demo.py "$@"
