"""Real episodes of a policy: the one rollout that training evaluation, `evaluate`, `diagnose` and the SAC
baseline all use, and the critic's bias measured on them.

A policy here is any `state -> (action, -log π(action|state))` (NaN entropy when deterministic), so a
MAAC agent and a Stable-Baselines3 model are evaluated by the same loop on the same reset seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maac_robot.envs import env_info, make_env
from maac_robot.video import VideoWriter, check_video_support
from maac_robot.learn.agent import MAACAgent

Policy = Callable[[np.ndarray], tuple[np.ndarray, float]]


def agent_policy(agent: MAACAgent, deterministic: bool) -> Policy:
    """The agent's actor as a `Policy`: its mean action (deterministic) or a sample with its −log π."""

    @torch.no_grad()
    def policy(state: np.ndarray) -> tuple[np.ndarray, float]:
        s = torch.as_tensor(state, dtype=torch.float32, device=agent.device)
        if deterministic:
            return agent.actor.deterministic(s).cpu().numpy(), float("nan")
        action, log_prob = agent.actor.sample(s)
        return action.cpu().numpy(), -float(log_prob)

    return policy


def run_episode(policy: Policy, env: Any, seed: int, on_frame: Callable[[np.ndarray], None] | None = None
                ) -> dict[str, Any]:
    """One episode from reset `seed`: states [T+1, S], actions [T, A], rewards [T], −log π of the taken
    actions [T] and whether it terminated (rather than being cut by the time limit). `on_frame` gets
    `env.render()` after the reset and after every step (an env made with render_mode="rgb_array")."""
    state, _ = env.reset(seed=seed)
    if on_frame is not None:
        on_frame(env.render())
    states, actions, rewards, entropies, terminated, truncated = [state], [], [], [], False, False
    while not (terminated or truncated):
        action, entropy = policy(state)
        actions.append(action)
        entropies.append(entropy)
        state, reward, terminated, truncated, _ = env.step(action)
        if on_frame is not None:
            on_frame(env.render())
        states.append(state)
        rewards.append(float(reward))
    return {"states": torch.as_tensor(np.array(states), dtype=torch.float32),
            "actions": torch.as_tensor(np.array(actions), dtype=torch.float32),
            "rewards": np.array(rewards), "entropies": np.array(entropies), "terminated": bool(terminated)}


def rollout_episode(agent: MAACAgent, env: Any, seed: int, deterministic: bool) -> dict[str, Any]:
    """`run_episode` of the agent with its policy noise seeded by `seed` too, so a rerun measures the same
    episode; the caller's torch RNG streams are left where they were, the agent's CUDA one included
    (manual_seed reseeds every device: unrestored, each evaluation would restart the trainer's GPU noise
    from the same seed)."""
    with torch.random.fork_rng(devices=[agent.device] if agent.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return run_episode(agent_policy(agent, deterministic), env, seed)


def evaluate_policy(policy: MAACAgent | Policy, env_id: str, seeds: list[int], max_episode_steps: int | None = None,
                    *, video: str | Path | None = None,
                    on_episode: Callable[[int, int, int, float, int], None] | None = None) -> np.ndarray:
    """Returns of a policy (an agent: its deterministic policy), one episode per reset seed, on a fresh env.

    `video`: also write the episodes, one after another, to this mp4 (the `[render]` extra; rendering
    does not change the episodes). `on_episode(i, n, seed, return, length)` is called after each one.
    """
    if isinstance(policy, MAACAgent):
        policy = agent_policy(policy, deterministic=True)
    if video is not None:
        check_video_support("--video")  # before MuJoCo is imported: it picks EGL
    env = make_env(env_id, max_episode_steps=max_episode_steps, render_mode="rgb_array" if video else None)
    writer = VideoWriter(video, fps=1.0 / env_info(env_id).dt) if video is not None else None
    returns = []
    try:
        for i, seed in enumerate(seeds, start=1):
            rewards = run_episode(policy, env, seed, writer.add if writer is not None else None)["rewards"]
            returns.append(float(rewards.sum()))
            if on_episode is not None:
                on_episode(i, len(seeds), seed, returns[-1], len(rewards))
        return np.asarray(returns, dtype=float)
    finally:
        env.close()
        if writer is not None:
            writer.close()


def soft_returns(rewards: np.ndarray, entropies: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """Realised soft returns G_t = r_t + γ(α·H_{t+1} + G_{t+1}), G past the last step 0.

    The critic learns the soft Q of the stochastic policy (its targets add −α·log π at every next state),
    so it is compared with that policy's realised return plus the same entropy terms: with `entropies[t]`
    = −log π(a_t|s_t) of the action actually taken, G_t is a one-sample unbiased estimate of Q^π(s_t, a_t)
    (entropies[0], at the start, is unused).
    """
    out = np.zeros(len(rewards))
    acc = 0.0
    for t in reversed(range(len(rewards))):
        bonus = alpha * entropies[t + 1] if t + 1 < len(rewards) else 0.0
        acc = rewards[t] + gamma * (bonus + acc)
        out[t] = acc
    return out


def measured_soft_returns(episode: dict[str, Any], alpha: float, gamma: float) -> np.ndarray:
    """`soft_returns` of a stochastic episode, cut to the steps whose return is known: all of a terminated
    episode; all but the last log(0.01)/log(γ) steps of one the time limit cut (its future is unknown)."""
    g = soft_returns(episode["rewards"], episode["entropies"], alpha, gamma)
    if episode["terminated"]:
        return g
    return g[: max(len(g) - int(np.ceil(np.log(0.01) / np.log(gamma))), 0)]


def critic_bias(agent: MAACAgent, episode: dict[str, Any], gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(min-twin Q(s_t, a_t), realised soft return G_t) on the steps of a stochastic episode whose return is known."""
    g = measured_soft_returns(episode, agent.alpha, gamma)
    states, actions = (episode[k][: len(g)].to(agent.device) for k in ("states", "actions"))
    with torch.no_grad():
        q = torch.min(*agent.critic(states, actions)).cpu().numpy()
    return q, g


def mean_critic_bias(agent: MAACAgent, env_id: str, seeds: list[int], gamma: float,
                     max_episode_steps: int | None = None) -> float | None:
    """Mean of Q − G over the known-return steps of one stochastic episode per seed (None if there are none):
    the trainer logs it at each evaluation, so an overestimating critic shows on the curve as it grows."""
    env = make_env(env_id, max_episode_steps=max_episode_steps)
    try:
        pairs = [critic_bias(agent, rollout_episode(agent, env, seed, deterministic=False), gamma) for seed in seeds]
    finally:
        env.close()
    diffs = np.concatenate([q - g for q, g in pairs])
    return float(diffs.mean()) if len(diffs) else None
