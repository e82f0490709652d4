"""Why `maac-robot finetune` does not get better with more recorded data (issue 22): what the G2 rounds train on.

    python benchmarks/finetune_screen.py --seeds 0 --record-steps 1000 5000 --variants default none recorded_only flush
    python benchmarks/finetune_screen.py --seeds 0 --record-steps 5000 --variants default --rounds 2000

The adaptation benchmark (`benchmarks/adaptation.py`) found the finetuned policy worse after 5k recorded steps than
after 1k, with the same rounds, while the model's error on perturbed data fell. This screen reuses what that
benchmark left on disk, the nominal run (`--nominal`) and the first k recorded steps (WORK/sSEED/data-k), and
changes one thing per variant through `finetune`'s `prepare` seam (the rounds stay the library's):

* `default`: finetune as it is: D_env = the run's own rows + the recorded ones, D_model as checkpointed;
* `none`: the recorded rows dropped again: the same rounds on the run's data alone. The control: what the rounds do
  to the policy without robot data;
* `recorded_only`: D_env = the recorded rows alone and D_model emptied: only the perturbed dynamics;
* `flush`: D_model emptied: its imagined rows come from the nominal model, stale once the dynamics changed.

Each (seed, k, variant) finetunes a copy of the run for `--rounds` rounds (the benchmark's 500 by default), then
runs the deterministic policy on the perturbed env in-process (`adaptation.perturbed_env_factory`, reset seeds
--eval-seed.., as the benchmark's control episodes). Rows replace earlier ones of the same (task, seed, k,
variant, rounds) in benchmarks/results/finetune_screen_TASK.csv, with command, commit and CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptation import PERTURBATIONS, perturbed_env_factory  # noqa: E402
from results_csv import RESULTS, RUNS, provenance, read_rows, write_rows  # noqa: E402

COLUMNS = ("task", "seed", "record_steps", "variant", "rounds", "perturbation", "d_env_env", "d_env_recorded",
           "d_model", "perturbed_return", "returns", "seconds", "command", "commit", "cpu", "date")
KEY = ("task", "seed", "record_steps", "variant", "rounds")


def _drop_recorded(trainer: Any) -> str:
    from maac_robot.learn.buffer import SOURCE_RECORDED

    trainer.d_env.keep(trainer.d_env.source[: len(trainer.d_env)] != SOURCE_RECORDED)
    return "recorded rows dropped"


def _recorded_only(trainer: Any) -> str:
    from maac_robot.learn.buffer import SOURCE_RECORDED

    trainer.d_env.keep(trainer.d_env.source[: len(trainer.d_env)] == SOURCE_RECORDED)
    return _flush(trainer) + "; the run's own rows dropped"


def _flush(trainer: Any) -> str:
    trainer.d_model.keep(np.zeros(len(trainer.d_model), bool))
    return "D_model emptied"


VARIANTS: dict[str, Callable[[Any], str] | None] = {
    "default": None, "none": _drop_recorded, "recorded_only": _recorded_only, "flush": _flush,
}


def screen_one(task: str, seed: int, k: int, variant: str, rounds: int, nominal: Path, work: Path,
               perturb: list[str], eval_seeds: list[int]) -> dict[str, Any]:
    from maac_robot.learn.evaluation import agent_policy, run_episode
    from maac_robot.learn.finetune import finetune

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(nominal, work / f"s{seed}" / f"data-{k}", Path(tmp) / "ft", steps=rounds,
                          prepare=VARIANTS[variant])
        trainer = result.trainer
        env = perturbed_env_factory(perturb)(trainer.cfg)
        try:
            policy = agent_policy(trainer.agent, deterministic=True)
            returns = [float(run_episode(policy, env, s)["rewards"].sum()) for s in eval_seeds]
        finally:
            env.close()
            trainer.env.close()
    d_env = result.record["d_env"]
    return {"task": task, "seed": seed, "record_steps": k, "variant": variant, "rounds": rounds,
            "perturbation": " ".join(perturb), "d_env_env": d_env["env"], "d_env_recorded": d_env["recorded"],
            "d_model": len(trainer.d_model), "perturbed_return": float(np.mean(returns)),
            "returns": " ".join(f"{r:.1f}" for r in returns), "seconds": round(time.monotonic() - start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="inverted_pendulum", choices=sorted(PERTURBATIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--record-steps", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=500, help="G2 rounds of each finetune")
    p.add_argument("--nominal", default=str(RUNS / "adaptation" / "{task}" / "nominal-s{seed}"),
                   help="nominal run directory pattern ({task}, {seed}), as in adaptation.py")
    p.add_argument("--work", help="adaptation.py's work directory (default benchmarks/runs/adaptation/TASK/work)")
    p.add_argument("--eval-seed", type=int, default=100, help="first reset seed of the evaluation episodes")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--out", type=Path, help="CSV (default benchmarks/results/finetune_screen_TASK.csv)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(a.work or RUNS / "adaptation" / a.task / "work")
    out = a.out or RESULTS / f"finetune_screen_{a.task}.csv"
    perturb, stamp = PERTURBATIONS[a.task], provenance()
    for seed in a.seeds:
        nominal = Path(a.nominal.format(task=a.task, seed=seed))
        for k in a.record_steps:
            for variant in a.variants:
                row = {**screen_one(a.task, seed, k, variant, a.rounds, nominal, work, perturb,
                                    list(range(a.eval_seed, a.eval_seed + a.episodes))), **stamp}
                print(f"seed {seed}, {k} recorded, {variant}, {a.rounds} rounds: perturbed return "
                      f"{row['perturbed_return']:.1f} ({row['returns']}) in {row['seconds']} s", flush=True)
                key = tuple(str(row[c]) for c in KEY)
                kept = [r for r in read_rows(out) if tuple(r[c] for c in KEY) != key]
                write_rows(out, [*kept, row], COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
