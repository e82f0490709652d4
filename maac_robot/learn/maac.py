"""`MAAC`: a Stable-Baselines3-style facade over the trainer, run directories and export (torch).

    from maac_robot import MAAC, Policy

    model = MAAC("inverted_pendulum", run_dir="runs/ip", overrides={"train.total_steps": 4000})
    model.learn(4000, progress_bar=True)         # trainer.train: the same run directory as `maac-robot train`
    action, _ = model.predict(obs)               # obs from gym.make("InvertedPendulum-v5")
    model = MAAC.load("runs/ip")                 # trainer.load_run: the latest checkpoint
    model.export("artifacts/ip")                 # export.export_from_run; then Policy.load("artifacts/ip")

Nothing here trains or exports by itself: `learn` is `trainer.train` (a new run, or a resume of this one),
`load` is `trainer.load_run`, `export` is `export.export_from_run`. The run directory is the saved model
(config.yaml + checkpoints/latest.pt, written by every `learn`); `save` copies it. `predict` takes the
same observations as `runtime.policy.Policy.predict` (Gymnasium's default observation, the full state or
the policy's input; single or batched) and gives the same actions as the exported policy.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maac_robot.envs import env_info, state_layout
from maac_robot.learn.agent import Actor
from maac_robot.learn.config import Config, config_from_dict, load_config
from maac_robot.learn.trainer import RunError, RunPaths, _default_run_dir, load_run, train
from maac_robot.runtime.artifacts import Manifest
from maac_robot.runtime.config import apply_overrides
from maac_robot.runtime.policy import to_net_obs


class MAAC:
    """A MAAC model bound to a run directory: `learn`, `predict`, `save`, `load`, `export`.

    `config`: a built-in config name (`"hopper"`), a YAML path, a `Config`, or a dict of sections.
    `overrides`: dotted keys as in `--set` (`{"agent.horizon": 5}`); `seed` and `device` set `train.seed`
    and `train.device`. `run_dir` defaults to `runs/<env>-s<seed>-<time>` like `maac-robot train`, and
    must not hold a run already (continue one with `MAAC.load(run_dir).learn(...)`).
    """

    def __init__(self, config: str | Path | Config | Mapping[str, Any], run_dir: str | Path | None = None, *,
                 overrides: Mapping[str, Any] | None = None, seed: int | None = None,
                 device: str | None = None) -> None:
        overrides = dict(overrides or {})
        for key, value in (("train.seed", seed), ("train.device", device)):
            if value is not None:
                overrides[key] = value
        if isinstance(config, Config):
            cfg = config_from_dict(apply_overrides(config.model_dump(mode="json"), overrides), "<Config>")
        elif isinstance(config, Mapping):
            cfg = config_from_dict(apply_overrides(_plain(config), overrides), "<dict>")
        else:
            cfg = load_config(config, overrides)
        run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(cfg)
        paths = RunPaths(run_dir)
        if paths.checkpoint.exists() or paths.metrics.exists():
            raise RunError(f"{run_dir} already holds a run; continue it with MAAC.load({str(run_dir)!r}).learn(...) "
                           f"or pick another run_dir")
        self._init(cfg, run_dir, actor=None, env_step=0)

    def _init(self, cfg: Config, run_dir: Path, actor: Actor | None, env_step: int) -> None:
        self.config = cfg
        self.run_dir = run_dir
        self.actor = actor  # the trained policy network (None before the first learn)
        self.num_timesteps = env_step  # env steps trained (SB3's name)
        self.rng = np.random.default_rng(cfg.train.seed)  # noise of stochastic predict
        self._layout = state_layout(cfg.env.id)
        info = env_info(cfg.env.id)
        self._state_dim, self._act_dim = info.state_dim, info.act_dim
        self._low, self._high = info.act_low.astype(np.float32), info.act_high.astype(np.float32)
        self._stale = False  # a learn() was interrupted: actor and num_timesteps are re-read from the checkpoint

    @classmethod
    def load(cls, run_dir: str | Path) -> MAAC:
        """The run's latest checkpoint (`trainer.load_run`), on CPU; `learn` on it resumes the run."""
        run = load_run(run_dir)
        model = cls.__new__(cls)
        # the run's own config.yaml (load_run's copy says device cpu), so a later learn() resumes it as it was
        model._init(load_config(RunPaths(Path(run_dir)).config), Path(run_dir), actor=run.agent.actor.eval(),
                    env_step=run.env_step)
        return model

    def _sync(self) -> None:
        """After an interrupted learn(): the actor and step count of the checkpoint the run resumes from."""
        if self._stale and RunPaths(self.run_dir).checkpoint.is_file():
            run = load_run(self.run_dir)
            self.actor, self.num_timesteps = run.agent.actor.eval(), run.env_step
        self._stale = False

    @property
    def env_id(self) -> str:
        return self.config.env.id

    def learn(self, total_timesteps: int | None = None, progress_bar: bool = False) -> MAAC:
        """Train `total_timesteps` more env steps (SB3's meaning); None: up to the config's `train.total_steps`.

        The first call starts the run in `run_dir`, later calls (and calls after `load`) resume it from its
        checkpoint, as `maac-robot train --resume RUN --steps N` does. Returns self.
        """
        self._sync()
        resume = RunPaths(self.run_dir).checkpoint.is_file()
        if total_timesteps is not None:
            if total_timesteps < 1:
                raise ValueError(f"total_timesteps must be >= 1, got {total_timesteps}")
            target = (self.num_timesteps if resume else 0) + int(total_timesteps)
            self.config = self.config.model_copy(
                update={"train": self.config.train.model_copy(update={"total_steps": target})})
        try:
            trainer = train(self.config, self.run_dir, resume=resume, progress=progress_bar)
        except BaseException:  # Ctrl-C, or any error: the run continues from its last checkpoint
            self._stale = True
            raise
        trainer.env.close()
        self.actor = trainer.agent.actor.eval()
        self.num_timesteps = trainer.env_step
        return self

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = True,
                *, rng: np.random.Generator | None = None) -> tuple[np.ndarray, None]:
        """`(action, None)` like SB3, for one observation [obs_dim] or a batch [B, obs_dim] of
        `gym.make(env_id)`'s observation (also the full state or the policy's input; see `Policy.predict`).
        `deterministic` defaults to True, as in `Policy.predict`; sampling draws its noise from `rng` (default:
        a Generator seeded with `train.seed`), so it matches the exported policy given the same noise."""
        self._sync()
        if self.actor is None:
            raise RunError("this MAAC has not been trained yet: call learn() first, or MAAC.load(run_dir)")
        net_obs, single = to_net_obs(observation, self._state_dim, self._layout)
        noise = (np.zeros((len(net_obs), self._act_dim), np.float32) if deterministic
                 else (rng or self.rng).standard_normal((len(net_obs), self._act_dim), dtype=np.float32))
        device = self.actor.act_scale.device
        with torch.inference_mode():
            mean, log_std = self.actor.from_net_obs(torch.as_tensor(net_obs, device=device))
            action = self.actor.squash(mean + log_std.exp() * torch.as_tensor(noise, device=device)).cpu().numpy()
        action = np.clip(action, self._low, self._high)
        return (action[0] if single else action), None

    def save(self, path: str | Path) -> Path:
        """Copy the run directory (config, checkpoint, metrics, log) to `path`, which must not exist;
        `MAAC.load(path)` reads it back. The run directory itself is saved by every `learn`."""
        path = Path(path)
        self._sync()
        if not RunPaths(self.run_dir).checkpoint.is_file():
            raise RunError(f"{self.run_dir} has no checkpoint to save yet: call learn() first")
        if path.exists():
            raise RunError(f"refusing to overwrite {path}: save into a new directory")
        shutil.copytree(self.run_dir, path)
        return path

    def export(self, out: str | Path, plan_horizon: int | None = None) -> Manifest:
        """ONNX artifacts of the run's latest checkpoint (`maac-robot export`); load them with `Policy.load(out)`."""
        from maac_robot.learn.export import export_from_run

        return export_from_run(self.run_dir, out, plan_horizon=plan_horizon)

    def __repr__(self) -> str:
        return f"MAAC(env_id={self.env_id!r}, run_dir={str(self.run_dir)!r}, num_timesteps={self.num_timesteps})"


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A mutable copy of a mapping of sections (apply_overrides writes into it)."""
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


__all__ = ["MAAC"]
