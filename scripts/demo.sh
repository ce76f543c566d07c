#!/usr/bin/env bash
# Set up if needed, then run the demo: a real three-image qcow2 chain, a real QEMU, the API
# stand-in and the node agent; a BlockPull applied with kubectl flattens the disk while QEMU
# runs, and qemu-img proves the result. Everything it starts is stopped again, also on Ctrl-C.
# Options (see scripts/demo.py --help): --bandwidth 16Mi, --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python scripts/demo.py "$@"
