"""Small randomly initialised actor/critic/ensemble for the export and artifact tests, and a trained tiny run
with its artifacts for the tests that deploy one.

The ensemble is fitted for one epoch on random transitions so its normalisation statistics and
elite set are non-trivial: a graph that dropped the normaliser or mapped particles to the wrong
member would then disagree with PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from maac_robot.learn.agent import Actor, TwinQ
from maac_robot.runtime.artifacts import Manifest
from maac_robot.learn.config import ModelConfig
from maac_robot.learn.ensemble import GaussianEnsemble
from maac_robot.learn.export import export_artifacts
from maac_robot.learn.tasks import Task, get_task


@dataclass
class Components:
    task: Task
    actor: Actor
    critic: TwinQ
    model: GaussianEnsemble
    gamma: float = 0.95
    horizon: int = 3


def random_components(env_id: str, *, learned_reward: bool = False, seed: int = 0, num_models: int = 5,
                      num_elites: int = 3, hidden: int = 32) -> Components:
    """Random modules for `env_id`; `learned_reward` swaps the closed-form reward for an ensemble output."""
    torch.manual_seed(seed)
    task = get_task(env_id)
    if learned_reward:
        task = replace(task, reward_fn=None)
    info = task.info
    actor = Actor(info.state_dim, info.act_dim, hidden, 2, info.net_obs_idx, info.act_low, info.act_high)
    critic = TwinQ(info.state_dim, info.act_dim, hidden, 2, info.net_obs_idx)
    cfg = ModelConfig(num_models=num_models, num_elites=num_elites, hidden=hidden, layers=2, max_epochs=1,
                      batch_size=64)
    model = GaussianEnsemble(info.state_dim, info.act_dim, num_models=num_models, num_elites=num_elites,
                             hidden=hidden, layers=2, learn_reward=learned_reward, net_obs_idx=info.net_obs_idx,
                             min_logvar=cfg.min_logvar, max_logvar=cfg.max_logvar)
    g = torch.Generator().manual_seed(seed)
    n = 256
    state = 1.0 + 2.0 * torch.randn(n, info.state_dim, generator=g)
    action = torch.rand(n, info.act_dim, generator=g) * 2 - 1
    next_state = state + 0.5 * torch.randn(n, info.state_dim, generator=g)
    reward = torch.randn(n, generator=g) * 3 - 1
    model.fit(state, action, next_state, reward, cfg, g)
    for module in (actor, critic, model):
        module.eval()
    return Components(task, actor, critic, model)


def export_components(c: Components, out: Path, plan_horizon: int | None = None) -> Manifest:
    return export_artifacts(out, task=c.task, actor=c.actor, critic=c.critic, model=c.model, gamma=c.gamma,
                            horizon=c.horizon, plan_horizon=plan_horizon, train_steps=1234,
                            config={"note": "random test components"})


def train_and_export(root: Path, data: dict) -> Path:
    """Train the config `data` into ROOT/run and export it to ROOT/artifacts; returns ROOT/artifacts."""
    from maac_robot.learn.config import config_from_dict
    from maac_robot.learn.export import export_from_run
    from maac_robot.learn.trainer import train

    train(config_from_dict(data), root / "run", progress=False)
    export_from_run(root / "run", root / "artifacts")
    return root / "artifacts"
