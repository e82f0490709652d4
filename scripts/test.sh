#!/usr/bin/env bash
# Install (idempotent) and run the test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -p no:cacheprovider "$@"
