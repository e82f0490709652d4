"""Can the ensemble fit a task's random-action data, with and without its unmodelled sensor dims?

    python benchmarks/model_fit.py --task ant --transitions 5000 --epochs 40

Collects `--transitions` uniformly random-action transitions (what a run's `train.initial_random_steps`
phase gathers), fits the config's ensemble for exactly `--epochs` epochs (early stopping off) twice:
predicting every state dim, and predicting only `EnvInfo.modelled_idx` (the trainer's choice). Both are
scored on the same held-out rows and the same dims (the modelled ones), as MSE of the mean Δstate in units
of the training split's Δ std, beside a least-squares linear model on the networks' inputs. This is the
measurement behind Ant's contact forces being carried over rather than predicted (maac_robot/envs.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

TASKS = {"ant": "Ant-v5", "hopper": "Hopper-v5", "half_cheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}


def random_transitions(env_id: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from maac_robot.envs import make_env

    env = make_env(env_id, seed=seed)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    states, actions, next_states = [], [], []
    state, _ = env.reset(seed=seed)
    while len(states) < n:
        action = rng.uniform(low, high).astype(np.float32)
        next_state, _, terminated, truncated, _ = env.step(action)
        states.append(state), actions.append(action), next_states.append(next_state)
        state = env.reset()[0] if terminated or truncated else next_state
    env.close()
    return np.asarray(states), np.asarray(actions), np.asarray(next_states)


def measure(task: str, transitions: int, epochs: int, seed: int) -> dict:
    from maac_robot.learn.config import load_config
    from maac_robot.learn.ensemble import GaussianEnsemble, holdout_split
    from maac_robot.envs import env_info

    torch.set_num_threads(1)
    cfg = load_config(task)
    info = env_info(cfg.env.id)
    s, a, s2 = (torch.as_tensor(x, dtype=torch.float32) for x in random_transitions(cfg.env.id, transitions, seed))
    modelled = list(info.modelled_idx or range(info.state_dim))
    train, hold = holdout_split(transitions, cfg.model.holdout_ratio, torch.Generator().manual_seed(seed))
    delta = (s2 - s)[:, modelled]
    scale = delta[train].std(0)
    fit_cfg = cfg.model.model_copy(update={"patience": epochs + 1, "max_epochs": epochs})
    result = {"command": " ".join([sys.executable, *sys.argv]), "env_id": cfg.env.id, "transitions": transitions,
              "epochs": epochs, "modelled_dims": len(modelled), "state_dims": info.state_dim}
    for name, idx in (("predicting every dim", None), ("predicting modelled_idx only", modelled)):
        torch.manual_seed(seed)
        model = GaussianEnsemble(info.state_dim, info.act_dim, num_models=cfg.model.num_models,
                                 num_elites=cfg.model.num_elites, hidden=cfg.model.hidden, layers=cfg.model.layers,
                                 learn_reward=False, net_obs_idx=info.net_obs_idx, min_logvar=cfg.model.min_logvar,
                                 max_logvar=cfg.model.max_logvar, modelled_idx=idx)
        # fit draws its holdout split first from this generator: the same rows as `hold` above
        model.fit(s, a, s2, None, fit_cfg, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            pred = model.predict_all(s[hold], a[hold])[0][..., modelled] - s[hold][:, modelled]
        result[name] = round(((pred - delta[hold]) / scale).square().mean().item(), 3)
    x = torch.cat([s[:, list(info.net_obs_idx)], a, torch.ones(transitions, 1)], -1).double()
    weights = torch.linalg.lstsq(x[train], delta[train].double()).solution
    result["linear least squares"] = round((((x[hold] @ weights).float() - delta[hold]) / scale).square().mean().item(), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="ant")
    parser.add_argument("--transitions", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.task, args.transitions, args.epochs, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
