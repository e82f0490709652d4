#!/usr/bin/env bash
# The robot computer's install, checked end to end: a fresh venv with `pip install .` (no extras) must not
# contain torch, Gymnasium or MuJoCo, and its `maac-robot inspect` and `maac-robot control` must drive a sim
# (run from the full .venv) with artifacts the full install trained and exported. CI runs this after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORK=$(mktemp -d /tmp/maac-runtime-check.XXXXXX)
SIM_PID=""
cleanup() { [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

echo "[runtime] full install: a short InvertedPendulum run, exported"
.venv/bin/maac-robot train --config inverted_pendulum --steps 300 --out "$WORK/run" \
  --set train.initial_random_steps=250 --set train.eval_every=300 --set train.eval_episodes=1 \
  --set model.max_epochs=2 --set agent.updates_per_step=1 >"$WORK/train.log" 2>&1 \
  || { cat "$WORK/train.log"; echo "[runtime] FAIL: training in the full install failed"; exit 1; }
.venv/bin/maac-robot export "$WORK/run" --out "$WORK/artifacts"

echo "[runtime] fresh venv with 'pip install .' (no extras)"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip install -q .
for module in torch gymnasium mujoco onnx; do
  if "$WORK/venv/bin/python" -c "import $module" 2>/dev/null; then
    echo "[runtime] FAIL: the runtime-only install can import $module"; exit 1
  fi
done
echo "[runtime] no torch, gymnasium, mujoco or onnx in the runtime venv"

"$WORK/venv/bin/maac-robot" inspect "$WORK/artifacts"
ENDPOINT="ipc://$WORK/robot.sock"
.venv/bin/maac-robot sim --config inverted_pendulum --bind "$ENDPOINT" --mode lockstep &
SIM_PID=$!
timeout 120 "$WORK/venv/bin/maac-robot" control --artifacts "$WORK/artifacts" --connect "$ENDPOINT" \
  --config inverted_pendulum --planner cem --episodes 1 --no-reconnect
echo "[runtime] OK: the torch-free controller drove the sim through one episode"
