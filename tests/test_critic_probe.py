"""benchmarks/sample_efficiency.py `critic-probe`: policy evaluation from a checkpoint under each target/data variant."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from maac_robot.config import config_from_dict
from maac_robot.trainer import train

from test_trainer import _tiny

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_efficiency.py"
_spec = importlib.util.spec_from_file_location("sample_efficiency", _PATH)
sample_efficiency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_efficiency)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_critic_probe_restarts_each_variant_from_the_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(config_from_dict(_tiny(train={"total_steps": 200})), run_dir, progress=False)
    before = (run_dir / "checkpoints" / "latest.pt").read_bytes()
    result = sample_efficiency.critic_probe(run_dir, updates=40, every=20, episodes=2)
    curves = result["bias_by_updates"]
    assert set(curves) == set(sample_efficiency.PROBE_VARIANTS)
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
