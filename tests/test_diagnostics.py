"""maac_robot.learn.diagnostics: the realised soft return it compares the critic with, and `maac-robot diagnose`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from maac_robot import cli
from maac_robot.learn.agent import maac_policy_loss
from maac_robot.learn.config import config_from_dict
from maac_robot.learn.diagnostics import diagnose, entropy_pressure, model_return, std_pull
from maac_robot.learn.evaluation import mean_critic_bias, measured_soft_returns, soft_returns
from maac_robot.learn.trainer import load_run, train

from tiny_configs import tiny


def test_soft_returns_add_the_entropy_of_every_next_state() -> None:
    rewards, entropies, alpha, gamma = np.array([1.0, 2.0, 3.0]), np.array([9.0, 0.5, -1.0]), 0.2, 0.9
    g2 = 3.0
    g1 = 2.0 + gamma * (alpha * -1.0 + g2)
    g0 = 1.0 + gamma * (alpha * 0.5 + g1)
    np.testing.assert_allclose(soft_returns(rewards, entropies, alpha, gamma), [g0, g1, g2])
    # α = 0: the plain discounted return; the start state's entropy never counts
    np.testing.assert_allclose(soft_returns(rewards, entropies, 0.0, gamma), [1 + 0.9 * 2 + 0.81 * 3, 2 + 0.9 * 3, 3])


def test_measured_soft_returns_drop_the_unknown_tail_of_a_cut_episode() -> None:
    episode = {"rewards": np.ones(500), "entropies": np.zeros(500), "terminated": False}
    assert len(measured_soft_returns(episode, 0.1, 0.99)) == 500 - 459  # γ^459 < 0.01 <= γ^458
    assert len(measured_soft_returns({**episode, "terminated": True}, 0.1, 0.99)) == 500
    assert len(measured_soft_returns({**episode, "rewards": np.ones(100), "entropies": np.zeros(100)}, 0.1, 0.99)) == 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("diag") / "run"
    train(config_from_dict(tiny(train={"total_steps": 200})), run_dir, progress=False)
    return run_dir


def test_diagnose_reports_each_episode(tiny_run: Path) -> None:
    rows = diagnose(load_run(tiny_run), [5, 6])
    assert [r["seed"] for r in rows] == [5, 6]
    assert any(r["terminated"] for r in rows)  # a 200-step policy drops the pole within the 60-step limit
    for r in rows:
        assert r["length"] >= 1 and math.isfinite(r["q_start"]) and set(r["final_state"]) == {"cart x", "pole angle"}
        if r["terminated"]:  # did the ensemble foresee the end of the deterministic episode?
            assert 1 in r["elites_predicting_end"]
            assert all(0.0 <= v <= 1.0 for v in r["elites_predicting_end"].values())
        # the stochastic episode's bias uses every step unless the time limit cut it (its tail is then unknown)
        cut = r["stochastic_length"] == 60
        assert (r["q_bias_mean"] is None) == cut and (cut or math.isfinite(r["q_bias_mean"]))
        assert r["model_return_steps"] == 2  # the tiny config's actor horizon
        if r["length"] >= 2:
            assert all(math.isfinite(v) for v in r["model_return"].values())
    assert diagnose(load_run(tiny_run), [5, 6]) == rows  # seeded: a rerun measures the same episodes


def test_model_return_masks_after_a_predicted_termination(tiny_run: Path) -> None:
    """With every elite predicting Δstate = 0, a state stays put: an upright pole earns 1 per step for k steps,
    a fallen one terminates on the first step and earns nothing after; the realised side is the plain sum."""
    run = load_run(tiny_run)
    with torch.no_grad():
        run.model.weights[-1].zero_()
        run.model.biases[-1].zero_()
        run.model.out_mean.zero_()
    upright, fallen = [0.0, 0.05, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]
    states = torch.tensor([upright, upright, upright, fallen, fallen])
    actions, rewards, gamma = torch.zeros(4, 1), np.array([1.0, 2.0, 3.0, 4.0]), run.config.agent.gamma
    m = model_return(run, states, actions, rewards, 2)  # start steps 0, 1, 2: upright, upright, upright
    assert m == {"predicted": pytest.approx(1 + gamma, abs=1e-3),
                 "real": pytest.approx(np.mean([1 + 2 * gamma, 2 + 3 * gamma, 3 + 4 * gamma]), abs=1e-3)}
    m = model_return(run, states[3:], actions[3:], rewards[3:], 1)  # one start, fallen: terminal, reward 0
    assert m == {"predicted": 0.0, "real": 4.0}
    assert model_return(run, states[:2], actions[:1], rewards[:1], 2) is None  # shorter than k


def test_diagnose_cli(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["diagnose", str(tiny_run), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("InvertedPendulum-v5 after 200 env steps") and out.count("\nseed ") == 2
    assert "Q(s0)" in out and "mean bias" in out and "ensemble foresight over" in out
    assert "2-step return along the deterministic episodes: predicted" in out
    assert cli.main(["diagnose", str(tiny_run), "--episodes", "0"]) == 2
    assert "--episodes must be positive" in capsys.readouterr().err
    assert cli.main(["diagnose", str(tiny_run / "missing")]) == 2


def test_mean_critic_bias_leaves_the_training_rng_alone(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    state = torch.get_rng_state()
    bias = mean_critic_bias(run.agent, run.config.env.id, [5, 6], run.config.agent.gamma, 60)
    assert torch.equal(torch.get_rng_state(), state)  # the trainer calls it between G2 steps
    assert bias is not None and math.isfinite(bias)
    rows = diagnose(run, [5, 6])  # the same episodes, steps weighted by episode instead of pooled
    lengths = [r["stochastic_length"] for r in rows]
    pooled = sum(r["q_bias_mean"] * n for r, n in zip(rows, lengths)) / sum(lengths)
    assert bias == pytest.approx(pooled, abs=0.1)  # per-episode means are rounded to 0.1


def _objective(run, starts: torch.Tensor, shift: torch.Tensor, seed: int) -> float:
    """The actor's objective without entropy, with `shift` added to log σ at each imagined step, seeded as std_pull."""
    cfg, agent = run.config.agent, run.agent
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        step = iter(range(len(shift)))
        pl = maac_policy_loss(starts, lambda s, r: agent.actor.sample(s, repeat=r, log_std_shift=shift[next(step)]),
                              run.model.step, agent.critic, run.task.reward_fn, agent.termination_fn,
                              horizon=len(shift) - 1, num_samples=cfg.num_samples,
                              terminal_q_samples=cfg.terminal_q_samples, gamma=cfg.gamma, alpha=0.0)
    return -float(pl.loss)


def test_std_pull_is_the_derivative_of_the_objective_in_each_steps_log_std(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    horizon = run.config.agent.horizon
    starts = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * 0.02  # near upright: no terminations
    pull = std_pull(run, starts, horizon, draws=1, seed=3)
    assert pull.shape == (horizon + 1,)
    eps = 1e-2
    for t in range(horizon + 1):
        e = torch.zeros(horizon + 1)
        e[t] = eps
        fd = (_objective(run, starts, e, 3) - _objective(run, starts, -e, 3)) / (2 * eps)
        assert float(pull[t]) == pytest.approx(fd, rel=0.05, abs=1e-4)


def test_entropy_pressure_splits_the_first_steps_pull_by_source_and_horizon(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    starts = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)) * 0.02
    p = entropy_pressure(run, starts, draws=2)
    horizon = run.config.agent.horizon
    assert len(p["pull_by_step"]) == horizon + 1
    parts = p["pull_first_step"]
    # same noise for each part: model rewards and terminal Q add up to the whole pull
    assert parts["rewards_only"] + parts["terminal_q_only"] == pytest.approx(p["pull_by_step"][0], rel=1e-4, abs=1e-6)
    assert set(p["pull_first_step_by_horizon"]) == {0, 1, 2}
    assert p["pull_first_step_by_horizon"][horizon] == pytest.approx(p["pull_by_step"][0])
    assert p["push"] == pytest.approx(p["alpha"] * p["entropy_slope"]) and p["entropy_slope"] > 0
    assert entropy_pressure(run, starts, draws=2) == p  # seeded
