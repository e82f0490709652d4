"""The one imagined rollout (learn/rollout.py) that the actor, the critic targets, the diagnostics and the
plan graph share: rewards, termination masks, discounting and the terminal value, on a hand-checkable system."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from maac_robot.learn.rollout import model_rollout

GAMMA = 0.9


def drift(state: Tensor, action: Tensor) -> tuple[Tensor, None]:
    """s' = s + a, no learned reward (the closed-form one below is used)."""
    return state + action, None


def reward_is_next_state(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    return s2[..., 0]


def past_three(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    return s2[..., 0] > 3


def unit_steps(t: int, state: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ones_like(state), torch.full_like(state[..., 0], -2.0)


def test_returns_are_discounted_and_stop_at_a_predicted_termination() -> None:
    start = torch.tensor([[0.0], [2.0]])  # row 0 reaches 1, 2, 3, 4 (ends at 4); row 1 reaches 3, 4 (ends at 4)
    path = model_rollout(start, unit_steps, drift, reward_is_next_state, past_three, horizon=4, gamma=GAMMA,
                         terminal_value=lambda s: 10 * torch.ones_like(s[..., 0]))
    row0 = 1 + GAMMA * 2 + GAMMA**2 * 3 + GAMMA**3 * 4  # the terminating transition still earns its reward
    row1 = 3 + GAMMA * 4
    torch.testing.assert_close(path.returns[-1], torch.tensor([row0, row1]))
    torch.testing.assert_close(path.alive[-1], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(path.value, path.returns[-1])  # no terminal value after a termination
    assert len(path.states) == len(path.returns) == len(path.alive) == 5 and len(path.actions) == 4


def test_terminal_value_is_discounted_by_gamma_to_the_horizon() -> None:
    path = model_rollout(torch.zeros(3, 1), unit_steps, drift, reward_is_next_state, None, horizon=2, gamma=GAMMA,
                         terminal_value=lambda s: 5 * s[..., 0])
    torch.testing.assert_close(path.value, torch.full((3,), 1 + GAMMA * 2 + GAMMA**2 * 5 * 2))


def test_soft_rewards_charge_the_entropy_of_every_action() -> None:
    path = model_rollout(torch.zeros(1, 1), unit_steps, drift, reward_is_next_state, None, horizon=2, gamma=GAMMA,
                         alpha=0.5)
    torch.testing.assert_close(path.returns[-1], torch.tensor([(1 + 1.0) + GAMMA * (2 + 1.0)]))


def test_a_learned_reward_wins_and_no_reward_at_all_is_an_error() -> None:
    def learned(state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        return state + action, torch.full_like(state[..., 0], 7.0)

    path = model_rollout(torch.zeros(2, 1), unit_steps, learned, reward_is_next_state, None, horizon=1, gamma=GAMMA)
    torch.testing.assert_close(path.returns[-1], torch.full((2,), 7.0))
    with pytest.raises(ValueError, match="no reward_fn"):
        model_rollout(torch.zeros(2, 1), unit_steps, drift, None, None, horizon=1, gamma=GAMMA)


def test_horizon_zero_is_the_terminal_value_alone() -> None:
    path = model_rollout(torch.ones(4, 2), unit_steps, drift, reward_is_next_state, past_three, horizon=0,
                         gamma=GAMMA, terminal_value=lambda s: s.sum(-1))
    torch.testing.assert_close(path.value, torch.full((4,), 2.0))
    assert path.actions == [] and path.value is not None
