"""maac-robot: Model-Augmented Actor-Critic (Clavera et al., ICLR 2020) from training to deployment.

Two parts with one contract between them: `maac_robot.runtime` (torch-free: protocol, artifacts,
recordings, the robot side's config) and `maac_robot.learn` (torch: ensemble, agent, trainer,
export). This module imports neither, so a robot computer without torch can import the package.

The Stable-Baselines3-style API is offered here and imported on first use (PEP 562):

    from maac_robot import MAAC, Policy
    MAAC("inverted_pendulum", run_dir="runs/ip").learn(4000)     # torch: maac_robot.learn.maac
    Policy.load("artifacts/ip").predict(obs)                      # onnxruntime only: maac_robot.runtime.policy
    register_task("MyEnv-v0", reward_fn="mypkg.task:reward")      # Gymnasium only: maac_robot.envs

`register_task` gives the learner the closed-form reward/termination of an env of your own (README, "Your own
env"); call it where your package calls `gymnasium.register`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MAAC", "Policy", "__version__", "register_task"]

if TYPE_CHECKING:
    from maac_robot.learn.maac import MAAC
    from maac_robot.envs import register_task
    from maac_robot.runtime.policy import Policy

_LAZY = {"MAAC": "maac_robot.learn.maac", "Policy": "maac_robot.runtime.policy", "register_task": "maac_robot.envs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'maac_robot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
