"""What sets the temperature α: the entropy bonus's push on log σ against the actor objective's pull.

    python benchmarks/entropy_pressure.py --run benchmarks/runs/half_cheetah/maac-s0 [RUN_DIR ...] [--states 1024]

`maac_robot.learn.diagnostics.entropy_pressure` on `--states` start states drawn from each checkpoint's D_env
and D_model in the proportions of an actor batch (the run directory is only read). One entry per run and
checkpoint step, merged into benchmarks/results/entropy_pressure.json with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_results import merge_runs, provenance, run_name  # noqa: E402
from results_csv import RESULTS  # noqa: E402


def entropy_pressure_run(run_dir: Path, states: int, draws: int, name: str | None = None) -> dict[str, Any]:
    """Push and pull on the latest checkpoint of `run_dir`, from `states` start states (seeded draws)."""
    import torch
    from maac_robot.learn.buffer import Batch, ReplayBuffer
    from maac_robot.learn.diagnostics import entropy_pressure
    from maac_robot.learn.trainer import RunPaths, load_checkpoint, load_run

    run = load_run(run_dir)
    torch.set_num_threads(1)
    ckpt = load_checkpoint(RunPaths(run_dir).checkpoint, run.config.env.id)
    info, rng = run.task.info, np.random.default_rng(0)
    n_real, n_model = run.agent.batch_split(model_data=int(ckpt["d_model"]["size"]) > 0)
    parts = []
    for key, share in (("d_env", n_real), ("d_model", n_model)):
        rows = round(states * share / (n_real + n_model))
        if rows:
            buffer = ReplayBuffer(info.state_dim, info.act_dim, int(ckpt[key]["capacity"]))
            buffer.load_state_dict(ckpt[key])
            parts.append(buffer.sample(rows, rng))
    result = entropy_pressure(run, Batch.cat(parts).state, draws=draws)
    return {"run": name or run_name(run_dir), "env_step": run.env_step, "states": states, "draws": draws,
            **json.loads(json.dumps(result), parse_float=lambda x: round(float(x), 4))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, nargs="+", required=True, help="MAAC run directories with a checkpoint")
    parser.add_argument("--states", type=int, default=1024)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--name", help="the run's name in the results (one --run): for a copy of an earlier checkpoint")
    parser.add_argument("--out", type=Path, default=RESULTS / "entropy_pressure.json")
    args = parser.parse_args(argv)
    if args.name and len(args.run) > 1:
        parser.error("--name names one run; give one --run with it")
    rows = [{**entropy_pressure_run(run_dir, args.states, args.draws, args.name), **provenance()}
            for run_dir in args.run]
    merge_runs(args.out, rows, keys=("run", "env_step"))
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
