"""The PointReach env in plain numpy: state (x, y, vx, vy), action a force in [-1, 1]^2.

    v' = v + dt (GAIN a - DRAG v),   p' = p + dt v'
    reward = 1 - |p'| / ARENA_RADIUS - CTRL_COST |a|^2        (~1 at the centre, ~0 at the wall)
    terminated when |p'| > ARENA_RADIUS (the point left the arena) or the state is not finite

The reward is positive inside the arena, so leaving it (termination) loses the rest of the episode's reward:
the policy must learn to stay in, which a learner that ignored termination in imagination would not see.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

DT = 0.05
GAIN, DRAG = 4.0, 1.0
ARENA_RADIUS = 2.0
CTRL_COST = 0.05


class PointReachEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": round(1 / DT)}

    def __init__(self, render_mode: str | None = None) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.render_mode = render_mode
        self.dt = DT  # the control period maac-robot reads (else 1 / metadata["render_fps"])
        self.state = np.zeros(4)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.state = np.concatenate([self.np_random.uniform(-1.0, 1.0, 2), np.zeros(2)])
        return self.state.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        pos, vel = self.state[:2], self.state[2:]
        vel = vel + DT * (GAIN * a - DRAG * vel)
        pos = pos + DT * vel
        self.state = np.concatenate([pos, vel])
        dist = float(np.linalg.norm(pos))
        reward = 1.0 - dist / ARENA_RADIUS - CTRL_COST * float(np.square(a).sum())
        terminated = bool(not np.isfinite(self.state).all() or dist > ARENA_RADIUS)
        return self.state.copy(), reward, terminated, False, {"distance": dist}

    def render(self) -> np.ndarray:
        """A 64x64 top view: the arena's wall in grey, the point in red (`evaluate --video`, `sim --render`)."""
        size = 64
        ys, xs = np.mgrid[:size, :size]
        coords = (np.stack([xs, size - 1 - ys], -1) + 0.5) / size * 2 * ARENA_RADIUS * 1.1 - ARENA_RADIUS * 1.1
        r = np.linalg.norm(coords, axis=-1)
        frame = np.full((size, size, 3), 255, np.uint8)
        frame[np.abs(r - ARENA_RADIUS) < 0.05] = 128
        frame[np.linalg.norm(coords - self.state[:2], axis=-1) < 0.12] = (220, 30, 30)
        return frame
