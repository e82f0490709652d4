"""The layer contracts in pyproject.toml hold: checked by import-linter on the real import graph, so the
torch-free runtime, the sim/controller independence and the absence of cycles are enforced, not promised."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_controller_process_never_loads_torch():
    code = ("import sys, controller.run, maac_robot.runtime.artifacts, maac_robot.cli;"
            "from maac_robot.cli import build_parser; build_parser();"
            "bad = [m for m in ('torch', 'gymnasium', 'mujoco', 'maac_robot.learn.trainer') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_a_command_whose_extra_is_missing_names_the_extra():
    """On a runtime-only install `maac-robot sim` (needs Gymnasium) says which extra to install, in one line."""
    code = ("import sys; sys.modules['gymnasium'] = None;"  # None in sys.modules makes the import fail
            "from maac_robot.cli import main;"
            "sys.exit(main(['sim', '--config', 'inverted_pendulum', '--bind', 'ipc:///tmp/maac-no-such.sock']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install 'maac-robot[sim]'" in result.stderr and "gymnasium" in result.stderr
