"""Why a trained policy fails: how its episodes end, and whether its critic and ensemble saw it coming.

A learning curve that falls, or stalls, has three usual suspects in MAAC: a model that does not predict
what happens (the pathwise gradient then follows a fiction), a critic whose values are wrong (the
terminal value γ^H·Q and the targets then mislead), or a policy that drifts somewhere both are right
about but the objective barely sees. `diagnose` measures each on real episodes of a run's checkpoint:

- critic bias: min-twin Q(s_t, a_t) against the realised *soft* return G_t on stochastic episodes, an
  unbiased one-sample estimate of the soft Q^π the critic is trained to fit;
- model foresight: for an episode that terminated, the share of elites whose open-loop mean prediction
  from k steps before the end, under the real actions, ends in a terminal state;
- model return: along a deterministic episode, the H-step discounted reward the elites predict from each
  real state under the real actions, against the realised one (H the actor's horizon). A model the actor
  exploits predicts more than the policy gets; one that predicts it right clears the model of a stall;
- the last state of each deterministic episode (what the evaluation scores), by its leading dims.

`entropy_pressure` asks a different question, why the temperature α settles where it does: automatic
tuning holds the entropy of the first action at its target, so α rises until the entropy bonus's push
on the policy's log-std balances the objective's pull against action noise. It splits that pull by
imagined step and by source (model rewards, terminal Q) and compares it with SAC's (horizon 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maac_robot.envs import make_env
from maac_robot.learn.agent import frozen, maac_policy_loss
from maac_robot.learn.evaluation import critic_bias, rollout_episode
from maac_robot.learn.rollout import model_rollout
from maac_robot.learn.trainer import LoadedRun

# The leading state dims that show how an episode ended (state = qpos + qvel, root position first).
LEADING_STATE_NAMES = {
    "InvertedPendulum-v5": ("cart x", "pole angle"),
    "Hopper-v5": ("x", "z", "torso angle"),
    "Walker2d-v5": ("x", "z", "torso angle"),
    "HalfCheetah-v5": ("x", "z", "torso angle"),
    "Ant-v5": ("x", "y", "z"),
}
FORESIGHT_STEPS = (1, 5, 20)


@torch.no_grad()
def elites_predicting_end(run: LoadedRun, states: Tensor, actions: Tensor, k: int) -> float:
    """Share of elites that, from the k-th state before the end and the real actions, predict a terminal state."""
    model, elites, end = run.model, run.model.elites, len(actions)
    state = states[end - k].expand(elites.numel(), 1, -1)
    for t in range(end - k, end):
        state = model.predict_members(state, actions[t].expand(elites.numel(), 1, -1), elites)[0]
    last_action = actions[end - 1].expand(*state.shape[:-1], -1)
    return round(float(run.task.termination_fn(states[end - 1].expand_as(state), last_action, state).float().mean()), 2)


@torch.no_grad()
def model_return(run: LoadedRun, states: Tensor, actions: Tensor, rewards: np.ndarray, k: int
                 ) -> dict[str, float] | None:
    """Mean over the start steps t with k real steps ahead of Σ_{j<k} γ^j r_{t+j}: as the elites predict it
    (mean over elites of open-loop mean predictions under the real actions, terminations masked as in the
    actor's objective) and as realised. None for an episode shorter than k."""
    model, elites, gamma = run.model, run.model.elites, run.config.agent.gamma
    starts = len(actions) - k + 1
    if starts <= 0:
        return None

    def real_action(j: int, state: Tensor) -> tuple[Tensor, None]:
        return actions[j:j + starts].expand(elites.numel(), starts, -1), None

    predicted = model_rollout(states[:starts].expand(elites.numel(), starts, -1), real_action,
                              lambda s, a: model.mean_step(s, a, elites),
                              run.task.reward_fn, run.task.termination_fn, horizon=k, gamma=gamma).returns[-1]
    realised = sum(gamma**j * rewards[j:j + starts] for j in range(k))
    return {"predicted": round(float(predicted.mean()), 3), "real": round(float(realised.mean()), 3)}


def std_pull(run: LoadedRun, start_states: Tensor, horizon: int, *, rewards: bool = True, terminal_q: bool = True,
             draws: int = 8, seed: int = 0) -> Tensor:
    """∂J/∂δ_t for t = 0..horizon, δ_t a shift added to the policy's log σ at imagined step t (t = horizon: the
    terminal actions), J the actor's objective without its entropy term (`maac_policy_loss` at α = 0) from
    `start_states`, mean over `draws` noise draws. Negative: noise at that step costs return, so the
    objective pulls σ down there. `rewards` / `terminal_q` False zero that part of J, splitting the pull by
    source; the same `seed` draws the same noise, so the two parts sum to the whole."""
    agent, cfg = run.agent, run.config.agent

    def no_q(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        return s.new_zeros(s.shape[0]), s.new_zeros(s.shape[0])

    def no_reward(s: Tensor, a: Tensor, s2: Tensor) -> Tensor:
        return s.new_zeros(s.shape[0])

    delta = torch.zeros(horizon + 1, requires_grad=True)
    grads = []
    with torch.random.fork_rng(), frozen(agent.critic, run.model):
        torch.manual_seed(seed)
        for _ in range(draws):
            step = iter(range(horizon + 1))  # maac_policy_loss calls the policy once per imagined step, in order
            pl = maac_policy_loss(
                start_states, lambda s, r: agent.actor.sample(s, repeat=r, log_std_shift=delta[next(step)]),
                run.model.step, agent.critic if terminal_q else no_q, run.task.reward_fn if rewards else no_reward,
                agent.termination_fn, horizon=horizon, num_samples=cfg.num_samples,
                terminal_q_samples=cfg.terminal_q_samples, gamma=cfg.gamma, alpha=0.0)
            grads.append(torch.autograd.grad(-pl.loss, delta)[0])
    return torch.stack(grads).mean(0)


def entropy_pressure(run: LoadedRun, start_states: Tensor, *, draws: int = 8, seed: int = 0) -> dict[str, Any]:
    """What sets α: the entropy bonus's push on the first action's log σ against the objective's pull.

    push = α·∂E[−log π(a_0|s_0)]/∂δ_0; pull = `std_pull` at the run's horizon, per imagined step and, at the
    first step, split into model rewards and terminal Q; and the first step's pull at horizons 0 (SAC's
    Q-only actor), 1, 2 and the run's own. An actor at its entropy target has push + Σ pull ≈ 0, so α is
    roughly −Σ pull / (∂E[−log π]/∂δ_0): whatever inflates the pull inflates α."""
    agent, horizon = run.agent, run.config.agent.horizon
    delta = torch.zeros((), requires_grad=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _, log_prob = agent.actor.sample(start_states, log_std_shift=delta)
    (entropy_slope,) = torch.autograd.grad(-log_prob.mean(), delta)
    pull = std_pull(run, start_states, horizon, draws=draws, seed=seed)
    by_horizon = {h: float(std_pull(run, start_states, h, draws=draws, seed=seed)[0])
                  for h in sorted({0, 1, 2, horizon})}
    first = {name: float(std_pull(run, start_states, horizon, rewards=r, terminal_q=q, draws=draws, seed=seed)[0])
             for name, r, q in (("rewards_only", True, False), ("terminal_q_only", False, True))}
    return {"alpha": agent.alpha, "entropy": -float(log_prob.detach().mean()), "entropy_slope": float(entropy_slope),
            "push": agent.alpha * float(entropy_slope), "pull_by_step": pull.tolist(),
            "pull_first_step": first, "pull_first_step_by_horizon": by_horizon}


def diagnose(run: LoadedRun, seeds: list[int],
             on_episode: Callable[[int, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Per reset seed, a deterministic episode (how the evaluation ends, the ensemble's foresight of a
    termination and of the actor's H-step return) and a stochastic one from the same reset (the critic's
    bias against its realised soft return). `on_episode(i, n, seed)` is called as each seed starts."""
    agent, gamma, horizon = run.agent, run.config.agent.gamma, max(run.config.agent.horizon, 1)
    names = LEADING_STATE_NAMES.get(run.config.env.id, ())
    env = make_env(run.config.env.id, max_episode_steps=run.config.env.max_episode_steps)
    out = []
    try:
        for i, seed in enumerate(seeds, start=1):
            if on_episode is not None:
                on_episode(i, len(seeds), seed)
            det = rollout_episode(agent, env, seed, deterministic=True)
            sto = rollout_episode(agent, env, seed, deterministic=False)
            foresight = {k: elites_predicting_end(run, det["states"], det["actions"], k) for k in FORESIGHT_STEPS
                         if det["terminated"] and k <= len(det["actions"])}
            with torch.no_grad():
                q_start = float(torch.min(*agent.critic(*(sto[k][:1].to(agent.device) for k in ("states", "actions")))))
            q, g = critic_bias(agent, sto, gamma)
            bias = q - g
            out.append({
                "seed": seed, "length": len(det["rewards"]), "return": round(float(det["rewards"].sum()), 1),
                "terminated": det["terminated"],
                "final_state": {k: round(float(v), 3) for k, v in zip(names, det["states"][-1])},
                "elites_predicting_end": foresight,
                "model_return": model_return(run, det["states"], det["actions"], det["rewards"], horizon),
                "model_return_steps": horizon,
                "stochastic_length": len(sto["rewards"]), "stochastic_return": round(float(sto["rewards"].sum()), 1),
                "q_start": round(q_start, 1),
                "soft_return_start": round(float(g[0]), 1) if len(g) else None,
                "q_bias_mean": round(float(bias.mean()), 1) if len(g) else None,
                "q_bias_max": round(float(bias.max()), 1) if len(g) else None,
            })
    finally:
        env.close()
    return out


__all__ = ["diagnose", "elites_predicting_end", "entropy_pressure", "model_return", "std_pull"]
