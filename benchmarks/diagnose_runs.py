"""Why a learning curve falls: how a checkpoint's episodes end, the ensemble's foresight, the critic's bias.

    python benchmarks/diagnose_runs.py --run benchmarks/runs/hopper/maac-s0 [RUN_DIR ...] [--episodes 3]
    python benchmarks/diagnose_runs.py --task hopper        # every MAAC run of the task with a checkpoint

`maac_robot.learn.diagnostics.diagnose` of each run's latest checkpoint on its evaluation reset seeds
(deterministic episodes: return, length, last state, foresight of terminations, model return against the
real one; stochastic episodes: Q(s₀), realised soft return, bias). Entries are merged by run into
benchmarks/results/diagnose.json (a rerun replaces that run's entry) with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_results import merge_runs, provenance, run_name  # noqa: E402
from results_csv import RESULTS, RUNS, TASKS  # noqa: E402


def diagnose_run(run_dir: Path, episodes: int) -> dict[str, Any]:
    """`maac_robot.learn.diagnostics.diagnose` of a run's latest checkpoint on its evaluation reset seeds."""
    from maac_robot.learn.diagnostics import diagnose
    from maac_robot.learn.trainer import eval_seeds, load_run

    run = load_run(run_dir)
    return {"run": run_name(run_dir), "env_step": run.env_step, "alpha": round(run.agent.alpha, 4),
            "episodes": diagnose(run, eval_seeds(run.config.train.seed, episodes))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", choices=sorted(TASKS), help="every MAAC run of this task with a checkpoint")
    which.add_argument("--run", type=Path, nargs="+", default=[], help="these run directories")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "diagnose.json")
    args = parser.parse_args(argv)
    runs = args.run or [p.parent.parent for p in sorted((RUNS / args.task).glob("maac*/checkpoints/latest.pt"))]
    rows = [{**diagnose_run(run_dir, args.episodes), **provenance()} for run_dir in runs]
    merge_runs(args.out, rows)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
