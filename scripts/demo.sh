#!/usr/bin/env bash
# From nothing: install, train a small InvertedPendulum policy, export it to ONNX, start the sim and
# the CEM-MPC controller as two processes over ZeroMQ, and print returns and latency.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec maac-robot demo --config inverted_pendulum --out runs/demo "$@"
