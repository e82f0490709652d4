#!/usr/bin/env bash
# Create .venv and install torch (CPU build, first) and the project. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: 2.13.0 resolves to the CPU build here; any other spec would pull GBs of CUDA wheels.
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || { echo "[setup] installing torch 2.13.0 (CPU)"; pip install -q torch==2.13.0; }
echo "[setup] installing maac-robot with the learner, the sim, video (render), sweeps (Ray) and the test tools"
pip install -q -e ".[train,render,test,sweep]"
