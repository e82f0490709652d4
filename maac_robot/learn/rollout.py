"""The imagined H-step rollout through a learned model (paper §4.3): one definition of the model return.

The actor's objective, the critics' model-expanded targets, the diagnostics' model return and the exported
plan graph all score imagined trajectories the same way, so they share this one function and the plan graph
the controller runs cannot drift from what the actor was trained on. From ŝ_0, for t < H:

    a_t ~ act(t, ŝ_t)                          the policy's draw, or a given action sequence
    ŝ_{t+1}, r̂_t = f̂(ŝ_t, a_t)                 a model step (sampled or mean; r̂ None: no learned reward)
    r_t = r̂_t, else r(ŝ_t, a_t, ŝ_{t+1})       (soft: r_t − α log π(a_t|ŝ_t))
    R_{t+1} = R_t + γ^t m_t r_t                R_0 = 0
    m_{t+1} = m_t · (1 − done(ŝ_t, a_t, ŝ_{t+1}))   m_0 = 1: nothing is earned after a predicted termination

and with a terminal value V the H-step return is  J = R_H + γ^H m_H V(ŝ_H).

Dynamics, rewards, terminations and values are plain callables over tensors whose last axis is the state
(or action), so the same code runs a [B, S] batch, [K, B, S] member trajectories and an ONNX export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

Dynamics = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]  # (s, a) -> (s', reward or None)
TransitionFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (s, a, s') -> reward or termination
# (t, ŝ_t) -> (a_t, log π(a_t|ŝ_t) or None when the actions are given rather than drawn)
ActFn = Callable[[int, Tensor], tuple[Tensor, Tensor | None]]


def transition_reward(reward: Tensor | None, reward_fn: TransitionFn | None, s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    """The model's learned reward if it predicts one, else the task's closed-form reward."""
    if reward is not None:
        return reward
    if reward_fn is None:
        raise ValueError("the dynamics predicts no reward and the task has no reward_fn")
    return reward_fn(s, a, s2)


def alive_after(alive: Tensor, termination_fn: TransitionFn | None, s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
    """Alive mask after the transition s -> s2: zero from a predicted termination on."""
    if termination_fn is None:
        return alive
    return alive * (~termination_fn(s, a, s2)).to(alive.dtype)


class ModelRollout(NamedTuple):
    """One imagined trajectory, step by step (lists indexed by t), each entry shaped like the state's rows."""

    states: list[Tensor]  # ŝ_0 … ŝ_H
    actions: list[Tensor]  # a_0 … a_{H−1}
    log_probs: list[Tensor | None]  # log π(a_t|ŝ_t), t < H
    returns: list[Tensor]  # R_0 … R_H: the discounted (soft) reward of the first t steps, R_t = Σ_{j<t} γ^j m_j r_j
    alive: list[Tensor]  # m_0 … m_H
    value: Tensor | None  # R_H + γ^H m_H V(ŝ_H), when a terminal value V was given


def model_rollout(
    start: Tensor,
    act: ActFn,
    dynamics: Dynamics,
    reward_fn: TransitionFn | None,
    termination_fn: TransitionFn | None,
    *,
    horizon: int,
    gamma: float,
    alpha: float | Tensor = 0.0,
    terminal_value: Callable[[Tensor], Tensor] | None = None,
) -> ModelRollout:
    """Roll `horizon` model steps from ŝ_0 = `start`, with rewards, termination masks and γ^t discounting.

    `act(t, ŝ_t)` gives the action at each step (called once per step, in order, before that step's model
    call, so random draws happen in a fixed order). `alpha` > 0 makes the rewards soft, r_t − α log π(a_t|ŝ_t)
    (the critics' targets, whose fixed point has entropy at every step); the actor charges entropy on its
    first action only and keeps `alpha` 0. `terminal_value(ŝ_H)` (e.g. min Q at a policy action) completes
    the H-step return R_H + γ^H m_H V(ŝ_H) in `value`. Gradients flow through everything that is
    reparameterised: the pathwise derivative of the MAAC objective is backprop through this loop.
    """
    soft = isinstance(alpha, Tensor) or alpha != 0.0  # a tensor α is never branched on: no host sync on a GPU
    state = start
    returns = torch.zeros_like(start[..., 0])
    alive = torch.ones_like(returns)
    path = ModelRollout([state], [], [], [returns], [alive], None)
    for t in range(horizon):
        action, log_prob = act(t, state)
        next_state, predicted = dynamics(state, action)
        reward = transition_reward(predicted, reward_fn, state, action, next_state)
        if soft:
            reward = reward - alpha * log_prob
        returns = returns + gamma**t * alive * reward
        alive = alive_after(alive, termination_fn, state, action, next_state)
        state = next_state
        path.actions.append(action), path.log_probs.append(log_prob)
        path.states.append(state), path.returns.append(returns), path.alive.append(alive)
    if terminal_value is None:
        return path
    value = terminal_value(state)
    return path._replace(value=returns + gamma**horizon * alive * value)
