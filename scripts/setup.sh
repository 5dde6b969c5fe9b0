#!/usr/bin/env bash
# Create .venv with unetrpp, its test tools and the baselines' libraries (MONAI, dynamic-network-architectures).
# torch is pinned to the CPU build 2.13.0: an unpinned `torch` would pull a multi-GB CUDA build. On a CUDA
# machine, install the torch build you need first; pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "setup.sh: Python >= 3.10 needed" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test,monai]"
# nnU-Net's networks: without its declared timm (whose torchvision would replace the CPU torch); the U-Nets need
# only torch and numpy
.venv/bin/pip install -q --no-deps "dynamic-network-architectures>=0.3.1"
