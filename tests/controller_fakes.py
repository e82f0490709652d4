"""In-process stand-ins for `maac_robot.runtime.artifacts.Artifacts` and `RobotClient`, for controller tests.

The point mass has a known optimum: state x in R^A, x' = x + dt·a (+ a per-member bias),
reward -||x' - goal||² - c·||a||², zero terminal value. Its open-loop optimal sequence over H
steps is a linear least-squares problem (`optimal_sequence`), so a test can check that CEM finds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from maac_robot.runtime.protocol import PROTOCOL_VERSION, Observation


def _squash(u: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return low + (np.tanh(u) + 1.0) * 0.5 * (high - low)


@dataclass
class PointMass:
    """Artifacts-shaped point mass: .manifest, .policy, .ensemble, .plan, with the real call contracts."""

    goal: np.ndarray
    low: np.ndarray
    high: np.ndarray
    dt: float = 0.1
    cost: float = 0.01
    gamma: float = 0.99
    plan_horizon: int = 5
    num_models: int = 3
    elites: tuple[int, ...] = (0, 1)
    bias: np.ndarray | None = None  # [num_models, A] per-member drift; None: all members agree
    policy_mean: np.ndarray | None = None  # pre-tanh mean for every state; None: zeros (mid-bounds)
    policy_log_std: float = 0.0
    plan_calls: int = 0
    plan_delay: float = 0.0  # seconds each plan call sleeps: an artificially slow scorer

    def __post_init__(self) -> None:
        a = len(self.goal)
        self.manifest = SimpleNamespace(
            env_id="PointMass-v0", state_dim=a, act_dim=a, act_low=list(self.low), act_high=list(self.high),
            dt=self.dt, gamma=self.gamma, plan_horizon=self.plan_horizon, num_models=self.num_models,
            num_elites=len(self.elites), elites=list(self.elites), horizon=self.plan_horizon)
        if self.bias is None:
            self.bias = np.zeros((self.num_models, a))

    def policy(self, state: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        state = np.asarray(state, np.float32)
        mean = np.zeros_like(state) if self.policy_mean is None else np.broadcast_to(self.policy_mean, state.shape)
        log_std = np.full_like(state, self.policy_log_std)
        action = _squash(mean + np.exp(log_std) * noise, self.low, self.high)
        return mean.astype(np.float32), log_std.astype(np.float32), action.astype(np.float32)

    def ensemble(self, state: np.ndarray, action: np.ndarray) -> dict[str, np.ndarray]:
        nxt = state[None] + self.dt * action[None] + self.bias[:, None, :]
        reward = -((nxt - self.goal) ** 2).sum(-1) - self.cost * (action**2).sum(-1)[None]
        return {"next_state_mean": nxt.astype(np.float32), "next_state_logvar": np.zeros_like(nxt, np.float32),
                "reward": reward.astype(np.float32)}

    def plan(self, state: np.ndarray, actions: np.ndarray) -> np.ndarray:
        self.plan_calls += 1
        if self.plan_delay:
            time.sleep(self.plan_delay)
        p, h, _ = actions.shape
        if p % len(self.elites):
            raise ValueError(f"P={p} not a multiple of num_elites")
        bias = self.bias[np.asarray(self.elites)[np.arange(p) % len(self.elites)]]
        x = np.repeat(np.asarray(state, np.float64)[None], p, axis=0)
        ret = np.zeros(p)
        for t in range(h):
            x = x + self.dt * actions[:, t] + bias
            ret += self.gamma**t * (-((x - self.goal) ** 2).sum(-1) - self.cost * (actions[:, t] ** 2).sum(-1))
        return ret.astype(np.float32)

    def sequence_return(self, state: np.ndarray, sequence: np.ndarray) -> float:
        """Ensemble-mean return of one env-unit sequence [H,A] (each elite member once)."""
        e = len(self.elites)
        return float(self.plan(state, np.repeat(sequence[None], e, axis=0)).mean())

    def optimal_sequence(self, state: np.ndarray) -> np.ndarray:
        """argmax over unbounded sequences of the (bias-free) return: weighted linear least squares."""
        h = self.plan_horizon
        w = np.sqrt(self.gamma ** np.arange(h))
        lower = np.tril(np.ones((h, h)))
        design = np.vstack([w[:, None] * self.dt * lower, np.sqrt(self.cost) * np.diag(w)])
        seq = []
        for d in range(len(self.goal)):
            target = np.concatenate([w * (self.goal[d] - state[d]), np.zeros(h)])
            seq.append(np.linalg.lstsq(design, target, rcond=None)[0])
        return np.stack(seq, axis=1)


class FakeRobot:
    """A lockstep RobotClient over the point mass's true (bias-free) dynamics; records every action."""

    def __init__(self, model: PointMass, episode_steps: int = 20, mode: str = "lockstep") -> None:
        self.model, self.episode_steps, self.mode = model, episode_steps, mode
        self.actions: list[np.ndarray] = []
        self.info: SimpleNamespace | None = None
        self.stats = SimpleNamespace(dropped_observations=0)
        self.endpoint = "fake://"
        self._x = np.zeros(len(model.goal))
        self._t = 0

    def hello(self) -> SimpleNamespace:
        m = self.model.manifest
        self.info = SimpleNamespace(env_id=m.env_id, state_dim=m.state_dim, act_dim=m.act_dim,
                                    act_low=np.asarray(m.act_low),
                                    act_high=np.asarray(m.act_high), dt=m.dt, mode=self.mode,
                                    protocol_version=PROTOCOL_VERSION, owner_timeout_s=2.0)
        return self.info

    def reset(self, seed: int | None = None) -> Observation:
        self._x = np.random.default_rng(seed).uniform(-1, 1, len(self.model.goal))
        self._t = 0
        return self._observation(0.0, truncated=False)

    def step(self, action: np.ndarray) -> Observation:
        action = np.asarray(action, np.float64)
        self.actions.append(action.copy())
        self._x = self._x + self.model.dt * action
        self._t += 1
        reward = -float(((self._x - self.model.goal) ** 2).sum()) - self.model.cost * float((action**2).sum())
        return self._observation(reward, truncated=self._t >= self.episode_steps)

    def _observation(self, reward: float, truncated: bool) -> Observation:
        return Observation(seq=self._t, t_robot=self._t * self.model.dt, state=self._x.copy(), reward=reward,
                           terminated=False, truncated=truncated, info={}, session="fake", episode=0, step=self._t,
                           action_seq=None, t_received=time.time())
