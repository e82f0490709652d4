"""How fast MAAC trains on this machine: one G2 update against the matmul floor, and env steps per second against SB3 SAC.

    python benchmarks/train_speed.py                                   # every setting, default windows
    python benchmarks/train_speed.py --settings inverted_pendulum --window 2000 --sac-steps 2000

Per setting, in one process on one machine:
- `gflop`: FLOPs of one G2 update (torch's FlopCounterMode, matrix products), through `Trainer.update`;
- `cpu_ms`: CPU time of one G2 update after a warm-up;
- `floor_ms`: gflop ÷ this core's float32 rate on one large matmul, measured in the same run just before
  (`matmul_gflops`), and `floor_ratio` = cpu_ms ÷ floor_ms: how far the update is from pure arithmetic;
- `env_steps_per_s`: Algorithm 1 as `maac-robot train` runs it (env steps, model fits, imagined rollouts, G2
  updates, evaluations and checkpoints at the config's schedule) over a window of env steps that starts where
  learning starts, in env steps per wall-second, with the shares of that wall time spent in G2 updates, model
  fits (the window's first is the cold fit on the random phase's data), imagined rollouts and evaluations;
- `sac_s_per_1000`: SB3 SAC's wall seconds per 1000 env steps on the same task, sizes and rates from the same
  config (`sample_efficiency.sac_settings`), after its random phase; `maac_over_sac` = MAAC's wall seconds per
  1000 env steps over SAC's.
The windows are short for the expensive settings (the authors' HalfCheetah settings take seconds per env step)
and every row names its window. Rows replace the setting's earlier rows in benchmarks/results/train_speed.csv,
with command, commit, CPU and versions; `report.py` renders them into RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_update import config, matmul_gflops, run_to, update_cpu_s  # noqa: E402
from results_csv import RESULTS, provenance, read_rows, write_rows  # noqa: E402

COLUMNS = ("setting", "item", "value", "unit", "window", "command", "commit", "date", "cpu", "threads", "versions")
# name -> (built-in config, overrides, default window of env steps after learning starts)
SETTINGS: dict[str, tuple[str, dict[str, Any], int]] = {
    "inverted_pendulum": ("inverted_pendulum", {}, 2000),
    "hopper_budget": ("hopper", {"agent.num_samples": 1, "agent.terminal_q_samples": 1,
                                 "agent.updates_per_step": 2}, 500),
    "half_cheetah_authors": ("half_cheetah", {}, 50),
}


def update_floor(task: str, overrides: dict[str, Any], threads: int) -> dict[str, float]:
    """FLOPs and CPU time of one G2 update, and the floor this core's matmul rate sets for it."""
    from maac_robot.learn.trainer import Trainer
    from torch.utils.flop_counter import FlopCounterMode

    # A small D_env and a 1-epoch fit suffice: an update's cost does not depend on how good the model is.
    cfg = config(task, threads, {"train.initial_random_steps": 300, "model.max_epochs": 1, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        run_to(trainer, trainer.learning_starts)
        with FlopCounterMode(display=False) as counter:
            trainer.update()
        gflop = counter.get_total_flops() / 1e9 / cfg.agent.updates_per_step
        rate = matmul_gflops("float32")
        cpu_ms = 1000 * update_cpu_s(trainer, updates=20)
    floor_ms = 1000 * gflop / rate
    return {"gflop": gflop, "cpu_ms": cpu_ms, "matmul_gflop_per_s": rate, "floor_ms": floor_ms,
            "floor_ratio": cpu_ms / floor_ms}


def maac_speed(task: str, overrides: dict[str, Any], window: int, threads: int) -> dict[str, float]:
    """Env steps per wall-second of Algorithm 1 at the config's own schedule, over `window` env steps from the first
    learning step (the random phase before it is not timed), at `threads` torch threads: a config that leaves
    `train.num_threads` unset would take every core, and with another process on the machine two OpenMP threads
    made an InvertedPendulum update 10x slower (362 against 35 wall-ms), which measures the machine, not MAAC."""
    from maac_robot.learn.config import load_config
    from maac_robot.learn.trainer import Trainer

    cfg = load_config(task, {"train.seed": 0, "train.num_threads": threads, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        run_to(trainer, trainer.learning_starts - 1)
        before = dict(trainer.timers)
        start = time.perf_counter()
        run_to(trainer, trainer.learning_starts - 1 + window)
        wall = time.perf_counter() - start
        shares = {f"{phase}_share": (trainer.timers[phase] - before.get(phase, 0.0)) / wall
                  for phase in ("update", "model_fit", "rollout", "eval")}
        ran_with = float(trainer.cfg.train.num_threads or trainer.cores)
    return {"env_steps_per_s": window / wall, "maac_s_per_1000": 1000 * wall / window, **shares,
            "maac_threads": ran_with}


def sac_speed(task: str, steps: int, threads: int) -> dict[str, float]:
    """SB3 SAC's wall seconds per 1000 env steps after its random phase, sizes and rates from the task's config."""
    import gymnasium as gym
    import torch
    from maac_robot.learn.config import load_config
    from sample_efficiency import sac_settings
    from stable_baselines3 import SAC

    cfg = load_config(task, {"train.seed": 0})
    torch.set_num_threads(threads)
    settings = sac_settings(cfg)
    env = gym.make(cfg.env.id, max_episode_steps=cfg.env.max_episode_steps)
    model = SAC("MlpPolicy", env, seed=0, device="cpu", verbose=0, **settings)
    model.learn(total_timesteps=settings["learning_starts"] + 1)
    start = time.perf_counter()
    model.learn(total_timesteps=steps, reset_num_timesteps=False)
    return {"sac_s_per_1000": 1000 * (time.perf_counter() - start) / steps}


def measure(name: str, window: int, sac_steps: int, threads: int) -> list[dict[str, Any]]:
    task, overrides, _ = SETTINGS[name]
    values = update_floor(task, overrides, threads)
    print(name, {k: round(v, 2) for k, v in values.items()}, flush=True)
    values |= maac_speed(task, overrides, window, threads)
    values |= sac_speed(task, sac_steps, threads)
    values["maac_over_sac"] = values["maac_s_per_1000"] / values["sac_s_per_1000"]
    values["load_1min"] = os.getloadavg()[0]  # other work on the machine slows the absolute speeds, not the ratios
    print(name, {k: round(v, 2) for k, v in values.items()}, flush=True)
    units = {"gflop": "GFLOP", "cpu_ms": "CPU ms", "matmul_gflop_per_s": "GFLOP/s", "floor_ms": "ms",
             "floor_ratio": "x", "env_steps_per_s": "env steps / wall s", "maac_s_per_1000": "wall s",
             "update_share": "fraction of wall", "model_fit_share": "fraction of wall",
             "rollout_share": "fraction of wall", "eval_share": "fraction of wall", "maac_threads": "threads",
             "sac_s_per_1000": "wall s",
             "maac_over_sac": "x", "load_1min": "load average"}
    return [{"setting": name, "item": item, "value": round(value, 4), "unit": units[item],
             "window": sac_steps if item == "sac_s_per_1000" else window} for item, value in values.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--window", type=int, help="env steps timed after learning starts (default: per setting)")
    parser.add_argument("--sac-steps", type=int, default=1000, help="SAC env steps timed after its random phase")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every measurement (MAAC and SAC)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    stamp = provenance() | {"threads": args.threads}
    path = args.results / "train_speed.csv"
    for name in args.settings:
        rows = measure(name, args.window or SETTINGS[name][2], args.sac_steps, args.threads)
        kept = [r for r in read_rows(path) if r["setting"] != name]
        write_rows(path, [*kept, *({**r, **stamp} for r in rows)], COLUMNS)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
