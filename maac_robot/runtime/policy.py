"""`Policy`: an exported policy as a Stable-Baselines3-style predictor, on onnxruntime alone (no torch).

    from maac_robot import Policy
    import gymnasium as gym

    policy = Policy.load("artifacts/hopper-1")
    env = gym.make(policy.env_id)                    # Gymnasium's default observation: no extra kwargs
    obs, _ = env.reset(seed=0)
    action, _ = policy.predict(obs)                  # deterministic; deterministic=False samples

`predict` takes what Gymnasium gives: one observation [obs_dim] or a batch [B, obs_dim] of `gym.make(env_id)`'s
default observation. It also takes the project's full state [state_dim] (`gym.make(env_id,
**manifest.state_layout.env_kwargs)`, what the sim and robot protocol carry) and the policy graph's own input
[net_obs_dim]; the manifest's `state_layout` says which dims of each the policy reads. Where two of these
sizes coincide their layouts coincide too (each is the state at a subset of indices, the policy's input a
subset of the others), so the size alone decides.

`to_net_obs` is the shape logic on its own, shared with the learner's `MAAC.predict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maac_robot.runtime.artifacts import DEFAULT_INTRA_OP_THREADS, Artifacts, Manifest, StateLayout, load_artifacts


def to_net_obs(observation: Any, state_dim: int, layout: StateLayout) -> tuple[np.ndarray, bool]:
    """The policy's input net_obs [B, N] (float32) from an observation or state, and whether it was a single one.

    Accepted: the env's default observation [obs_dim] / [B, obs_dim], the full state [state_dim] /
    [B, state_dim], or net_obs itself [N] / [B, N]. Anything else is a ValueError naming the sizes.
    """
    x = np.asarray(observation, dtype=np.float32)
    single = x.ndim == 1
    if single:
        x = x[None]
    picks = {len(layout.net_obs_idx): None, len(layout.obs_idx): layout.obs_net_idx, state_dim: layout.net_obs_idx}
    if x.ndim != 2 or x.shape[1] not in picks:
        n, o = len(layout.net_obs_idx), len(layout.obs_idx)
        forms = [f"the env's observation [{o}] or [B, {o}] (gym.make(env_id))"]
        if state_dim != o:
            forms.append(f"the full state [{state_dim}] or [B, {state_dim}] (gym.make(env_id, **{layout.env_kwargs}))")
        if n not in (o, state_dim):
            forms.append(f"the policy's input [{n}] or [B, {n}]")
        raise ValueError(f"expected one observation or a batch of them: {', or '.join(forms)}; "
                         f"got shape {list(np.shape(observation))}")
    idx = picks[x.shape[1]]
    return np.ascontiguousarray(x if idx is None else x[:, idx]), single


class Policy:
    """An exported policy (policy.onnx + manifest.json), verified on load, run by onnxruntime.

    `predict(observation, deterministic=True)` returns `(action, None)` like Stable-Baselines3's (the
    second item is SB3's recurrent state; this policy has none). Unlike SB3, `deterministic` defaults to
    True: the deployed action is the deterministic one (`maac-robot evaluate` and the controller's fallback).
    Stochastic actions draw their noise from a numpy Generator (`seed` at load, or `rng=` per call), so
    they are reproducible. Thread-safe for deterministic calls; a shared Generator is not.
    """

    def __init__(self, artifacts: Artifacts, seed: int | None = None) -> None:
        self.artifacts = artifacts
        self.manifest: Manifest = artifacts.manifest
        self.rng = np.random.default_rng(seed)
        self._low = np.array(self.manifest.act_low, dtype=np.float32)
        self._high = np.array(self.manifest.act_high, dtype=np.float32)

    @classmethod
    def load(cls, path: str | Path, *, seed: int | None = None, expected_env_id: str | None = None,
             intra_op_threads: int = DEFAULT_INTRA_OP_THREADS) -> Policy:
        """Load an artifact directory written by `maac-robot export` (every file's hash, the manifest and the
        policy graph's signature checked; only policy.onnx gets a session). `seed` seeds stochastic predict."""
        return cls(load_artifacts(path, expected_env_id, intra_op_threads, graphs=("policy",)), seed=seed)

    @property
    def env_id(self) -> str:
        return self.manifest.env_id

    @property
    def observation_dim(self) -> int:
        """Size of `gym.make(env_id)`'s observation."""
        return len(self.manifest.state_layout.obs_idx)

    @property
    def action_dim(self) -> int:
        return self.manifest.act_dim

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = True,
                *, rng: np.random.Generator | None = None) -> tuple[np.ndarray, None]:
        """The action for one observation [obs_dim] -> [act_dim], or a batch [B, obs_dim] -> [B, act_dim].

        `observation` is `gym.make(env_id)`'s (or the full state, or the policy's input; see `to_net_obs`).
        `state` and `episode_start` are accepted for SB3 compatibility (`evaluate_policy`) and ignored.
        Actions are float32 in env units, inside [act_low, act_high].
        """
        net_obs, single = to_net_obs(observation, self.manifest.state_dim, self.manifest.state_layout)
        if deterministic:
            noise = np.zeros((net_obs.shape[0], self.action_dim), np.float32)
        else:
            noise = (rng or self.rng).standard_normal((net_obs.shape[0], self.action_dim), dtype=np.float32)
        action = np.clip(self.artifacts.policy_net_obs(net_obs, noise)[2], self._low, self._high)
        return (action[0] if single else action), None

    def __repr__(self) -> str:
        return (f"Policy({str(self.artifacts.path)!r}, env_id={self.env_id!r}, obs_dim={self.observation_dim}, "
                f"act_dim={self.action_dim}, train_steps={self.manifest.train_steps})")


__all__ = ["Policy", "to_net_obs"]
