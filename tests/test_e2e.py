"""End to end on loopback: train a tiny InvertedPendulum run, export it, serve the sim, control it over ZeroMQ.

One module-scoped artifact (train ~10 s + export ~20 s on 2 cores), then lockstep (policy vs CEM on
the same seeds, through the `control --compare` entry point) and real time (25 Hz wall-clock ticks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from controller.run import control_from_cli, make_controller, run_episode
from maac_robot.runtime.config import ControllerConfig
from maac_robot.runtime.protocol import RobotClient
from sim_helpers import running_sim
from tiny_configs import deployable

ENV = "InvertedPendulum-v5"
EPISODE_STEPS = 40
TINY = deployable()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export_fixtures import train_and_export

    root = tmp_path_factory.mktemp("e2e")
    artifacts = train_and_export(root, TINY)
    (root / "task.yaml").write_text(yaml.safe_dump(TINY))
    return artifacts


def test_control_compare_lockstep_prints_the_table(artifacts: Path, capsys: pytest.CaptureFixture[str]):
    with running_sim(ENV, mode="lockstep", max_episode_steps=EPISODE_STEPS) as server:
        rc = control_from_cli(artifacts=artifacts, connect=server.endpoint, planner=None, episodes=2,
                              config=artifacts.parent / "task.yaml", seed=0, compare=True)
        counters = server.counters
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith(("| policy |", "| cem |"))]
    assert len(rows) == 2, out
    for row in rows:
        mean = float(row.split("|")[3].split("±")[0])
        assert np.isfinite(mean) and 0 < mean <= EPISODE_STEPS
    assert counters.clipped_actions == 0 and counters.rejected_actions == 0  # every action finite, in bounds
    assert "fallbacks: budget 0, late 0, busy 0, nonfinite 0, shape 0, error 0" in out  # lockstep: no deadline


@pytest.mark.parametrize("planner", ["policy", "cem"])
def test_realtime_episodes_at_the_native_rate(artifacts: Path, planner: str):
    from maac_robot.runtime.artifacts import load_artifacts

    arts = load_artifacts(artifacts)
    controller = make_controller(arts, ControllerConfig(**TINY["controller"]), planner, seed=0)
    with running_sim(ENV, mode="realtime", max_episode_steps=EPISODE_STEPS) as server, RobotClient(server.endpoint, timeout_s=1.0) as client:
        info = client.hello()
        assert info.mode == "realtime" and info.dt == pytest.approx(0.04)
        try:
            result = run_episode(client, controller, seed=1)
        finally:
            controller.close()
        counters = server.counters
    tel = result.telemetry.summary()
    assert np.isfinite(result.ret) and 0 < result.steps <= EPISODE_STEPS
    assert counters.clipped_actions == 0 and counters.rejected_actions == 0
    assert tel["steps"] == result.steps
    assert tel["latency_ms_median"] < 0.5 * 40  # within the planning budget, half the 40 ms period
    if planner == "cem":
        assert tel["iterations_mean"] > 0  # planning happened in real time, not only fallbacks


def test_up_runs_sim_and_controller_as_two_processes(artifacts: Path):
    """`maac-robot up`: the same `sim` and `control` commands the compose services run, as two OS processes."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "maac_robot.cli", "up", "--artifacts", str(artifacts),
           "--config", str(artifacts.parent / "task.yaml"), "--bind", f"tcp://127.0.0.1:{port}",
           "--episodes", "1", "--mode", "lockstep", "--planner", "cem"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[sim] sim: serving InvertedPendulum-v5 (lockstep" in result.stdout
    assert "[controller] [control] return over 1 episode(s):" in result.stdout


def test_up_refuses_artifacts_for_another_env(artifacts: Path, tmp_path: Path):
    from maac_robot.deploy import up_from_cli
    from maac_robot.runtime.errors import UserError

    other = tmp_path / "hopper.yaml"
    other.write_text(yaml.safe_dump({"env": {"id": "Hopper-v5"}}))
    with pytest.raises(UserError, match="Hopper-v5"):
        up_from_cli(artifacts=artifacts, config=other, bind="tcp://127.0.0.1:5599", episodes=1, mode="lockstep",
                    planner="cem")
    with pytest.raises(UserError, match="no artifacts at"):
        up_from_cli(artifacts=tmp_path / "missing", config=artifacts.parent / "task.yaml",
                    bind="tcp://127.0.0.1:5599", episodes=1, mode="lockstep", planner="cem")
