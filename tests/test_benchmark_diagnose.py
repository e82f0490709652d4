"""The value-bias diagnostic of benchmarks/sample_efficiency.py (`diagnose`): its soft return and a run through it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from maac_robot.config import config_from_dict
from maac_robot.trainer import train

from test_trainer import _tiny

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_efficiency.py"
_spec = importlib.util.spec_from_file_location("sample_efficiency", _PATH)
sample_efficiency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_efficiency)


def test_soft_returns_add_the_entropy_of_every_next_state() -> None:
    rewards, entropies, alpha, gamma = np.array([1.0, 2.0, 3.0]), np.array([9.0, 0.5, -1.0]), 0.2, 0.9
    g2 = 3.0
    g1 = 2.0 + gamma * (alpha * -1.0 + g2)
    g0 = 1.0 + gamma * (alpha * 0.5 + g1)
    np.testing.assert_allclose(sample_efficiency.soft_returns(rewards, entropies, alpha, gamma), [g0, g1, g2])
    # α = 0: the plain discounted return; the start state's entropy never counts
    np.testing.assert_allclose(sample_efficiency.soft_returns(rewards, entropies, 0.0, gamma),
                               [1 + 0.9 * 2 + 0.81 * 3, 2 + 0.9 * 3, 3])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_diagnose_run_reports_each_episode(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(config_from_dict(_tiny(train={"total_steps": 200})), run_dir, progress=False)
    result = sample_efficiency.diagnose_run(run_dir, episodes=2, task="inverted_pendulum")
    assert result["env_step"] == 200 and len(result["episodes"]) == 2
    assert any(ep["terminated"] for ep in result["episodes"])  # a 200-step policy drops the pole within 60 steps
    for ep in result["episodes"]:
        assert ep["length"] >= 1 and math.isfinite(ep["q_start"]) and math.isfinite(ep["soft_return_start"])
        assert set(ep["final_state"]) == {"cart x", "pole angle"}
        if ep["terminated"]:  # the deterministic episode ended: did the ensemble foresee it?
            assert 1 in ep["elites_predicting_end"]
            assert all(0.0 <= v <= 1.0 for v in ep["elites_predicting_end"].values())
        # the stochastic episode's bias uses every step unless the time limit cut it (then its tail is unknown)
        cut = ep["stochastic_length"] == 60
        assert (ep["q_bias_mean"] is None) == cut and (cut or math.isfinite(ep["q_bias_mean"]))


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
    assert (run_dir / "checkpoints" / "latest.pt").read_bytes() == before  # the run itself is only read
