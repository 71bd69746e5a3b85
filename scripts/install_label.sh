#!/usr/bin/env bash
# Installs MONAI Label 0.8.5 for apps/quality_checker WITHOUT replacing the CPU torch by a CUDA build.
#
# Default: a separate venv (.venv-label) holding the label stack's pins (numpy<2 for pydicom-seg, pandas<3
# because pandas 3 needs numpy>=2); it reuses the core environment's torch, MONAI, ignite, ... through a .pth
# file (scripts/label_core_pth.py) that appends the core interpreter's site-packages AFTER the venv's own, so
# the pins win. The core environment ($PYTHON, default python3: a venv or the system Python) stays on numpy 2.
# (Not `venv --system-site-packages`: from a venv's python that exposes the BASE interpreter's packages.)
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
  "$PY" -c "import torch" 2>/dev/null || {
    echo "install_label.sh: the core environment ($PY) has no torch; run scripts/install.sh first" >&2
    exit 1
  }
  if [ ! -x "$LABEL_VENV/bin/python" ]; then
    "$PY" -m venv "$LABEL_VENV"
  elif grep -qi "include-system-site-packages *= *true" "$LABEL_VENV/pyvenv.cfg" 2>/dev/null; then
    "$PY" -m venv --clear "$LABEL_VENV"  # made by an older version of this script: start clean
  fi
  # rewritten every time: the core environment may have moved or changed
  "$PY" scripts/label_core_pth.py "$LABEL_VENV" >/dev/null
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
