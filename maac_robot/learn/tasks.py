"""Closed-form reward and termination of the built-in tasks, as differentiable torch functions.

MAAC's pathwise policy gradient flows through r(s, a, s') and the done mask, so for the tasks whose
rules we know we write Gymnasium v5's own reward and termination (same weights, healthy ranges,
control and contact costs) as functions of (state, action, next_state) under the state convention
of `envs.py`: state[..., 0] is root x, so forward velocity is (x' - x) / dt exactly as the env computes
it. Only tensor ops, and Python branches on configuration only, so the functions export to ONNX.

Known, measured deviations (tests/test_envs_tasks.py):
- Ant-v5 takes x-velocity from the torso's `xpos`, which MuJoCo computes *before* the last physics
  substep of a control step; the state holds the final qpos. Our (x' - x)/dt is the displacement over
  the true control interval; it differs from the env's by the substep lag (mean ~5e-3, max ~0.1 per step).
  All other Ant terms (ctrl, contact from the clipped cfrc_ext in the state, healthy) are exact.
- Hopper-v5's healthy check also bounds unclipped joint velocities by 100; the state holds velocities
  clipped to ±10, so that (physically implausible) case cannot be seen from the state.
For other envs `reward_fn` is None (the ensemble learns reward) and nothing terminates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from maac_robot.envs import EnvInfo, env_info

RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
TerminationFn = Callable[[Tensor, Tensor, Tensor], Tensor]
HealthyFn = Callable[[Tensor], Tensor]


def never_terminates(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    """All-False done mask shaped like the batch (HalfCheetah, unknown envs)."""
    return torch.zeros_like(next_state[..., 0], dtype=torch.bool)


@dataclass(frozen=True, eq=False)
class Task:
    """What the learner knows about an env beyond its dims: reward (None: learned) and termination."""

    info: EnvInfo
    reward_fn: RewardFn | None
    termination_fn: TerminationFn = never_terminates


@dataclass(frozen=True)
class _Locomotion:
    """Gymnasium v5 locomotion reward: forward velocity + healthy bonus - ctrl cost - contact cost.

    `healthy(next_state) -> bool` is None for tasks that are always healthy and never terminate.
    """

    dt: float
    ctrl_cost_weight: float
    healthy: HealthyFn | None = None
    healthy_reward: float = 1.0
    contact_dims: slice | None = None
    contact_cost_weight: float = 0.0

    def reward(self, state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
        reward = (next_state[..., 0] - state[..., 0]) / self.dt - self.ctrl_cost_weight * action.square().sum(-1)
        if self.healthy is not None:
            reward = reward + self.healthy_reward * self.healthy(next_state).to(reward.dtype)
        if self.contact_dims is not None:
            reward = reward - self.contact_cost_weight * next_state[..., self.contact_dims].square().sum(-1)
        return reward

    def termination(self, state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
        if self.healthy is None:
            return never_terminates(state, action, next_state)
        return ~self.healthy(next_state)


def _between(x: Tensor, low: float, high: float) -> Tensor:
    return (x > low) & (x < high)


def _hopper_healthy(s: Tensor) -> Tensor:
    # state = qpos[x, z, angle, 3 joints] + clipped qvel[6]; gym bounds state_vector()[2:] in (-100, 100)
    healthy_state = _between(s[..., 2:], -100.0, 100.0).all(-1)
    return healthy_state & _between(s[..., 1], 0.7, float("inf")) & _between(s[..., 2], -0.2, 0.2)


def _walker_healthy(s: Tensor) -> Tensor:
    return _between(s[..., 1], 0.8, 2.0) & _between(s[..., 2], -1.0, 1.0)


_ANT_QPOS_QVEL = 15 + 14  # qpos (x, y, z, quaternion, 8 joints) + qvel; cfrc_ext of 13 bodies x 6 follows


def _ant_healthy(s: Tensor) -> Tensor:
    z = s[..., 2]
    return torch.isfinite(s[..., :_ANT_QPOS_QVEL]).all(-1) & (z >= 0.2) & (z <= 1.0)


def _pendulum_termination(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    return ~torch.isfinite(next_state).all(-1) | (next_state[..., 1].abs() > 0.2)


def _pendulum_reward(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    """InvertedPendulum-v5 pays 1 for every step that does not terminate."""
    return (~_pendulum_termination(state, action, next_state)).to(next_state.dtype)


def _locomotion(dt: float) -> dict[str, _Locomotion]:
    return {
        "Hopper-v5": _Locomotion(dt, ctrl_cost_weight=1e-3, healthy=_hopper_healthy),
        "HalfCheetah-v5": _Locomotion(dt, ctrl_cost_weight=0.1),
        "Walker2d-v5": _Locomotion(dt, ctrl_cost_weight=1e-3, healthy=_walker_healthy),
        "Ant-v5": _Locomotion(dt, ctrl_cost_weight=0.5, healthy=_ant_healthy,
                              contact_dims=slice(_ANT_QPOS_QVEL, None), contact_cost_weight=5e-4),
    }


def get_task(env_id: str) -> Task:
    """The task of `env_id`: closed-form reward/termination for built-ins, learned reward otherwise."""
    info = env_info(env_id)
    if env_id == "InvertedPendulum-v5":
        return Task(info, _pendulum_reward, _pendulum_termination)
    spec = _locomotion(info.dt).get(env_id)
    if spec is None:
        return Task(info, reward_fn=None)
    return Task(info, spec.reward, spec.termination)
