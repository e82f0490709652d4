"""benchmarks/critic_probe.py and entropy_pressure.py: measurements on a checkpoint that leave the run untouched."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
from maac_robot.learn.config import config_from_dict
from maac_robot.learn.trainer import train

from tiny_configs import tiny

# benchmarks/ is a folder of scripts, not a package: its modules import each other by name from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
critic_probe = importlib.import_module("critic_probe")
entropy_pressure = importlib.import_module("entropy_pressure")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_critic_probe_restarts_each_variant_from_the_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(config_from_dict(tiny(train={"total_steps": 200})), run_dir, progress=False)
    before = (run_dir / "checkpoints" / "latest.pt").read_bytes()
    result = critic_probe.critic_probe(run_dir, updates=40, every=20, episodes=2)
    curves = result["bias_by_updates"]
    assert set(curves) == set(critic_probe.PROBE_VARIANTS)
    starts = {curve[0] for curve in curves.values()}
    assert len(starts) == 1 and math.isfinite(next(iter(starts))[1])  # every variant starts from the same critic
    assert all([u for u, _ in curve] == [0, 20, 40] for curve in curves.values())
    assert len({tuple(curve) for curve in curves.values()}) > 1  # the variants train differently
    fit = result["fit_at_checkpoint"]  # the critic against its own targets, before any probe update
    assert set(fit) == {"D_env, last 1000 steps", "D_env, all", "D_model, all"}
    assert fit["D_env, last 1000 steps"]["rows"] == 200 and fit["D_env, all"]["rows"] == 200  # a 200-step run
    assert all(math.isfinite(v) for row in fit.values() for v in row.values())
    assert math.isfinite(result["episode_reward"])
    assert (run_dir / "checkpoints" / "latest.pt").read_bytes() == before  # the run itself is only read


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    train(config_from_dict(tiny(train={"total_steps": 200})), run_dir, progress=False)
    return run_dir


def test_entropy_pressure_run_draws_start_states_from_the_checkpoints_buffers(tiny_run: Path) -> None:
    before = (tiny_run / "checkpoints" / "latest.pt").read_bytes()
    row = entropy_pressure.entropy_pressure_run(tiny_run, states=64, draws=2, name="tiny")
    assert (row["run"], row["env_step"], row["states"]) == ("tiny", 200, 64)
    assert len(row["pull_by_step"]) == 3 and all(math.isfinite(v) for v in row["pull_by_step"])  # horizon 2
    assert row == entropy_pressure.entropy_pressure_run(tiny_run, states=64, draws=2, name="tiny")  # seeded
    assert (tiny_run / "checkpoints" / "latest.pt").read_bytes() == before
