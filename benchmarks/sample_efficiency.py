"""Sample efficiency of MAAC vs Stable-Baselines3 SAC, side by side; and where MAAC's time goes.

    # one algorithm, one task, some seeds (long: run in the background with nohup, logs in benchmarks/logs/)
    python benchmarks/sample_efficiency.py run --task inverted_pendulum --algo maac --seeds 0 1 2 --steps 10000
    python benchmarks/sample_efficiency.py run --task inverted_pendulum --algo sac  --seeds 0 1 2 --steps 10000
    # where 1000 env steps of MAAC at the authors' settings go (measured parts, extrapolated)
    python benchmarks/sample_efficiency.py profile --task half_cheetah --steps 50
    # FLOPs and CPU time of one G2 update, authors' settings vs cheaper variants
    python benchmarks/sample_efficiency.py update-cost --task half_cheetah
    # why a curve falls: how episodes end, the ensemble's foresight, the critic's bias (latest checkpoints)
    python benchmarks/sample_efficiency.py diagnose --task hopper        # or --run RUN_DIR [RUN_DIR ...]
    # where that bias comes from: the critic alone, policy frozen, under each target and data choice
    python benchmarks/sample_efficiency.py critic-probe --run RUN_DIR --updates 6000
    # aggregate whatever has run (finished or not) into benchmarks/RESULTS.md + a PNG per task
    python benchmarks/sample_efficiency.py report      # status prose from benchmarks/sample_efficiency_status.md

Both algorithms get the same env-step budget, the same number of uniformly random initial
steps (the MAAC config's `train.initial_random_steps`), the same torch thread count, the same
evaluation schedule and the same evaluation reset seeds (`maac_robot.learn.trainer.eval_seeds`),
deterministic policy. SAC uses SB3's SAC with the usual settings (256x256, lr 3e-4, batch 256,
tau 5e-3, one gradient step per env step) on Gymnasium's default observation (SAC has no
reason to see the root position). MAAC uses configs/<task>.yaml unchanged apart from seed and
budget. Runs live under benchmarks/runs/TASK/LABEL-sSEED/: their checkpoints and logs are git-ignored,
their records (meta.json, config.yaml, metrics.jsonl) are committed, so `report` can regenerate
RESULTS.md from any clone (a lost machine once took sessions 1-7's records with it). LABEL is `maac`
or `maac[key=value,...]`: what the run's config changes from configs/TASK.yaml *as it is now*. When a
task's config changes, rename its earlier runs after what they change from the new one (meta.json
keeps a `relabelled` entry); a test checks every record's label against its config.yaml. A record
whose checkpoint is not on this machine is not continued or overwritten (`run --restart` replaces it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Sample efficiency and training cost (issue 2)"
PROFILE_JSON = ROOT / "benchmarks" / "profile_half_cheetah.json"
STATUS_MD = ROOT / "benchmarks" / "sample_efficiency_status.md"  # the prose under the section's header
TASKS = {"inverted_pendulum": "InvertedPendulum-v5", "hopper": "Hopper-v5", "half_cheetah": "HalfCheetah-v5",
         "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
TARGETS = {"inverted_pendulum": [(1000.0, 3000)], "hopper": [(2500.0, 20000)],  # task -> [(return, within env steps)]
           "half_cheetah": [(5000.0, 20000), (10000.0, 50000)]}
NOT_TRAINING = ("eval", "checkpoint")  # phases that are bookkeeping, not the cost of learning


def _config(task: str, seed: int, steps: int, threads: int | None = None,
            extra: dict[str, Any] | None = None):  # -> maac_robot.learn.config.Config
    from maac_robot.learn.config import load_config

    overrides: dict[str, Any] = {"train.seed": seed, "train.total_steps": steps, **(extra or {})}
    if threads is not None:
        overrides["train.num_threads"] = threads
    return load_config(ROOT / "configs" / f"{task}.yaml", overrides)


def _machine() -> dict[str, Any]:
    import gymnasium
    import mujoco
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "mujoco": mujoco.__version__,
                "gymnasium": gymnasium.__version__, "numpy": np.__version__}
    try:
        import stable_baselines3

        versions["stable_baselines3"] = stable_baselines3.__version__
    except ImportError:
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "versions": versions,
            "commit": commit.strip()}


def _label(algo: str, variant: dict[str, Any]) -> str:
    """'maac', or 'maac[num_samples=1,...]' for a run that departs from configs/<task>.yaml."""
    if not variant:
        return algo
    return algo + "[" + ",".join(f"{k.split('.')[-1]}={v}" for k, v in variant.items()) + "]"


# Fields that say how long or where a run ran, not what it computes: not part of a run's label.
_NOT_VARIANT = ("train.seed", "train.total_steps", "train.num_threads")


def config_variant(task: str, config_yaml: Path) -> dict[str, Any]:
    """What a run's resolved config (its config.yaml) changes from configs/<task>.yaml, as dotted keys.

    A run's label must equal this: labels are read against the config as it is now, so a change to
    configs/<task>.yaml turns the label of every earlier run into a claim about a different config. The
    test suite checks every committed record, and `run` refuses to resume one whose label went stale."""
    from maac_robot.learn.config import load_config

    return _variant(task, load_config(config_yaml).model_dump(mode="json"))


def _variant(task: str, ran: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`config_variant` of a resolved config (its model_dump), in the config's field order."""
    from maac_robot.learn.config import load_config

    base = load_config(ROOT / "configs" / f"{task}.yaml").model_dump(mode="json")
    return {f"{section}.{key}": value for section, fields in ran.items() for key, value in fields.items()
            if f"{section}.{key}" not in _NOT_VARIANT and base[section][key] != value}


def _run_label(run_dir: Path) -> str:
    """benchmarks/runs/TASK/LABEL-sSEED -> LABEL (what the report groups the run under)."""
    return run_dir.name.rpartition("-s")[0]


def label_overrides(label: str) -> dict[str, str]:
    """'maac[tau=0.02,steve_horizon=5]' -> {'tau': '0.02', 'steve_horizon': '5'} (short keys, as labels write them)."""
    _, _, rest = label.partition("[")
    return dict(item.split("=", 1) for item in rest.rstrip("]").split(",")) if rest else {}


def _same_value(written: str, value: Any) -> bool:
    import yaml

    loaded = yaml.safe_load(written)
    try:
        return float(loaded) == float(value)  # '1e-3' (YAML 1.1 reads it as a string) == 0.001
    except (TypeError, ValueError):
        return loaded == value


def label_matches(label: str, variant: dict[str, Any]) -> bool:
    """Whether a label's overrides say exactly what `variant` (from `config_variant`) changes."""
    written = label_overrides(label)
    short = {key.split(".")[-1]: value for key, value in variant.items()}
    return written.keys() == short.keys() and all(_same_value(written[k], short[k]) for k in written)


def _display(label: str) -> str:
    name, bracket, rest = label.partition("[")
    return name.upper() + bracket + rest


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    variant = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set expects section.key=value, got {item!r}")
        variant[key] = yaml.safe_load(value)
    return variant


def _write_meta(run_dir: Path, algo: str, task: str, seed: int, steps: int, threads: int, resumed: bool = False
                ) -> None:
    """Record how a run was started; a resumed MAAC run keeps that record and appends each resume to it,
    so the commit and thread count every stretch of its curve ran under stay known."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "meta.json"
    meta = {"algo": algo, "task": task, "env_id": TASKS[task], "seed": seed, "planned_steps": steps,
            "threads": threads, "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **_machine()}
    if resumed and path.is_file():
        first = json.loads(path.read_text())
        resume = {k: meta[k] for k in ("started", "commit", "threads", "command", "planned_steps")}
        meta = {**first, "planned_steps": steps, "resumes": [*first.get("resumes", []), resume]}
    path.write_text(json.dumps(meta, indent=1))


def _claim_record(run_dir: Path, algo: str, restart: bool) -> None:
    """Refuse to write into a committed record that this checkout cannot continue (unless `restart`).

    A MAAC run resumes from its checkpoint; a record without one (trained on another machine: checkpoints
    are not committed) or any SAC record (SB3 runs are not resumed) would otherwise be appended to or wiped
    by a run that starts over, mixing two runs under one label or losing the record."""
    metrics = run_dir / "metrics.jsonl"
    resumable = algo == "maac" and (run_dir / "checkpoints" / "latest.pt").is_file()
    if not metrics.is_file() or (resumable and not restart):
        return
    if not restart:
        rows = _read_jsonl(metrics)
        last = rows[-1]["env_step"] if rows else 0
        raise SystemExit(f"{run_dir} already holds a record ({len(rows)} evaluations, to env step {last}) and no "
                         "checkpoint to continue it from; --restart replaces it with a new run")
    metrics.unlink()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


# ---- MAAC ---------------------------------------------------------------------------------------


def run_maac(task: str, seed: int, steps: int, run_dir: Path, threads: int | None, variant: dict[str, Any]) -> None:
    from maac_robot.learn.trainer import train

    cfg = _config(task, seed, steps, threads, variant)
    resume = (run_dir / "checkpoints" / "latest.pt").is_file()
    ran = config_variant(task, run_dir / "config.yaml") if resume else {}
    if resume and not label_matches(_run_label(run_dir), ran):
        raise SystemExit(
            f"{run_dir} ran a config that its label no longer names (configs/{task}.yaml changed since): "
            f"it changes {ran} from the config as it is now. "
            "Rename the run after what it changes before resuming it, or start the variant afresh.")
    threads_used = cfg.train.num_threads or os.cpu_count() or 1
    _write_meta(run_dir, _run_label(run_dir), task, seed, steps, threads_used, resumed=resume)
    train(cfg, run_dir, resume=resume, progress=False)


def branch_run(source: Path, run_dir: Path) -> dict[str, Any]:
    """Start `run_dir` as a copy of `source` at its latest checkpoint (same buffers, model, agent, RNG), so a
    variant resumed from it differs from the source's own continuation only in what the variant changes.
    The copy's meta.json records where it branched; its curve up to that step is the source's."""
    from maac_robot.learn.trainer import RunPaths, load_checkpoint

    if RunPaths(run_dir).checkpoint.is_file():
        raise SystemExit(f"{run_dir} already has a checkpoint; --branch-from starts a run, it does not replace one")
    env_step = int(load_checkpoint(RunPaths(source).checkpoint)["env_step"])
    shutil.copytree(source, run_dir, dirs_exist_ok=True)
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["branched_from"] = {"run": f"{meta['algo']}-s{meta['seed']}", "env_step": env_step}
    meta["algo"] = _run_label(run_dir)
    meta["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta["branched_from"]


# ---- SAC (Stable-Baselines3) ----------------------------------------------------------------------


def run_sac(task: str, seed: int, steps: int, run_dir: Path, threads: int | None, variant: dict[str, Any]) -> None:
    import gymnasium as gym
    import torch
    from maac_robot.learn.trainer import eval_seeds
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    if variant:
        raise SystemExit("--set applies to MAAC's config only")
    cfg = _config(task, seed, steps, threads)
    threads = cfg.train.num_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    _write_meta(run_dir, "sac", task, seed, steps, threads)
    metrics = run_dir / "metrics.jsonl"
    seeds = eval_seeds(seed, cfg.train.eval_episodes)
    eval_env = gym.make(cfg.env.id, max_episode_steps=cfg.env.max_episode_steps)

    def evaluate(model: SAC) -> np.ndarray:
        returns = []
        for s in seeds:
            obs, _ = eval_env.reset(seed=s)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = eval_env.step(model.predict(obs, deterministic=True)[0])
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
        return np.asarray(returns)

    class Evaluate(BaseCallback):
        """Deterministic evaluation every `train.eval_every` env steps; time spent here is not training time."""

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
            if self.num_timesteps % cfg.train.eval_every and self.num_timesteps != steps:
                return True
            self._lap("train")
            returns = evaluate(self.model)
            self._lap("eval")
            record = {"env_step": self.num_timesteps, "eval_return_mean": float(returns.mean()),
                      "eval_return_std": float(returns.std()), "eval_returns": returns.tolist(),
                      "wall_time_s": round(sum(self.wall.values()), 3),
                      "phase_time_s": {k: round(v, 3) for k, v in self.wall.items()},
                      "phase_cpu_s": {k: round(v, 3) for k, v in self.cpu.items()}}
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            return True

    env = gym.make(cfg.env.id, max_episode_steps=cfg.env.max_episode_steps)
    a = cfg.agent
    model = SAC("MlpPolicy", env, learning_rate=a.lr, buffer_size=cfg.train.buffer_size,
                learning_starts=cfg.train.initial_random_steps, batch_size=a.batch_size, tau=a.tau, gamma=a.gamma,
                train_freq=1, gradient_steps=1, policy_kwargs={"net_arch": [a.hidden] * a.layers}, seed=seed,
                device="cpu", verbose=0)
    model.learn(total_timesteps=steps, callback=Evaluate())


# ---- profile --------------------------------------------------------------------------------------


def profile(task: str, steps: int, out: Path, threads: int | None) -> dict[str, Any]:
    """Where 1000 env steps of MAAC at the authors' settings go, from `steps` measured learning steps.

    The random phase runs first (env steps only), so D_env holds what the authors' schedule holds
    when learning starts. Then: the first (cold) model fit, `steps` env steps of Algorithm 1 (each
    with its G2 updates; a rollout round at the start), and a second (warm-started) fit, each timed.
    Inside the G2 updates, STEVE targets and the MAAC policy objective's forward pass are timed by
    wrapping the agent's functions; the rest of an update is the critic and actor backward passes and
    optimiser steps. Per 1000 env steps = 1000/train_every warm fits + 1000/rollout.every rounds +
    1000 env steps with their updates: an extrapolation from measured parts, stated as such.
    """
    import tempfile

    import maac_robot.learn.agent as agent_module
    import torch
    from maac_robot.learn.trainer import Trainer

    cfg = _config(task, 0, 10**9, threads)
    inner: dict[str, float] = {"steve_targets": 0.0, "policy_objective_forward": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inner[name] += time.perf_counter() - start
        return wrapper

    agent_module.steve_targets = timed("steve_targets", agent_module.steve_targets)
    agent_module.maac_policy_loss = timed("policy_objective_forward", agent_module.maac_policy_loss)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        while trainer.env_step < trainer.learning_starts - 1:
            trainer._env_step()
        trainer.cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
            "total_steps": trainer.env_step + steps, "eval_every": 10**9, "checkpoint_every": 10**9})})
        trainer.timers.clear()
        trainer.train(progress=False)  # first step fits (cold) and imagines, every step updates
        cold_fit = dict(trainer.fit_stats)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        trainer.fit_model()
        warm_fit_s, warm_fit_cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
        warm_fit = dict(trainer.fit_stats)
    c = cfg
    updates = steps * c.agent.updates_per_step
    fits, rounds = 1000 / c.model.train_every, 1000 / c.rollout.every

    def per_1000(timers: dict[str, float], warm_fit_time: float) -> dict[str, float]:
        return {f"model fit (warm, x{fits:g})": warm_fit_time * fits,
                f"imagined rollouts (x{rounds:g} rounds)": timers["rollout"] * rounds,
                f"G2 policy+Q updates (x{1000 * c.agent.updates_per_step})": timers["update"] / steps * 1000,
                "env steps + acting (x1000)": timers["env"] / steps * 1000}

    wall, cpu = per_1000(trainer.timers, warm_fit_s), per_1000(trainer.cpu_timers, warm_fit_cpu_s)
    share = {k: v / trainer.timers["update"] for k, v in inner.items()}
    share["critic+actor backward, optimisers, targets"] = 1.0 - sum(share.values())
    result = {"task": task, "env_id": TASKS[task], "measured_learning_steps": steps, "updates_measured": updates,
              "d_env": len(trainer.d_env), "torch_threads": torch.get_num_threads(),
              "cold_fit_s": round(trainer.timers["model_fit"], 2), "cold_fit_cpu_s": round(trainer.cpu_timers["model_fit"], 2),
              "cold_fit": cold_fit, "warm_fit_s": round(warm_fit_s, 2), "warm_fit_cpu_s": round(warm_fit_cpu_s, 2),
              "warm_fit": warm_fit, "rollout_round_s": round(trainer.timers["rollout"], 3),
              "update_ms": round(trainer.timers["update"] / updates * 1000, 1),
              "update_cpu_ms": round(trainer.cpu_timers["update"] / updates * 1000, 1),
              "update_share": {k: round(v, 3) for k, v in share.items()},
              "per_1000_steps_wall_s": {k: round(v, 1) for k, v in wall.items()},
              "per_1000_steps_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
              "s_per_1000_steps_wall": round(sum(wall.values()), 1),
              "s_per_1000_steps_cpu": round(sum(cpu.values()), 1),
              "load_average": os.getloadavg(),
              "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **_machine()}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


FLOPS_JSON = ROOT / "benchmarks" / "update_cost_half_cheetah.json"
# The authors' settings, then the knobs that set the cost of one G2 update (all but precision change what is computed).
UPDATE_VARIANTS: list[dict[str, Any]] = [
    {}, {"train.precision": "bfloat16"}, {"agent.terminal_q_samples": 1},
    {"agent.num_samples": 1, "agent.terminal_q_samples": 1},
    {"agent.num_samples": 1, "agent.terminal_q_samples": 1, "agent.updates_per_step": 2},
    {"agent.num_samples": 1, "agent.terminal_q_samples": 1, "agent.updates_per_step": 2, "train.precision": "bfloat16"},
]


def _update_cpu_s(trainer, updates: int = 10) -> float:  # trainer: maac_robot.learn.trainer.Trainer
    """CPU seconds of one G2 update through the trainer's own G2 step (batch draws and `train.precision`
    included), averaged over at least `updates` after a warm-up (the process's CPU time: 1 thread, no idle)."""
    trainer.update()
    first, start = trainer.update_count, time.process_time()
    while trainer.update_count - first < updates:
        trainer.update()
    return (time.process_time() - start) / (trainer.update_count - first)


def _matmul_gflops(dtype_name: str, rows: int = 6400, width: int = 256, reps: int = 50) -> float:
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


def _cost_row(variant: dict[str, Any] | str, gflop: float, cpu_s: float, updates_per_step: int) -> dict[str, Any]:
    row = {"variant": variant, "gflop_per_update": gflop, "cpu_ms_per_update": round(cpu_s * 1000, 1),
           "updates_cpu_s_per_1000_steps": round(cpu_s * 1000 * updates_per_step, 1)}
    print(json.dumps(row), flush=True)
    return row


def update_cost(task: str, out: Path, threads: int) -> list[dict[str, Any]]:
    """FLOPs (torch's FlopCounterMode) and CPU time of one G2 update, for the authors' settings and
    cheaper variants: shows whether the update is compute-bound and what 150 s / 1000 steps would take."""
    import tempfile

    import torch
    from maac_robot.learn.trainer import Trainer
    from torch.utils.flop_counter import FlopCounterMode

    rows, top_ops = [], {}
    for variant in UPDATE_VARIANTS:
        # A small D_env and a 1-epoch fit suffice: an update's cost does not depend on how good the model is.
        cfg = _config(task, 0, 10**9, threads, {"train.initial_random_steps": 300, "model.max_epochs": 1, **variant})
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp))
            while trainer.env_step < trainer.learning_starts:
                trainer._env_step()
            trainer.fit_model()
            trainer.imagine()
            batches = trainer._batches()
            trainer.agent.update(*batches[0], trainer.model)  # warm-up
            with FlopCounterMode(display=False) as counter:
                trainer.agent.update(*batches[1], trainer.model)
            cpu = _update_cpu_s(trainer)
            if not variant:  # where the authors' update spends its time, by operator
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for i in range(4):
                        trainer.agent.update(*batches[i % len(batches)], trainer.model)
                events = prof.key_averages()
                total = sum(e.self_cpu_time_total for e in events)
                top_ops = {e.key: round(e.self_cpu_time_total / total, 3)
                           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]}
            gflop = round(counter.get_total_flops() / 1e9, 2)
            rows.append(_cost_row(variant or "authors' settings", gflop, cpu, cfg.agent.updates_per_step))
            if not variant:  # does torch.compile (inductor) pay? Same maths, fused element-wise kernels.
                agent = trainer.agent
                for net in (agent.actor.net, agent.critic.q1, agent.critic.q2, agent.critic_target.q1,
                            agent.critic_target.q2):
                    net.forward = torch.compile(net.forward, dynamic=False)  # (nn.Module.compile() was a no-op here)
                trainer.model._forward = torch.compile(trainer.model._forward, dynamic=False)
                trainer.update()  # compiles (one graph per batch shape); the timing below is steady state
                rows.append(_cost_row("authors' settings, torch.compile of actor, critics and ensemble", gflop,
                                      _update_cpu_s(trainer), cfg.agent.updates_per_step))
    matmul = {name: _matmul_gflops(name) for name in ("float32", "bfloat16")}
    print(json.dumps({"matmul_gflops": matmul}), flush=True)
    out.write_text(json.dumps({"task": task, "threads": threads, "rows": rows, "top_ops_self_cpu_share": top_ops,
                               "matmul_gflops": matmul,
                               "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **_machine()}, indent=1))
    return rows


# ---- diagnose and critic-probe: why the curves fall (maac_robot.learn.diagnostics) --------------------------

DIAGNOSE_JSON = ROOT / "benchmarks" / "diagnose.json"


def _run_name(run_dir: Path) -> str:
    return str(run_dir.resolve().relative_to(ROOT) if run_dir.resolve().is_relative_to(ROOT) else run_dir)


def _provenance() -> dict[str, str]:
    """The command line that produced a result, and when: stored beside it so RESULTS.md can cite it."""
    return {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _merge_runs(out: Path, rows: list[dict[str, Any]], keys: tuple[str, ...] = ("run",)) -> None:
    """Add or replace `rows` (keyed by their `keys`) in the JSON file `out`, keeping the other rows."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(r[k] for k in keys)

    merged = {key(r): r for r in (json.loads(out.read_text())["runs"] if out.is_file() else [])}
    merged.update({key(r): r for r in rows})
    out.write_text(json.dumps({"runs": sorted(merged.values(), key=key)}, indent=1))


def diagnose_run(run_dir: Path, episodes: int) -> dict[str, Any]:
    """`maac_robot.learn.diagnostics.diagnose` of a run's latest checkpoint on its evaluation reset seeds."""
    from maac_robot.learn.diagnostics import diagnose
    from maac_robot.learn.trainer import eval_seeds, load_run

    run = load_run(run_dir)
    return {"run": _run_name(run_dir), "env_step": run.env_step, "alpha": round(run.agent.alpha, 4),
            "episodes": diagnose(run, eval_seeds(run.config.train.seed, episodes))}


ENTROPY_PRESSURE_JSON = ROOT / "benchmarks" / "entropy_pressure.json"


def entropy_pressure_run(run_dir: Path, states: int, draws: int, name: str | None = None) -> dict[str, Any]:
    """`maac_robot.learn.diagnostics.entropy_pressure` of a run's latest checkpoint, from `states` start states drawn
    from its D_env and D_model in the proportions of an actor batch (the run directory is only read)."""
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
    return {"run": name or _run_name(run_dir), "env_step": run.env_step, "states": states, "draws": draws,
            **json.loads(json.dumps(result), parse_float=lambda x: round(float(x), 4))}


CRITIC_PROBE_JSON = ROOT / "benchmarks" / "critic_probe.json"
PROBE_FIT_ROWS = 5000  # rows per data slice in the probe's fit check
PROBE_VARIANTS = {  # name -> (STEVE-expanded targets, D_model rows in the batch, factor on the Polyak rate τ,
    #                      agent.critic_pessimism, None: the run's own)
    "as trained (STEVE, real + imagined)": (True, True, 1.0, None),
    "one-step targets, real + imagined": (False, True, 1.0, None),
    "STEVE, real data only": (True, False, 1.0, None),
    "one-step targets, real data only": (False, False, 1.0, None),
    # Policy evaluation contracts the error by ~γ per target-network turnover (~1/τ updates): 10× τ tests
    # whether the bias is the critic's propagation speed rather than its data or targets.
    "as trained, 10× τ": (True, True, 10.0, None),
    # The twin min underestimates a little per backup, and that compounds over ~1/(1−γ) steps.
    "as trained, twin mean": (True, True, 1.0, 0.0),
    "one-step targets, real data only, twin mean": (False, False, 1.0, 0.0),
}


def critic_probe(run_dir: Path, updates: int, every: int, episodes: int) -> dict[str, Any]:
    """Where a critic's bias comes from: policy evaluation with the run's policy frozen.

    From a run's latest checkpoint (D_env, D_model, ensemble, critic and its optimiser restored), the
    critic alone takes `updates` G2 steps under each of `PROBE_VARIANTS`, restarting each time from the
    checkpoint's critic. Its bias (as in `diagnose_run`: min-twin Q minus the realised soft return on
    `episodes` stochastic episodes of the frozen policy) is measured every `every` steps. A bias that
    shrinks under every variant means the critic only lagged the moving policy; one that stays (or
    grows) under one target or data source names that source; one that shrinks much faster with a larger
    τ says the lag is the target network's. The run directory is only read.
    """
    import shutil
    import tempfile

    import torch

    from maac_robot.learn.buffer import Batch
    from maac_robot.learn.config import load_config
    from maac_robot.learn.evaluation import critic_bias, measured_soft_returns, rollout_episode
    from maac_robot.envs import make_env
    from maac_robot.learn.trainer import Trainer, eval_seeds, load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # Trainer writes to its run dir; work on a copy
        work = Path(tmp) / "run"
        (work / "checkpoints").mkdir(parents=True)
        shutil.copy(run_dir / "config.yaml", work / "config.yaml")
        shutil.copy(run_dir / "checkpoints" / "latest.pt", work / "checkpoints" / "latest.pt")
        cfg = load_config(work / "config.yaml")
        trainer = Trainer(cfg, work)
        trainer.load_checkpoint()
        trainer.env.close()
        agent, model, gamma = trainer.agent, trainer.model, cfg.agent.gamma
        saved = load_checkpoint(work / "checkpoints" / "latest.pt", cfg.env.id)["agent"]
    env = make_env(cfg.env.id, max_episode_steps=cfg.env.max_episode_steps)
    try:
        eps = [rollout_episode(agent, env, seed, deterministic=False) for seed in eval_seeds(cfg.train.seed, episodes)]
    finally:
        env.close()

    def bias() -> float:
        diffs = np.concatenate([q - g for q, g in (critic_bias(agent, ep, gamma) for ep in eps)])
        return round(float(diffs.mean()), 2)

    # Before any probe update: does the critic fit its own targets on the data it trains on? A critic that
    # does, yet misjudges the frozen policy's episodes, was taught by data unlike them (older or other behaviour).
    rng = np.random.default_rng(cfg.train.seed)
    slices = {"D_env, last 1000 steps": (trainer.d_env, trainer.d_env.recent_indices(1000)),
              "D_env, all": (trainer.d_env, rng.permutation(len(trainer.d_env))[:PROBE_FIT_ROWS]),
              "D_model, all": (trainer.d_model, rng.permutation(len(trainer.d_model))[:PROBE_FIT_ROWS])}
    fit = {}
    torch.manual_seed(cfg.train.seed)
    for name, (buffer, idx) in slices.items():
        if len(idx) == 0:
            continue
        batch = buffer.batch(idx)
        with torch.no_grad():
            q = torch.min(*agent.critic(batch.state, batch.action))
            target = agent.critic_targets(batch, model)
        fit[name] = {"rows": len(idx), "reward": round(float(batch.reward.mean()), 3),
                     "terminal": round(float(batch.terminated.float().mean()), 4),
                     "q": round(float(q.mean()), 2), "target": round(float(target.mean()), 2)}

    curves, agent_cfg = {}, agent.cfg
    for name, (steve, imagined, tau_factor, pessimism) in PROBE_VARIANTS.items():
        agent.load_state_dict(saved)
        agent.cfg = agent_cfg.model_copy(update={
            "tau": agent_cfg.tau * tau_factor,
            "critic_pessimism": agent_cfg.critic_pessimism if pessimism is None else pessimism})
        torch.manual_seed(cfg.train.seed)
        rng = np.random.default_rng(cfg.train.seed)
        n_real, n_model = agent.batch_split(model_data=imagined)
        curve = [(0, bias())]
        for step in range(1, updates + 1):
            parts = [trainer.d_env.sample(n_real, rng)] + ([trainer.d_model.sample(n_model, rng)] if n_model else [])
            agent.update_critic(Batch.cat(parts), model, steve=steve)
            if step % every == 0:
                curve.append((step, bias()))
        curves[name] = curve
    agent.cfg = agent_cfg
    return {"run": _run_name(run_dir), "env_step": trainer.env_step, "alpha": round(agent.alpha, 4),
            "steps_measured": sum(len(measured_soft_returns(ep, agent.alpha, gamma)) for ep in eps),
            "episodes": episodes,
            "stochastic_return": round(float(np.mean([ep["rewards"].sum() for ep in eps])), 1),
            "episode_steps": sum(len(ep["rewards"]) for ep in eps),
            "episode_reward": round(float(np.mean(np.concatenate([ep["rewards"] for ep in eps]))), 3),
            "fit_at_checkpoint": fit, "bias_by_updates": curves}


def diagnose(task: str | None, runs: list[Path], episodes: int, out: Path) -> list[dict[str, Any]]:
    """`diagnose_run` for the given run directories, or every MAAC run of `task` with a checkpoint;
    results merged into `out` by run (a rerun replaces that run's row, other rows stay)."""
    if task is not None:
        runs = [p.parent.parent for p in sorted((RUNS / task).glob("maac*/checkpoints/latest.pt"))]
    rows = [{**diagnose_run(run_dir, episodes), **_provenance()} for run_dir in runs]
    _merge_runs(out, rows)
    return rows


# ---- report ---------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_time(row: dict[str, Any], key: str = "phase_time_s") -> float:
    return sum(v for k, v in row[key].items() if k not in NOT_TRAINING)


def _runs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """task -> algo -> [{meta, rows}] for every run directory that has metrics."""
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for meta_path in sorted(RUNS.glob("*/*/meta.json")):
        meta = json.loads(meta_path.read_text())
        rows = _read_jsonl(meta_path.parent / "metrics.jsonl")
        if rows:
            found.setdefault(meta["task"], {}).setdefault(meta["algo"], []).append({"meta": meta, "rows": rows})
    return found


def _curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[int]]:
    """Eval steps with mean and std over the seeds that reached them (and how many did)."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            by_step.setdefault(row["env_step"], []).append(row["eval_return_mean"])
    steps = sorted(by_step)
    return (steps, [float(np.mean(by_step[s])) for s in steps], [float(np.std(by_step[s])) for s in steps],
            [len(by_step[s]) for s in steps])


def _first_reaching(steps: list[int], means: list[float], level: float) -> int | None:
    return next((s for s, m in zip(steps, means) if m >= level), None)


def _planned(meta: dict[str, Any]) -> int:
    """Where a run will end: its planned steps, or where `mark-stopped` recorded it was given up."""
    return meta["stopped"]["env_step"] if "stopped" in meta else meta["planned_steps"]


def mark_stopped(run_dir: Path, why: str) -> dict[str, Any]:
    """Record in a run's meta.json that it will not be resumed (at its last evaluation), and why, so the
    report stops calling its targets open."""
    meta_path = run_dir / "meta.json"
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    if not meta_path.is_file() or not rows:
        raise SystemExit(f"{run_dir} is not a benchmark run with metrics")
    meta = json.loads(meta_path.read_text())
    meta["stopped"] = {"env_step": rows[-1]["env_step"], "why": why, **_provenance()}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta["stopped"]


def _target_verdict(runs: list[dict[str, Any]], level: float, budget: int) -> str:
    """Whether the mean over seeds reached `level` within `budget` env steps, and where each seed first did.

    A miss is only called one when the runs got to the budget: runs still under way are 'open', and runs
    planned shorter than the budget say so, rather than counting as failures of a test never taken.
    """
    steps, means, _, counts = _curve(runs)
    hit = _first_reaching(steps, means, level)
    furthest = max(r["rows"][-1]["env_step"] for r in runs)
    planned = max(_planned(r["meta"]) for r in runs)
    verdict = ("meets it" if hit is not None and hit <= budget
               else "misses it" if hit is not None or furthest >= budget
               else f"open: the runs continue to {planned}" if planned > furthest
               else f"not run to {budget}")
    reached = f"reached at {hit} env steps{_over_fewer(counts[steps.index(hit)], len(runs))}" if hit is not None \
        else f"not reached by {furthest}"
    per_seed = ", ".join(
        f"seed {r['meta']['seed']}: "
        + str(_first_reaching([x["env_step"] for x in r["rows"]], [x["eval_return_mean"] for x in r["rows"]], level)
              or f"not by {r['rows'][-1]['env_step']}")
        for r in sorted(runs, key=lambda r: r["meta"]["seed"]))
    return f"mean over seeds {reached} ({verdict}); first evaluation at or above it per seed: {per_seed}"


def _over_fewer(n: int, of: int) -> str:
    """A mean over fewer than all of a variant's seeds (the others stopped earlier) says so."""
    return f" (a mean over {n} of its {of} seeds: the others stopped earlier)" if n < of else ""


def _cost(runs: list[dict[str, Any]]) -> str:
    """Training seconds per 1000 env steps, eval excluded: wall and (where recorded) CPU, overall and
    over the last eval interval (learning phase; the random phase is nearly free)."""
    parts = []
    for key, label in (("phase_time_s", "wall"), ("phase_cpu_s", "CPU")):
        measured = [r["rows"] for r in runs if key in r["rows"][-1]]
        if not measured:
            continue
        overall = [_train_time(rows[-1], key) / rows[-1]["env_step"] * 1000 for rows in measured]
        recent = [(_train_time(rows[-1], key) - _train_time(rows[-2], key)) / (rows[-1]["env_step"] - rows[-2]["env_step"])
                  * 1000 for rows in measured if len(rows) >= 2 and key in rows[-2]]
        text = f"{label} {np.mean(overall):.1f} s overall"
        if recent:
            text += f", {np.mean(recent):.1f} s in the last eval interval"
        parts.append(f"{text} (n={len(measured)})")
    return "; ".join(parts)


def report(note: str | None = None) -> str:
    from maac_robot.learn.plotting import plot_learning_curves

    found = _runs()
    lines = [SECTION, "",
             "Generated by `python benchmarks/sample_efficiency.py report` from the runs under `benchmarks/runs/`.",
             "Returns are deterministic-policy evaluation returns (mean over the seeds that reached that step "
             "± std across seeds; each seed's value is itself the mean of `train.eval_episodes` episodes).",
             "Envs are Gymnasium v5 (mujoco 4.0), not the paper's MBBL variants, except HalfCheetah whose reward matches.",
             ""]
    if note:
        lines += [note.strip(), ""]
    if PROFILE_JSON.is_file():
        p = json.loads(PROFILE_JSON.read_text())
        lines += [f"### Profile: cost of 1000 env steps of MAAC at the authors' settings ({p['env_id']})", "",
                  f"`{p['command']}` on {p['cpu']} ({p['cores']} cores shared with other jobs, load average "
                  f"{p['load_average'][0]:.1f} at the end, torch threads {p['torch_threads']}), {p['date']}, "
                  f"commit {p['commit']}. After the 5k random steps (D_env {p['d_env']}): cold model fit "
                  f"{p['cold_fit_cpu_s']} CPU-s ({p['cold_fit']['epochs']:.0f} epochs), warm fit {p['warm_fit_cpu_s']} "
                  f"CPU-s ({p['warm_fit']['epochs']:.0f} epochs), one rollout round {p['rollout_round_s']} s, "
                  f"{p['updates_measured']} G2 updates at {p['update_cpu_ms']} CPU-ms each ({p['update_ms']} ms wall). "
                  "Extrapolated to 1000 env steps (CPU seconds = what it costs on a core of its own; wall = what it "
                  "took on this shared machine):", "",
                  "| part | CPU s / 1000 env steps | share | wall s / 1000 env steps |", "|---|---|---|---|"]
        total = p["s_per_1000_steps_cpu"]
        lines += [f"| {k} | {v:.1f} | {100 * v / total:.0f} % | {p['per_1000_steps_wall_s'][k]:.1f} |"
                  for k, v in p["per_1000_steps_cpu_s"].items()]
        lines += [f"| **total** | **{total:.1f}** | target ≤ 150 s | {p['s_per_1000_steps_wall']:.1f} |", "",
                  "Inside one G2 update (wall shares): "
                  + ", ".join(f"{k} {100 * v:.0f} %" for k, v in p["update_share"].items()) + ".", ""]
    if FLOPS_JSON.is_file():
        f = json.loads(FLOPS_JSON.read_text())
        lines += [f"One G2 update on {TASKS[f['task']]}, FLOPs by torch's FlopCounterMode, CPU time at {f['threads']} "
                  f"thread(s) (`{f['command']}`, {f['date']}):", "",
                  "| settings | GFLOP / update | CPU ms / update | CPU s of updates / 1000 env steps |", "|---|---|---|---|"]
        lines += [f"| {json.dumps(r['variant']) if isinstance(r['variant'], dict) else r['variant']} | "
                  f"{r['gflop_per_update']} | {r['cpu_ms_per_update']} | {r['updates_cpu_s_per_1000_steps']} |"
                  for r in f["rows"]]
        lines += ["", "Self-CPU share by operator in the authors' update (torch.profiler, 4 updates): "
                  + ", ".join(f"{k} {100 * v:.0f} %" for k, v in f["top_ops_self_cpu_share"].items())
                  + " — dense matmuls dominate: the update is compute-bound.", ""]
        if "matmul_gflops" in f:
            lines += ["One 6400×256 by 256×256 matmul on the same thread count (the ceiling for this work): "
                      + ", ".join(f"{k} {v} GFLOP/s" for k, v in f["matmul_gflops"].items()) + ".", ""]
    if DIAGNOSE_JSON.is_file():
        lines += _diagnosis_table(json.loads(DIAGNOSE_JSON.read_text()))
    if CRITIC_PROBE_JSON.is_file():
        lines += _probe_table(json.loads(CRITIC_PROBE_JSON.read_text()))
    if ENTROPY_PRESSURE_JSON.is_file():
        lines += _entropy_pressure_table(json.loads(ENTROPY_PRESSURE_JSON.read_text()))
    for task, algos in sorted(found.items()):
        curves, members, partial, table = {}, {}, {}, {}
        for algo, runs in sorted(algos.items()):
            steps, means, stds, counts = _curve(runs)
            common = [i for i, n in enumerate(counts) if n == len(runs)]  # the mean line: steps every seed reached
            short = _legend_name(algo)
            label = f"{short}, 1 seed" if len(runs) == 1 else f"{short}, mean ± std of {len(runs)} seeds"
            if len(common) < len(steps):  # some seeds are further on: their mean continues dashed
                label += " (dashed: fewer seeds)"
                beyond = range(common[-1] if common else 0, len(steps))
                partial[label] = ([steps[i] for i in beyond], [means[i] for i in beyond])
            curves[label] = tuple([seq[i] for i in common] for seq in (steps, means, stds))
            members[label] = [([x["env_step"] for x in r["rows"]], [x["eval_return_mean"] for x in r["rows"]])
                              for r in runs]
            table[algo] = {s: (m, sd, n) for s, m, sd, n in zip(steps, means, stds, counts)}
        png = ROOT / "benchmarks" / f"{task}_learning_curve.png"
        targets = TARGETS.get(task, [])
        plot_learning_curves(curves, png, targets=targets, members=members, partial=partial,
                             title=f"{TASKS[task]}: MAAC vs SAC\n(MAAC: configs/{task}.yaml [with overrides])")
        env_id = TASKS[task]
        lines += [f"### {env_id}", "", f"![{env_id}]({png.name})", ""]
        for algo, runs in sorted(algos.items()):
            seeds = ", ".join(f"seed {r['meta']['seed']}: {r['rows'][-1]['env_step']}/{r['meta']['planned_steps']} steps"
                              + (f" (stopped: {r['meta']['stopped']['why']})" if "stopped" in r["meta"] else "")
                              + (" (branched from {run} at its {env_step}-step checkpoint: the curve up to there is "
                                 "that run's)".format(**r["meta"]["branched_from"]) if "branched_from" in r["meta"] else "")
                              for r in runs)
            commands = "; ".join(f"`{c}`" for c in dict.fromkeys(r["meta"]["command"] for r in runs))
            lines.append(f"- {_display(algo)}: {seeds}; training time per 1000 env steps: {_cost(runs)}; "
                         f"command(s) {commands}")
        meta = next(iter(algos.values()))[0]["meta"]
        lines += [f"- machine: {meta['cpu']}, {meta['cores']} cores shared with other jobs, torch threads "
                  f"{meta['threads']}; versions {json.dumps(meta['versions'])}", ""]
        algos_sorted = sorted(table)
        lines += ["| env steps | " + " | ".join(_display(a) for a in algos_sorted) + " |",
                  "|---|" + "---|" * len(algos_sorted)]
        for s in sorted({s for t in table.values() for s in t}):
            cells = [f"{table[a][s][0]:.1f} ± {table[a][s][1]:.1f} (n={table[a][s][2]})" if s in table[a] else ""
                     for a in algos_sorted]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"- target {level:g} within {budget} env steps, {_display(algo)}: "
                  + _target_verdict(algos[algo], level, budget) for level, budget in targets for algo in algos_sorted]
        for algo in (a for a in algos_sorted if a.startswith("maac") and "sac" in table):
            sac_steps = sorted(table["sac"])
            sac_final = table["sac"][sac_steps[-1]][0]
            sac_hit = _first_reaching(sac_steps, [table["sac"][s][0] for s in sac_steps], sac_final)
            maac_steps = sorted(table[algo])
            maac_hit = _first_reaching(maac_steps, [table[algo][s][0] for s in maac_steps], sac_final)
            ratio = f"{maac_hit / sac_hit:.2f}" if maac_hit and sac_hit else f"n/a ({_display(algo)} has not reached it)"
            fewer = _over_fewer(table[algo][maac_hit][2], len(algos[algo])) if maac_hit else ""
            lines.append(f"- SAC's final return {sac_final:.1f} (at {sac_steps[-1]} steps, first reached at {sac_hit}): "
                         f"{_display(algo)} first reached it at {maac_hit}{fewer}; env-step ratio {ratio} (goal ≤ 0.25)")
        for algo in algos_sorted:
            for r in algos[algo]:
                logged = [(x["env_step"], x["critic_bias"]) for x in r["rows"] if x.get("critic_bias") is not None]
                if logged:
                    lines.append(f"- critic bias (min-twin Q − realised soft return, logged at each evaluation), "
                                 f"{_display(algo)} seed {r['meta']['seed']}: "
                                 + ", ".join(f"{step}: {b:+.1f}" for step, b in logged))
        lines.append("")
    text = "\n".join(lines)
    _replace_section(text)
    return text


def _diagnosis_table(d: dict[str, Any]) -> list[str]:
    """Per run (latest checkpoint): deterministic episodes, the critic's bias and the ensemble's foresight."""
    lines = ["### Diagnosis: value bias of the critic and the ensemble's foresight (latest checkpoints)", "",
             "`python benchmarks/sample_efficiency.py diagnose --task TASK` (each run's exact command and date are "
             "in `benchmarks/diagnose.json`); means over the evaluation reset seeds. *Deterministic* episodes (what "
             "the evaluation scores): return, length, last state, and foresight = share of elites whose open-loop "
             "mean prediction from k steps before a termination, under the real actions, ends in a terminal state "
             "(k = 1 / 5 / 20); model return = the H-step discounted reward the elites predict from each state of "
             "the episode under the real actions (open loop, H the actor's horizon), against the realised one: a "
             "model the actor exploits predicts more than the policy gets. *Stochastic* episodes from the same "
             "resets: Q(s₀) is the min-twin critic at the first state and action, G(s₀) the realised soft return (reward plus α·(−log π) of each later action "
             "taken, γ-discounted: an unbiased sample of what the critic estimates), bias = mean of "
             "Q(s_t, a_t) − G_t over the episode (steps within log 0.01 / log γ of a time-limit cut left out).", "",
             "| run | env step | return | length | last state (1st episode) | foresight k=1/5/20 "
             "| model return: predicted / real | stochastic return | Q(s₀) | G(s₀) | bias |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        eps = r["episodes"]
        biases = [e["q_bias_mean"] for e in eps if e["q_bias_mean"] is not None]
        ends = [e["elites_predicting_end"] for e in eps if e["elites_predicting_end"]]
        foresight = "/".join(f"{np.mean([f[k] for f in ends if k in f]):.2f}" if any(k in f for f in ends) else "–"
                             for k in ("1", "5", "20"))
        last = ", ".join(f"{k} {v}" for k, v in eps[0]["final_state"].items())
        imagined = [e["model_return"] for e in eps if e.get("model_return")]  # absent from rows diagnosed before it
        model = (f"{np.mean([m['predicted'] for m in imagined]):.2f} / {np.mean([m['real'] for m in imagined]):.2f} "
                 f"(H={eps[0]['model_return_steps']})" if imagined else "–")
        lines.append(
            f"| {r['run'].removeprefix('benchmarks/runs/')} | {r['env_step']} | {np.mean([e['return'] for e in eps]):.0f} | "
            f"{np.mean([e['length'] for e in eps]):.0f} | {last} | {foresight if ends else '– (none terminated)'} | {model} | "
            f"{np.mean([e['stochastic_return'] for e in eps]):.0f} | {np.mean([e['q_start'] for e in eps]):.1f} | "
            f"{np.mean([e['soft_return_start'] for e in eps if e['soft_return_start'] is not None]):.1f} | "
            f"{f'{np.mean(biases):.1f}' if biases else '– (all cut by the time limit)'} |")
    return lines + [""]


def _probe_fit_lines(r: dict[str, Any]) -> list[str]:
    """The checkpoint's critic against its own targets per data slice, beside the frozen policy's episodes."""
    fit = r.get("fit_at_checkpoint")
    if not fit:  # probes run before the fit check was added
        return []
    lines = ["| data (before any probe update) | rows | mean reward | terminal | mean Q | mean target |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {f['rows']} | {f['reward']:.3f} | {f['terminal']:.4f} | {f['q']:.1f} | {f['target']:.1f} |"
              for name, f in fit.items()]
    return lines + [f"| the frozen policy's stochastic episodes | {r['episode_steps']} | "
                    f"{r['episode_reward']:.3f} | | | |", ""]


def _probe_table(d: dict[str, Any]) -> list[str]:
    """Critic bias under policy evaluation, per probe variant, at each measured number of updates."""
    lines = ["### Where the critic's bias comes from: policy evaluation with the policy frozen", "",
             "`critic-probe` restarts the run's critic from its checkpoint for each variant and takes critic-only "
             "G2 steps (policy, α and ensemble frozen); the bias is measured as in the diagnosis, on the same "
             "stochastic episodes of the frozen policy throughout.", ""]
    for r in d["runs"]:
        curves = r["bias_by_updates"]
        steps = [u for u, _ in next(iter(curves.values()))]
        lines += [f"`{r['command']}` ({r['date']}): {r['run'].removeprefix('benchmarks/runs/')} at {r['env_step']} "
                  f"env steps, α {r['alpha']}, stochastic return {r['stochastic_return']} "
                  f"({r['steps_measured']} steps of {r['episodes']} episodes measured).", "",
                  *_probe_fit_lines(r),
                  "| critic-only updates | " + " | ".join(str(u) for u in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        lines += [f"| {name} | " + " | ".join(f"{b:+.1f}" for _, b in curve) + " |" for name, curve in curves.items()]
        lines.append("")
    return lines


def _entropy_pressure_table(d: dict[str, Any]) -> list[str]:
    """Per checkpoint: the entropy bonus's push on the first action's log σ against the objective's pull."""
    lines = ["### What sets the temperature α: entropy push against the objective's pull on log σ", "",
             "`python benchmarks/sample_efficiency.py entropy-pressure --run RUN_DIR` (each row's exact command and "
             "date are in `benchmarks/entropy_pressure.json`); `maac_robot.learn.diagnostics.entropy_pressure` on start "
             "states drawn from the checkpoint's D_env and D_model as an actor batch is. A shift δ_t added to the "
             "policy's log σ at imagined step t: *pull* = ∂J/∂δ_t of the actor's objective without its entropy term "
             "(negative: noise there costs return), *push* = α·∂E[−log π(a₀)]/∂δ₀. Auto-α holds the first "
             "action's entropy at its target, so it settles where push ≈ −Σ pull: a larger pull means a larger α. "
             "First-step pull split by source (model rewards / terminal Q, same noise) and by actor horizon "
             "(0 = SAC's Q-only actor on the same checkpoint).", "",
             "| run | env step | α | push | pull by step t = 0…H (H: terminal actions) | 1st-step pull: rewards / "
             "terminal Q | 1st-step pull at horizon " + "/".join(["0", "1", "2", "H"]) + " |",
             "|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        by_h = r["pull_first_step_by_horizon"]
        lines.append(f"| {r['run'].removeprefix('benchmarks/runs/')} | {r['env_step']} | {r['alpha']:.3f} | "
                     f"{r['push']:+.3f} | {' '.join(f'{v:+.3f}' for v in r['pull_by_step'])} | "
                     f"{r['pull_first_step']['rewards_only']:+.3f} / {r['pull_first_step']['terminal_q_only']:+.3f} | "
                     + " / ".join(f"{v:+.3f}" for v in by_h.values()) + f" (H={len(r['pull_by_step']) - 1}) |")
    return lines + [""]


def _legend_name(algo: str) -> str:
    """'maac[num_samples=1,updates_per_step=2,precision=bfloat16]' -> 'MAAC [ns=1, ups=2, bf16]': multi-word
    keys by their initials, the numerics-only precision switch by its dtype."""
    base = algo.partition("[")[0]
    overrides = label_overrides(algo)
    if not overrides:
        return base.upper()
    parts = []
    for key, value in overrides.items():
        if key == "precision":
            parts.append({"bfloat16": "bf16"}.get(value, value))
            continue
        words = key.split("_")
        parts.append(f"{''.join(w[0] for w in words) if len(words) > 1 else key}={value}")
    return f"{base.upper()} [{', '.join(parts)}]"


def _replace_section(text: str) -> None:
    """Rewrite only this benchmark's section of RESULTS.md; other sections belong to other benchmarks."""
    current = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmark results\n"
    start = current.find(SECTION)
    if start < 0:
        new = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = current.find("\n## ", start + len(SECTION))
        tail = current[end + 1:] if end >= 0 else ""
        new = current[:start] + text.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    RESULTS_MD.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--algo", choices=["maac", "sac"], required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both algorithms (default 1: this machine's 2 cores are shared)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="MAAC config override (a variant, labelled as such in the report)")
    p.add_argument("--branch-from", type=Path, metavar="RUN_DIR",
                   help="start from this MAAC run's latest checkpoint instead of from scratch (one seed)")
    p.add_argument("--restart", action="store_true",
                   help="replace an existing record that cannot be continued (a SAC run, or a MAAC run whose "
                        "checkpoint is not on this machine) with a new run")
    p = sub.add_parser("profile")
    p.add_argument("--task", choices=sorted(TASKS), default="half_cheetah")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=PROFILE_JSON)
    p.add_argument("--threads", type=int, help="torch threads (default: the config's train.num_threads)")
    p = sub.add_parser("update-cost")
    p.add_argument("--task", choices=sorted(TASKS), default="half_cheetah")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=FLOPS_JSON)
    p = sub.add_parser("diagnose")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", choices=sorted(TASKS), help="every MAAC run of this task")
    which.add_argument("--run", type=Path, nargs="+", default=[], help="these run directories")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--out", type=Path, default=DIAGNOSE_JSON)
    p = sub.add_parser("entropy-pressure", help="what sets α: the entropy push against the objective's pull on log σ")
    p.add_argument("--run", type=Path, nargs="+", required=True, help="MAAC run directories with a checkpoint")
    p.add_argument("--states", type=int, default=1024)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--name", help="the run's name in the results, for a copy kept of an earlier checkpoint (one --run)")
    p.add_argument("--out", type=Path, default=ENTROPY_PRESSURE_JSON)
    p = sub.add_parser("critic-probe")
    p.add_argument("--run", type=Path, required=True, help="a MAAC run directory with a checkpoint (not one training)")
    p.add_argument("--updates", type=int, default=4000)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--out", type=Path, default=CRITIC_PROBE_JSON)
    p = sub.add_parser("mark-stopped", help="record that a run will not be resumed, and why")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--why", required=True)
    p = sub.add_parser("report")
    p.add_argument("--note", type=Path, default=STATUS_MD,
                   help="markdown file whose text goes under the section's header (default: the committed status, "
                        "so regenerating the tables keeps it)")
    args = parser.parse_args(argv)
    if args.command == "run":
        for seed in args.seeds:
            variant = _parse_set(args.set)
            # The label is what the resolved config changes, in field order: the same variant always lands
            # in the same directory, and an override that restates the config is no variant at all.
            resolved = _config(args.task, seed, args.steps, args.threads, variant).model_dump(mode="json")
            run_dir = RUNS / args.task / f"{_label(args.algo, _variant(args.task, resolved))}-s{seed}"
            if args.branch_from:
                print(f"branched from {branch_run(args.branch_from, run_dir)}", flush=True)
            else:
                _claim_record(run_dir, args.algo, args.restart)
            start = time.perf_counter()
            (run_maac if args.algo == "maac" else run_sac)(args.task, seed, args.steps, run_dir, args.threads, variant)
            print(f"{args.algo} {args.task} seed {seed}: {args.steps} steps in {time.perf_counter() - start:.0f} s",
                  flush=True)
    elif args.command == "profile":
        profile(args.task, args.steps, args.out, args.threads)
    elif args.command == "update-cost":
        update_cost(args.task, args.out, args.threads)
    elif args.command == "critic-probe":
        result = {**critic_probe(args.run, args.updates, args.every, args.episodes), **_provenance()}
        _merge_runs(args.out, [result])
        print(json.dumps(result))
    elif args.command == "entropy-pressure":
        if args.name and len(args.run) > 1:
            raise SystemExit("--name names one run; give one --run with it")
        rows = [{**entropy_pressure_run(run_dir, args.states, args.draws, args.name), **_provenance()}
                for run_dir in args.run]
        _merge_runs(args.out, rows, keys=("run", "env_step"))  # one row per checkpoint measured
        for r in rows:
            print(json.dumps(r))
    elif args.command == "mark-stopped":
        print(json.dumps(mark_stopped(args.run, args.why)))
    elif args.command == "diagnose":
        for r in diagnose(args.task, args.run, args.episodes, args.out):
            print(json.dumps(r))
    else:
        print(report(args.note.read_text() if args.note.is_file() else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
