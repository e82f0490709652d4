"""The tiny configs the tests train: small enough for seconds on 2 cores, complete enough to run Algorithm 1.

`tiny(**sections)` is the trainer-level run (60-step episodes); `DEPLOYABLE` is a run whose export a
controller can balance for a few dozen steps (200-step episodes, a controller section for loopback tests).
Both return fresh copies, so a test may change them.
"""

from __future__ import annotations

import copy
from typing import Any

_TINY: dict[str, dict[str, Any]] = {
    "env": {"id": "InvertedPendulum-v5", "max_episode_steps": 60},
    "model": {"num_models": 3, "num_elites": 2, "hidden": 32, "layers": 2, "batch_size": 64, "max_epochs": 3,
              "train_every": 100},
    "agent": {"horizon": 2, "num_samples": 2, "terminal_q_samples": 2, "steve_horizon": 1, "hidden": 32,
              "batch_size": 32, "updates_per_step": 1},
    "rollout": {"length": 2, "batch_size": 64, "every": 50, "retain_rounds": 2},
    "train": {"total_steps": 200, "initial_random_steps": 100, "eval_every": 100, "eval_episodes": 2,
              "checkpoint_every": 100, "buffer_size": 5000, "num_threads": 1, "seed": 3},
}

_DEPLOYABLE: dict[str, dict[str, Any]] = {
    "env": {"id": "InvertedPendulum-v5", "max_episode_steps": 200},
    "model": {"num_models": 3, "num_elites": 2, "hidden": 32, "layers": 2, "max_epochs": 5, "train_every": 100,
              "batch_size": 64},
    "agent": {"horizon": 2, "num_samples": 2, "terminal_q_samples": 2, "steve_horizon": 1, "hidden": 32, "layers": 2,
              "batch_size": 64, "updates_per_step": 1},
    "rollout": {"batch_size": 200, "every": 100, "retain_rounds": 2},
    "train": {"total_steps": 300, "initial_random_steps": 100, "eval_every": 300, "eval_episodes": 1,
              "checkpoint_every": 300, "seed": 0, "num_threads": 1},
    "controller": {"population": 32, "iterations": 3, "budget_frac": 0.5},
}


def _merged(base: dict[str, dict[str, Any]], sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    data = copy.deepcopy(base)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def tiny(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The trainer-level tiny config with `sections` merged key by key (e.g. `train={"total_steps": 150}`)."""
    return _merged(_TINY, sections)


def deployable(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The deployable tiny config (300 steps, 200-step episodes, a small CEM) with `sections` merged."""
    return _merged(_DEPLOYABLE, sections)
