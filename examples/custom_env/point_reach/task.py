"""PointReach's reward and termination as torch functions of (state, action, next_state), batched over any
leading axes: what `maac_robot.register_task` takes. They must equal the env's own (tests check it), be
differentiable where MAAC differentiates (the reward), and use tensor ops only, so they export to ONNX."""

from __future__ import annotations

import torch
from torch import Tensor

from point_reach.env import ARENA_RADIUS, CTRL_COST


def reward(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    dist = torch.linalg.vector_norm(next_state[..., :2], dim=-1)
    return 1.0 - dist / ARENA_RADIUS - CTRL_COST * action.square().sum(-1)


def terminated(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    dist = torch.linalg.vector_norm(next_state[..., :2], dim=-1)
    return ~torch.isfinite(next_state).all(-1) | (dist > ARENA_RADIUS)
