#!/usr/bin/env bash
# Installs MONAI Label 0.8.5 for apps/quality_checker WITHOUT replacing the CPU torch by a CUDA build.
#
# Default: a separate venv (.venv-label, created with --system-site-packages so it reuses the core
# environment's torch, MONAI, ignite and qgssl_monai) holding the label stack's pins (numpy<2 for
# pydicom-seg, pandas<3 because pandas 3 needs numpy>=2). The core environment stays on numpy 2.
#
#   bash scripts/install_label.sh                 # -> .venv-label
#   LABEL_VENV=/opt/label bash scripts/install_label.sh
#   LABEL_VENV=none bash scripts/install_label.sh # into the current interpreter (downgrades numpy to <2!)
#
# monailabel's own requirements pull monai[...,torchvision] and sam2; PyPI torchvision drags torch to a
# multi-GB CUDA build and does not import beside the local torch CPU wheel, so monailabel is installed
# with --no-deps plus its runtime requirements listed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LABEL_VENV=${LABEL_VENV:-.venv-label}

if [ "$LABEL_VENV" != "none" ]; then
  if [ ! -x "$LABEL_VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$LABEL_VENV"
  fi
  PY="$LABEL_VENV/bin/python"
fi

torch_before=$("$PY" -c "import torch; print(torch.__version__)")

"$PY" -m pip install --no-deps "monailabel==0.8.5"
# the requirement list lives in setup.cfg's [label] extra (one place)
mapfile -t LABEL_REQUIREMENTS < <("$PY" -c '
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
for line in cfg["options.extras_require"]["label"].splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
        print(line)
')
"$PY" -m pip install "${LABEL_REQUIREMENTS[@]}"
# timeloop has no wheel; its sdist needs setuptools at build time
"$PY" -m pip install wheel setuptools
"$PY" -m pip install --no-build-isolation timeloop
"$PY" -m pip install --no-deps -e .

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
  echo "install_label.sh: torch changed from $torch_before to $torch_after; reinstall the CPU wheel" >&2
  exit 1
fi
"$PY" -c "import monailabel, monai, torch, qgssl_monai.serving.label_logic; print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', torch.__version__)"
echo "MONAI Label ready: $PY (start the app with $(dirname "$PY")/monailabel start_server --app apps/quality_checker ...)"
