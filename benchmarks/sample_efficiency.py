"""Sample efficiency of MAAC against Stable-Baselines3 SAC on one task: evaluation return per env step, per seed.

    python benchmarks/sample_efficiency.py --task inverted_pendulum --algo maac --seeds 0 1 2 --steps 10000
    python benchmarks/sample_efficiency.py --task inverted_pendulum --algo sac --seeds 0 1 2 --steps 30000
    python benchmarks/sample_efficiency.py --task hopper --algo maac --seeds 0 --steps 20000 --set agent.num_samples=1

Each seed trains in benchmarks/runs/TASK/LABEL-sSEED/ (untracked: checkpoints, log, metrics.jsonl) as one trial
of the sweep runner (`maac_robot.sweep.runner.run_trials`): the seeds run in parallel as Ray tasks of `--threads`
CPUs each, on a local Ray instance (loopback; as many at a time as this process's CPUs allow) or on the cluster
at `--address`. As each seed ends, its evaluations go to benchmarks/results/sample_efficiency_TASK.csv with this
command and commit (`collect_runs.py`), and `report.py` rebuilds RESULTS.md and the figures from that CSV. A
MAAC seed whose directory holds a checkpoint resumes from it (`--steps` larger than before extends the run; Ray
retries a seed whose worker died, from its checkpoint); a finished one is not retrained.

Both algorithms get the same env-step budget, the same number of uniformly random initial steps (the MAAC
config's `train.initial_random_steps`), the same torch thread count, the same evaluation schedule and reset
seeds (`maac_robot.learn.trainer.eval_seeds`) and the same episode loop
(`maac_robot.learn.evaluation.evaluate_policy`), deterministic policy. SAC is SB3's SAC with the usual
settings taken from the MAAC config (hidden sizes, lr, batch, τ, γ; one gradient step per env step) on
Gymnasium's default observation. MAAC uses maac_robot/configs/TASK.yaml with the `--set` overrides; LABEL is `maac`
or `maac[key=value,...]`, what the resolved config changes from maac_robot/configs/TASK.yaml at this commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collect_runs import collect  # noqa: E402
from results_csv import (  # noqa: E402
    NOT_IN_DIGEST, RESULTS, RUNS, TASKS, command_line, config_digest, eval_csv, git_commit, machine, read_rows,
)


def resolved_config(task: str, seed: int, steps: int, threads: int, overrides: dict[str, Any]):  # -> Config
    """maac_robot/configs/TASK.yaml with seed, budget, thread count and `overrides` (dotted keys) applied."""
    from maac_robot.learn.config import load_config

    return load_config(task, {
        **overrides, "train.seed": seed, "train.total_steps": steps, "train.num_threads": threads})


def variant_label(algo: str, task: str, config: dict[str, dict[str, Any]]) -> str:
    """'maac', or 'maac[key=value,...]' for each learner field that differs from maac_robot/configs/TASK.yaml (field
    order), so the same variant lands in the same directory however its overrides were written."""
    from maac_robot.learn.config import load_config

    if algo != "maac":
        return algo
    base = load_config(task).model_dump(mode="json")
    changed = [f"{key}={value}" for section, fields in config.items() for key, value in fields.items()
               if f"{section}.{key}" not in NOT_IN_DIGEST and base[section][key] != value]
    return f"maac[{','.join(changed)}]" if changed else "maac"


def claim(csv_path: Path, run_dir: Path, key: dict[str, Any], resumable: bool, restart: bool) -> None:
    """Refuse to start over a run whose rows are in the CSV unless `restart`: without a local checkpoint
    to continue from (a record from another machine, or any SAC run) a new run would replace them."""
    held = [r for r in read_rows(csv_path)
            if all(str(r[k]) == str(v) for k, v in key.items())]
    if held and not resumable and not restart:
        raise SystemExit(f"{csv_path.name} already holds {len(held)} evaluations of {run_dir.name} (to env step "
                         f"{max(int(r['env_step']) for r in held)}) and there is no checkpoint here to continue "
                         "them; --restart replaces them with a new run")
    if restart or not resumable:
        shutil.rmtree(run_dir, ignore_errors=True)


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """The run-level columns `collect_runs.py` reads back; a resumed run keeps its first start in `resumes`."""
    path = run_dir / "meta.json"
    if path.is_file():
        first = json.loads(path.read_text())
        resume = {k: meta[k] for k in ("started", "commit", "command")}
        meta = {**first, "planned_steps": meta["planned_steps"], "resumes": [*first.get("resumes", []), resume]}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1))


def sac_trial(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One SAC seed as a sweep-runner trial (in a Ray worker): SAC has no checkpoint, so a retried seed starts over."""
    from maac_robot.learn.config import config_from_dict

    (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)
    run_sac(config_from_dict(config), Path(run_dir))
    return {"run_dir": run_dir}


def sac_policy(model) -> Any:  # model: stable_baselines3.SAC -> maac_robot.learn.evaluation.Policy
    """SB3's deterministic action as the library's policy callable (no −log π: NaN, as for MAAC's mean action)."""
    def policy(state: np.ndarray) -> tuple[np.ndarray, float]:
        return model.predict(state, deterministic=True)[0], float("nan")

    return policy


def sac_settings(cfg) -> dict[str, Any]:  # cfg: maac_robot.learn.config.Config
    """SB3 SAC's constructor arguments from the MAAC config, so both learners share sizes and rates."""
    a = cfg.agent
    return {"learning_rate": a.lr, "buffer_size": cfg.train.buffer_size,
            "learning_starts": cfg.train.initial_random_steps, "batch_size": a.batch_size, "tau": a.tau,
            "gamma": a.gamma, "train_freq": 1, "gradient_steps": 1,
            "policy_kwargs": {"net_arch": [a.hidden] * a.layers}}


def run_sac(cfg, run_dir: Path) -> None:  # cfg: maac_robot.learn.config.Config
    """SB3 SAC for `train.total_steps`, evaluated every `train.eval_every` steps into metrics.jsonl, with
    the wall and CPU seconds of training and of evaluation kept apart (as the MAAC trainer records them)."""
    import gymnasium as gym
    import torch
    from maac_robot.learn.evaluation import evaluate_policy
    from maac_robot.learn.trainer import eval_seeds
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    t = cfg.train
    torch.set_num_threads(t.num_threads)
    seeds = eval_seeds(t.seed, t.eval_episodes)
    metrics = run_dir / "metrics.jsonl"

    class Evaluate(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.wall = {"train": 0.0, "eval": 0.0}
            self.cpu = {"train": 0.0, "eval": 0.0}
            self.mark = (time.perf_counter(), time.process_time())

        def _lap(self, phase: str) -> None:
            now = (time.perf_counter(), time.process_time())
            self.wall[phase] += now[0] - self.mark[0]
            self.cpu[phase] += now[1] - self.mark[1]
            self.mark = now

        def _on_step(self) -> bool:
            if self.num_timesteps % t.eval_every and self.num_timesteps != t.total_steps:
                return True
            self._lap("train")
            returns = evaluate_policy(sac_policy(self.model), cfg.env.id, seeds, cfg.env.max_episode_steps)
            self._lap("eval")
            record = {"env_step": self.num_timesteps, "eval_return_mean": float(returns.mean()),
                      "eval_return_std": float(returns.std()), "eval_returns": returns.tolist(),
                      "phase_time_s": dict(self.wall), "phase_cpu_s": dict(self.cpu)}
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            return True

    env = gym.make(cfg.env.id, max_episode_steps=cfg.env.max_episode_steps)
    model = SAC("MlpPolicy", env, seed=t.seed, device="cpu", verbose=0, **sac_settings(cfg))
    model.learn(total_timesteps=t.total_steps, callback=Evaluate())


def main(argv: list[str] | None = None) -> int:
    from maac_robot.learn.config import parse_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--algo", choices=["maac", "sac"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, required=True, help="env-step budget per seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for either algorithm (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="MAAC config override (a variant, labelled as such)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where run directories go (untracked)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the task's CSV is")
    parser.add_argument("--restart", action="store_true",
                        help="replace the CSV rows of a run that cannot be continued here with a new run")
    parser.add_argument("--address", help="run the seeds on this Ray cluster (`maac-robot sweep --address`) "
                                          "instead of a local Ray instance")
    args = parser.parse_args(argv)
    overrides, _ = parse_set(args.set)
    if overrides and args.algo == "sac":
        parser.error("--set applies to MAAC's config only")
    from maac_robot.sweep.runner import Trial, checkpoint_step, run_trial, run_trials

    command, commit, host = command_line(argv and ["benchmarks/sample_efficiency.py", *argv]), git_commit(), machine()
    trials = []
    for seed in args.seeds:
        cfg = resolved_config(args.task, seed, args.steps, args.threads, overrides)
        dumped = cfg.model_dump(mode="json")
        label = variant_label(args.algo, args.task, dumped)
        digest = config_digest(dumped) if args.algo == "maac" else config_digest(
            {"train": {k: v for k, v in dumped["train"].items() if k in ("initial_random_steps", "eval_every",
                                                                       "eval_episodes")},
             "agent": {"sac": sac_settings(cfg)}, "env": dumped["env"]})
        run_dir = args.runs / args.task / f"{label}-s{seed}"
        resumable = args.algo == "maac" and (run_dir / "checkpoints" / "latest.pt").is_file()
        claim(eval_csv(args.task, args.results), run_dir, {"algo": args.algo, "variant": label, "seed": seed, "config_digest": digest},
              resumable, args.restart)
        write_meta(run_dir, {"algo": args.algo, "label": label, "task": args.task, "seed": seed,
                             "planned_steps": args.steps, "threads": args.threads, "config_digest": digest,
                             "command": command, "commit": commit,
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **host})
        trials.append(Trial(label, tuple(args.set), seed, run_dir, dumped, digest))
    start = time.perf_counter()

    def ended(trial: Trial, result: dict[str, Any] | None, error: BaseException | None) -> None:
        head = f"{trial.variant} {args.task} seed {trial.seed}:"
        if error is not None:
            print(f"{head} failed after {time.perf_counter() - start:.0f} s: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)
            return
        rows = collect(trial.run_dir, results=args.results)
        print(f"{head} {args.steps} steps, done {time.perf_counter() - start:.0f} s after the start, "
              f"{rows} evaluations in {eval_csv(args.task, args.results)}", flush=True)

    # a finished MAAC seed is only collected again: no Ray instance for nothing
    todo = [t for t in trials if args.algo != "maac" or (checkpoint_step(t.run_dir) or 0) < t.steps]
    for trial in trials:
        if trial not in todo:
            ended(trial, {}, None)
    errors = run_trials(todo, args.address, args.threads, on_result=ended,
                        work=run_trial if args.algo == "maac" else sac_trial) if todo else {}
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
