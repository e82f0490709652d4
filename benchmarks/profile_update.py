"""Where MAAC's training time goes at a config's settings, and what one G2 update costs under cheaper settings.

    python benchmarks/profile_update.py --task half_cheetah --steps 20            # both measurements
    python benchmarks/profile_update.py --task half_cheetah --measure update-cost  # FLOPs and CPU per update only

`profile`: the random phase runs first (env steps only), so D_env holds what the schedule holds when
learning starts; then `--steps` env steps of Algorithm 1 (the first fits the model cold and imagines),
then one more (warm-started) fit, each timed by the trainer's own phase timers (wall and CPU). Per 1000
env steps = 1000/model.train_every warm fits + 1000/rollout.every rollout rounds + 1000 env steps with
their updates: an extrapolation from measured parts, stated as such. Inside the G2 update, torch.profiler
measures the regions the library labels with `torch.profiler.record_function` (`--labels`), as shares of
the update's CPU time; a label the library does not emit is reported as absent, not guessed.

`update-cost`: FLOPs (torch's FlopCounterMode) and CPU time of one G2 update through `Trainer.update`
for the config and cheaper variants (`UPDATE_VARIANTS`), the operators that dominate it, and one large
matmul's rate on this core (the ceiling for this work).

Rows replace the measurement's earlier rows in benchmarks/results/training_cost_<task>.csv, with the
command and commit; `report.py` renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_csv import (  # noqa: E402
    RESULTS, TASKS, command_line, git_commit, machine, read_rows, versions_text, write_rows,
)

COLUMNS = ("kind", "item", "value", "unit", "command", "commit", "date", "cpu", "threads", "versions")
PROFILE_KINDS = ("profile", "per_1000_steps", "update_share")
COST_KINDS = ("update_cost", "op_share", "matmul")
DEFAULT_LABELS = ("critic_targets", "critic_step", "policy_objective", "actor_step", "alpha_step")
# The config's settings first, then the knobs that set the cost of one G2 update (all but precision change
# what is computed).
UPDATE_VARIANTS: list[dict[str, Any]] = [
    {}, {"train.precision": "bfloat16"}, {"agent.terminal_q_samples": 1},
    {"agent.num_samples": 1, "agent.terminal_q_samples": 1},
    {"agent.num_samples": 1, "agent.terminal_q_samples": 1, "agent.updates_per_step": 2},
    {"agent.num_samples": 1, "agent.terminal_q_samples": 1, "agent.updates_per_step": 2, "train.precision": "bfloat16"},
]


def config(task: str, threads: int, overrides: dict[str, Any] | None = None):  # -> Config
    from maac_robot.learn.config import load_config

    return load_config(task, {
        "train.seed": 0, "train.num_threads": threads, "train.eval_every": 10**9, "train.checkpoint_every": 10**9,
        **(overrides or {})})


def run_to(trainer, env_step: int) -> None:  # trainer: maac_robot.learn.trainer.Trainer
    """Continue Algorithm 1 to `env_step` through the trainer's public loop (it evaluates and checkpoints
    once at the end; the phase timers keep that apart as 'eval' and 'checkpoint')."""
    trainer.cfg = trainer.cfg.model_copy(update={"train": trainer.cfg.train.model_copy(update={"total_steps": env_step})})
    trainer.train(progress=False)


def update_shares(trainer, labels: Sequence[str], updates: int = 4) -> dict[str, float]:
    """CPU-time share of each labelled region inside `Trainer.update` (torch.profiler, `updates` calls)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(updates):
            with record_function("benchmark.g2_update"):
                trainer.update()
    events = {e.key: e.cpu_time_total for e in prof.key_averages()}
    total = events["benchmark.g2_update"]
    return {label: events[label] / total for label in labels if label in events}


def profile(task: str, steps: int, threads: int, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the profile measurement (see the module docstring)."""
    from maac_robot.learn.trainer import Trainer

    cfg = config(task, threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        run_to(trainer, trainer.learning_starts - 1)  # the random phase: the next step is the first learning step
        start = trainer.env_step
        trainer.timers.clear()
        trainer.cpu_timers.clear()
        run_to(trainer, start + steps)  # the first step fits cold and imagines; every step updates
        cold_fit = dict(trainer.fit_stats)
        cold = (trainer.timers["model_fit"], trainer.cpu_timers["model_fit"])
        wall0, cpu0 = time.perf_counter(), time.process_time()
        trainer.fit_model()
        warm = (time.perf_counter() - wall0, time.process_time() - cpu0)
        warm_fit = dict(trainer.fit_stats)
        shares = update_shares(trainer, labels)
        timers, cpu_timers, d_env = dict(trainer.timers), dict(trainer.cpu_timers), len(trainer.d_env)
    updates = steps * cfg.agent.updates_per_step
    fits, rounds = 1000 / cfg.model.train_every, 1000 / cfg.rollout.every

    def per_1000(t: dict[str, float], warm_fit_s: float) -> dict[str, float]:
        return {f"model fit (warm, x{fits:g})": warm_fit_s * fits,
                f"imagined rollouts (x{rounds:g} rounds)": t.get("rollout", 0.0) * rounds,
                f"G2 policy+Q updates (x{1000 * cfg.agent.updates_per_step})": t["update"] / steps * 1000,
                "env steps + acting (x1000)": t["env"] / steps * 1000}

    rows = [{"kind": "profile", "item": item, "value": round(value, 3), "unit": unit} for item, unit, value in (
        ("d_env", "rows", d_env), ("updates_measured", "updates", updates),
        ("cold_fit", "cpu_s", cold[1]), ("cold_fit", "epochs", cold_fit.get("epochs", float("nan"))),
        ("warm_fit", "cpu_s", warm[1]), ("warm_fit", "epochs", warm_fit.get("epochs", float("nan"))),
        ("rollout_round", "wall_s", timers.get("rollout", 0.0)),
        ("update", "cpu_ms", cpu_timers["update"] / updates * 1000),
        ("update", "wall_ms", timers["update"] / updates * 1000),
        ("load_average_1min", "load", os.getloadavg()[0]))]
    wall, cpu = per_1000(timers, warm[0]), per_1000(cpu_timers, warm[1])
    for part in wall:
        rows.append({"kind": "per_1000_steps", "item": part, "value": round(cpu[part], 1), "unit": "cpu_s"})
        rows.append({"kind": "per_1000_steps", "item": part, "value": round(wall[part], 1), "unit": "wall_s"})
    for label in labels:
        if label not in shares:
            print(f"no record_function label {label!r} inside Trainer.update: not reported", file=sys.stderr)
    rows += [{"kind": "update_share", "item": label, "value": round(share, 3), "unit": "fraction of update CPU time"}
             for label, share in shares.items()]
    return rows


def update_cpu_s(trainer, updates: int = 10) -> float:  # trainer: maac_robot.learn.trainer.Trainer
    """CPU seconds per G2 update through `Trainer.update` (batch draws and precision included), after a warm-up."""
    trainer.update()
    first, start = trainer.update_count, time.process_time()
    while trainer.update_count - first < updates:
        trainer.update()
    return (time.process_time() - start) / (trainer.update_count - first)


def matmul_gflops(dtype_name: str, rows: int = 6400, width: int = 256, reps: int = 50) -> float:
    """This core's rate on one large matmul of the update's shape (the terminal Q's hidden layer): its ceiling."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, w = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
    for _ in range(5):
        a @ w
    start = time.process_time()
    for _ in range(reps):
        a @ w
    return round(2 * rows * width * width * reps / (time.process_time() - start) / 1e9, 1)


def update_cost(task: str, threads: int, variants: Sequence[dict[str, Any]] = UPDATE_VARIANTS) -> list[dict[str, Any]]:
    """Rows of the update-cost measurement (see the module docstring)."""
    import torch
    from maac_robot.learn.trainer import Trainer
    from torch.utils.flop_counter import FlopCounterMode

    rows: list[dict[str, Any]] = []
    for variant in variants:
        # A small D_env and a 1-epoch fit suffice: an update's cost does not depend on how good the model is.
        cfg = config(task, threads, {"train.initial_random_steps": 300, "model.max_epochs": 1, **variant})
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp))
            run_to(trainer, trainer.learning_starts)  # fits, imagines and takes the first updates
            with FlopCounterMode(display=False) as counter:
                trainer.update()
            gflop = counter.get_total_flops() / 1e9 / cfg.agent.updates_per_step
            cpu = update_cpu_s(trainer)
            if not rows:  # where the first setting's update spends its time, by operator
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(2):
                        trainer.update()
                events = prof.key_averages()
                total = sum(e.self_cpu_time_total for e in events)
                rows += [{"kind": "op_share", "item": e.key, "value": round(e.self_cpu_time_total / total, 3),
                          "unit": "fraction of self CPU"}
                         for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]]
        item = json.dumps(variant) if variant else "the config's settings"
        rows += [{"kind": "update_cost", "item": item, "value": value, "unit": unit} for unit, value in (
            ("gflop", round(gflop, 2)), ("cpu_ms", round(cpu * 1000, 1)),
            ("cpu_s_per_1000_env_steps", round(cpu * 1000 * cfg.agent.updates_per_step, 1)))]
        print(item, rows[-3:], flush=True)
    rows += [{"kind": "matmul", "item": name, "value": matmul_gflops(name), "unit": "gflop_per_s"}
             for name in ("float32", "bfloat16")]
    return rows


def save(path: Path, kinds: Sequence[str], rows: list[dict[str, Any]], threads: int) -> Path:
    """Replace the rows of `kinds` in the task's training-cost CSV, stamping each with where it came from."""
    host = machine()
    stamp = {"command": command_line(), "commit": git_commit(), "cpu": f"{host['cpu']}, {host['cores']} cores",
             "threads": threads, "versions": versions_text(host["versions"]),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    kept = [r for r in read_rows(path) if r["kind"] not in kinds]
    write_rows(path, [*kept, *({**r, **stamp} for r in rows)], COLUMNS)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="half_cheetah")
    parser.add_argument("--measure", choices=["profile", "update-cost", "both"], default="both")
    parser.add_argument("--steps", type=int, default=20, help="learning steps the profile measures")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the training-cost CSV")
    parser.add_argument("--labels", nargs="*", default=list(DEFAULT_LABELS),
                        help="record_function labels inside Trainer.update to report as shares")
    args = parser.parse_args(argv)
    path = args.results / f"training_cost_{args.task}.csv"
    if args.measure in ("profile", "both"):
        print(save(path, PROFILE_KINDS, profile(args.task, args.steps, args.threads, args.labels), args.threads))
    if args.measure in ("update-cost", "both"):
        print(save(path, COST_KINDS, update_cost(args.task, args.threads), args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
