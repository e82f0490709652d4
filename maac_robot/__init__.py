"""maac-robot: Model-Augmented Actor-Critic (Clavera et al., ICLR 2020) from training to deployment.

Two parts with one contract between them: `maac_robot.runtime` (torch-free: protocol, artifacts,
recordings, the robot side's config) and `maac_robot.learn` (torch: ensemble, agent, trainer,
export). This module imports neither, so a robot computer without torch can import the package.

The Stable-Baselines3-style API is offered here and imported on first use (PEP 562):

    from maac_robot import MAAC, Policy
    MAAC("inverted_pendulum", run_dir="runs/ip").learn(4000)     # torch: maac_robot.learn.maac
    Policy.load("artifacts/ip").predict(obs)                      # onnxruntime only: maac_robot.runtime.policy
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MAAC", "Policy", "__version__"]

if TYPE_CHECKING:
    from maac_robot.learn.maac import MAAC
    from maac_robot.runtime.policy import Policy

_LAZY = {"MAAC": "maac_robot.learn.maac", "Policy": "maac_robot.runtime.policy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'maac_robot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
