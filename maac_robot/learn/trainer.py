"""MAAC's training loop (paper §4.3, Algorithm 1) and everything a run leaves on disk.

Per env step, after `train.initial_random_steps` uniformly random actions:
  1. act with the stochastic policy in the real env, store the transition in D_env   (line 3)
  2. every `model.train_every` steps: fit the ensemble on D_env (G1, early stopping) (lines 4-6)
  3. every `rollout.every` steps: imagined `rollout.length`-step rollouts of the
     current policy from D_env start states through the ensemble into D_model; a
     branch stops at its predicted termination                                      (line 7)
  4. `agent.updates_per_step` G2 steps on batches mixing D_env (`real_ratio`) and
     D_model (`real_data_only`: D_env alone)                                        (lines 8-12)
Learning (2-4) starts once D_env holds max(initial_random_steps, agent.batch_size)
transitions: neither a model nor a minibatch can be formed from less.

A run directory holds `config.yaml` (resolved, with CLI overrides), `metrics.jsonl` (one
line per deterministic evaluation), `tensorboard/` (the same evaluations as TensorBoard events,
`learn.tracking`), `train.log`, `learning_curve.png` and `checkpoints/latest.pt`. The checkpoint
has everything needed to continue: agent (with
optimizers), ensemble (its fit starts a fresh Adam each time), D_env and D_model, every RNG,
the env step and episode counters, and the cumulative phase timers. The episode that was in
progress at the checkpoint is not resumed mid-way: its transitions up to the checkpoint are
in D_env (a cut episode is an ordinary time-limit truncation for an off-policy learner), and
the resumed run starts the next episode from a fresh reset with the next recorded seed.

The env the real data comes from is `make_env(env.id)` in this process unless the caller passes an
`env_factory` (`maac-robot train --connect`: a robot or the sim over the wire, `maac_robot.remote_env`; this
module never speaks the protocol). Such an env may report, in a step's info, `transition: False` (a real-time
step that was not one exact robot transition: neither stored nor counted), `applied_action` (the action the
robot applied, stored instead of the one chosen) and `link_lost` (the link dropped mid-step: the episode ends
there as a truncation, nothing of that step is stored, and training waits in the next reset, which reconnects;
if the env gives up, a checkpoint is written before its error propagates). Evaluation always runs in-process on
`env.id` (the learner builds that env anyway: its dims, reward and termination come from it), so evaluations are
reproducible on the common reset seeds and never cut a training episode on the robot; every metrics line says
which env produced the data (`data_env`) and which evaluated (`eval_env`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from maac_robot.learn.agent import MAACAgent
from maac_robot.learn.buffer import Batch, ReplayBuffer
from maac_robot.learn.config import Config, load_config, parse_set, save_config
from maac_robot.learn.ensemble import GaussianEnsemble
from maac_robot.learn.evaluation import evaluate_policy, mean_critic_bias
from maac_robot.envs import make_env
from maac_robot.runtime.errors import UserError
from maac_robot.runtime.files import atomic_write
from maac_robot.learn.plotting import plot_learning_curves
from maac_robot.learn.rollout import transition_reward
from maac_robot.learn.tasks import LearnedTermination, Task, get_task
from maac_robot.learn.tracking import RunLoggers

CHECKPOINT_FORMAT = 1
# Independent seed streams derived from the run seed (numpy SeedSequence spawn keys).
_STREAM_SAMPLING, _STREAM_TORCH, _STREAM_TRAIN_RESETS, _STREAM_EVAL_RESETS = range(4)

log = logging.getLogger("maac_robot.learn.trainer")


class RunError(UserError):
    """A run directory that cannot be used the way it was asked for."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training between two env steps, after a checkpoint of that step was written."""

    def __init__(self, env_step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at env step {env_step}; checkpoint saved to {checkpoint}")
        self.env_step, self.checkpoint = env_step, checkpoint


class _StopRequest:
    """While active (main thread only), the first SIGINT asks the loop to stop at its next safe point instead of
    raising wherever Python happens to be (mid-update, mid-checkpoint); a second one raises KeyboardInterrupt
    at once, as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# --------------------------------------------------------------------------------------------
# run directory layout


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def curve(self) -> Path:
        return self.root / "learning_curve.png"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "latest.pt"

    @property
    def sessions(self) -> Path:
        return self.root / "sessions.jsonl"


def available_cores() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (`docker --cpus`).

    `os.cpu_count()` counts the machine's cores, so a run in a 2-CPU container on a 64-core host would
    start 64 threads that the quota then throttles.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def busy_cores() -> int:
    """Other processes running on the machine right now (the kernel's runnable count, this process excluded)."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def default_threads(cores: int, busy: int) -> int:
    """Torch threads for a run that does not set `train.num_threads`: the cores no other process is running on.
    OpenMP threads spin-wait for each other, so a thread that shares its core with another process stalls all of
    them: on 2 vCPUs with one other process, an InvertedPendulum update took 362 wall-ms at 2 threads against 35
    at 1 (benchmarks/RESULTS.md, training speed)."""
    return max(1, cores - busy)


def _stream_seed(seed: int, stream: int) -> int:
    """A 31-bit seed for one purpose, independent of the others, reproducible from the run seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0] & 0x7FFF_FFFF)


def eval_seeds(seed: int, episodes: int) -> list[int]:
    """Reset seeds of a run's evaluation episodes: the same at every evaluation point (common random
    numbers, so the curve shows the policy changing rather than the start states), never the training
    env's, and shared with the SAC baseline in benchmarks/ so both face the same start states."""
    base = _stream_seed(seed, _STREAM_EVAL_RESETS)
    return [base + i for i in range(episodes)]


def _resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX-BF16, Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision the G2 updates run in: bfloat16 only where the hardware computes it natively.

    On a CPU without AVX512-BF16/AMX, torch emulates bfloat16 and an update ran 5x slower than in
    float32 (216.5 against 39.7 CPU-ms on an EPYC without it), so asking for it there falls back to
    float32 with a warning instead. GPUs: bfloat16 where `torch.cuda.is_bf16_supported()`.
    """
    if precision != "bfloat16":
        return precision
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if native:
        return precision
    log.warning("train.precision is bfloat16, but this %s has no native bfloat16 (CPU: AVX512-BF16 or AMX; "
                "GPU: Ampere or newer), where it runs ~5x slower than float32: training in float32 instead",
                "CPU" if device.type == "cpu" else "GPU")
    return "float32"


def build_components(cfg: Config, device: torch.device) -> tuple[Task, MAACAgent, GaussianEnsemble]:
    """Task, agent and ensemble exactly as a run with `cfg` builds them (also used by `load_run`)."""
    task = get_task(cfg.env.id, cfg.env.terminates)
    info = task.info
    agent = MAACAgent(task, cfg.agent, device)
    learned_termination = isinstance(task.termination_fn, LearnedTermination)
    model = GaussianEnsemble(
        info.state_dim, info.act_dim, num_models=cfg.model.num_models, num_elites=cfg.model.num_elites,
        hidden=cfg.model.hidden, layers=cfg.model.layers, learn_reward=task.reward_fn is None,
        net_obs_idx=info.net_obs_idx, min_logvar=cfg.model.min_logvar, max_logvar=cfg.model.max_logvar,
        modelled_idx=info.modelled_idx, learn_termination=learned_termination,
    ).to(device)
    if learned_termination:
        task.termination_fn.model = model  # type: ignore[attr-defined]  # the agent holds this same object
    return task, agent, model


def uses_model(cfg: Config) -> bool:
    """Whether any part of the configured algorithm needs the ensemble.

    Only the combination horizon 0 + no STEVE + real data only is model-free (SAC); then
    G1 and the imagined rollouts are skipped rather than computed and ignored.
    """
    a = cfg.agent
    return a.horizon > 0 or (a.steve and a.steve_horizon > 0) or not a.real_data_only


# --------------------------------------------------------------------------------------------
# Algorithm 1


class Trainer:
    """One MAAC run: owns the envs, agent, ensemble, D_env, D_model, RNGs and the run directory."""

    def __init__(self, cfg: Config, run_dir: Path, env_factory: Callable[[Config], gym.Env] | None = None) -> None:
        """`env_factory(cfg)`: the env the real data comes from (default: `make_env(cfg.env.id)` in this process)."""
        self.cfg = cfg
        self.paths = RunPaths(run_dir)
        self.device = _resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.cores, self.busy_cores = available_cores(), busy_cores()
        torch.set_num_threads(cfg.train.num_threads or default_threads(self.cores, self.busy_cores))
        seed = cfg.train.seed
        torch.manual_seed(seed)  # network initialisation and the policy's action noise
        self.rng = np.random.default_rng(_stream_seed(seed, _STREAM_SAMPLING))  # random actions, minibatches
        # CPU generator for the ensemble's bootstrap/holdout draws and imagined-rollout noise (fit wants CPU).
        self.torch_gen = torch.Generator().manual_seed(_stream_seed(seed, _STREAM_TORCH))
        self.train_reset_seed = _stream_seed(seed, _STREAM_TRAIN_RESETS)
        self.eval_seeds = eval_seeds(seed, cfg.train.eval_episodes)

        self.task, self.agent, self.model = build_components(cfg, self.device)
        info = self.task.info
        self.act_low, self.act_high = info.act_low.astype(np.float32), info.act_high.astype(np.float32)
        self.env = (env_factory or _local_env)(cfg)
        self.d_env = ReplayBuffer(info.state_dim, info.act_dim, cfg.train.buffer_size)
        r = cfg.rollout
        self.d_model = ReplayBuffer(info.state_dim, info.act_dim, r.retain_rounds * r.batch_size * r.length)
        self.uses_model = uses_model(cfg)
        self.model_fitted = False
        self.learning_starts = max(cfg.train.initial_random_steps, cfg.agent.batch_size)

        self.env_step = 0
        self.episode_index = 0  # index of the episode in progress; its reset seed is train_reset_seed + index
        self.last_return = math.nan
        self.episode_return = 0.0
        # Cumulative seconds per phase across resumes: wall clock, and this process's CPU time, which is
        # what the work costs even when a shared machine gives the run only a slice of a core.
        self.timers: dict[str, float] = defaultdict(float)
        self.cpu_timers: dict[str, float] = defaultdict(float)
        self.fit_stats: dict[str, float] = {}
        self.update_sums: dict[str, float | torch.Tensor] = defaultdict(float)  # G2 loss sums since the last evaluation
        self.update_count = 0
        self.episode_returns_since_eval: list[float] = []
        self.resumed_at: int | None = None  # the checkpoint's env step, once `load_checkpoint` ran
        self._loggers: RunLoggers | None = None  # TensorBoard (+ W&B) while `train` runs
        self._paused_at: float | None = None  # when the env's link dropped, until the next reset reconnects
        # None: no episode in progress, the next step resets. Lazily, so a resumed run resets (a robot: goes to its
        # start pose) once, at the checkpoint's next episode, not also at the fresh run's first.
        self.state: np.ndarray | None = None

    # ---- env interaction -------------------------------------------------------------------

    def _reset_episode(self) -> np.ndarray:
        state, _ = self.env.reset(seed=self.train_reset_seed + self.episode_index)
        self.episode_return = 0.0
        return state

    def _act(self) -> np.ndarray:
        if self.env_step < self.cfg.train.initial_random_steps:
            return self.rng.uniform(self.act_low, self.act_high).astype(np.float32)
        return self.agent.act(self.state, deterministic=False)

    def _env_step(self) -> bool:
        """One step of the env; whether a transition went into D_env (and the env step count advanced).

        An episode that ended is followed by the reset at the start of the next step, after that step's learning,
        evaluation and checkpoint: an env that fails to reset (a robot link that gave up) then leaves a checkpoint
        of a completed step behind it before its error propagates."""
        if self.state is None:
            self._next_episode()
        action = self._act()
        next_state, reward, terminated, truncated, info = self.env.step(action)
        if info.get("link_lost"):
            self._link_lost(str(info["link_lost"]))
            return False
        stored = info.get("transition", True)  # a robot link says so of a real-time step that was not one transition
        if stored:
            self.d_env.add(self.state, info.get("applied_action", action), float(reward), next_state, bool(terminated))
            self.env_step += 1
        self.episode_return += float(reward)
        if terminated or truncated:
            self.last_return = self.episode_return
            self.episode_returns_since_eval.append(self.episode_return)
            self.episode_index += 1
            self.state = None
        else:
            self.state = next_state
        return bool(stored)

    def _link_lost(self, why: str) -> None:
        """The env lost its robot mid-step: the episode ends as a truncation (its transitions stay in D_env, none is
        terminal; nothing of the lost step is stored), and training waits while the next reset reconnects."""
        log.warning("env step %d: the link to the robot dropped (%s); episode %d ends here as a truncation (return "
                    "so far %.2f, not counted); training paused while the env reconnects", self.env_step, why,
                    self.episode_index, self.episode_return)
        self.episode_index += 1
        self.state = None
        self._paused_at = time.monotonic()

    def _next_episode(self) -> None:
        """Reset for the next episode; when the env cannot (it gave up on its robot), checkpoint, then raise."""
        try:
            self.state = self._reset_episode()
        except Exception as err:
            self.save_checkpoint()
            log.error("env step %d: the env could not start episode %d (%s); checkpoint saved to %s", self.env_step,
                      self.episode_index, err, self.paths.checkpoint)
            raise
        if self._paused_at is not None:
            log.warning("env step %d: link back after %.1f s; training resumes with episode %d", self.env_step,
                        time.monotonic() - self._paused_at, self.episode_index)
            self._paused_at = None

    # ---- G1: model learning ------------------------------------------------------------------

    def _due(self, every: int) -> bool:
        return self.env_step >= self.learning_starts and (self.env_step - self.learning_starts) % every == 0

    def fit_model(self) -> None:
        data = {k: torch.from_numpy(v).to(self.device) for k, v in self.d_env.arrays().items()}
        reward = data["reward"] if self.model.learn_reward else None
        terminated = data["terminated"] if self.model.learn_termination else None
        self.fit_stats = self.model.fit(data["state"], data["action"], data["next_state"], reward,
                                        self.cfg.model, self.torch_gen, terminated)
        self.model_fitted = True
        log.info("step %d: model fit on %d transitions: %s", self.env_step, len(self.d_env),
                 json.dumps({k: round(v, 5) for k, v in self.fit_stats.items()}))

    # ---- imagined rollouts into D_model ------------------------------------------------------

    @torch.no_grad()
    def imagine(self) -> None:
        """`rollout.length`-step branches of the current stochastic policy from D_env states."""
        r = self.cfg.rollout
        idx = self.d_env.sample_indices(r.batch_size, self.rng)
        state = torch.from_numpy(self.d_env.state[idx]).to(self.device)
        for _ in range(r.length):
            action, _ = self.agent.actor.sample(state)
            next_state, predicted = self.model.step(state, action, sample=True, generator=self.torch_gen)
            reward = transition_reward(predicted, self.task.reward_fn, state, action, next_state)
            terminated = self.task.termination_fn(state, action, next_state)
            self.d_model.add_batch(*(t.cpu().numpy() for t in (state, action, reward, next_state, terminated)))
            alive = ~terminated
            if not bool(alive.any()):
                break
            state = next_state[alive]

    # ---- G2: policy and Q updates ------------------------------------------------------------

    def _batches(self) -> list[tuple[Batch, Batch]]:
        """`updates_per_step` (real, imagined) batch pairs, gathered with one index draw per buffer."""
        n = self.cfg.agent.updates_per_step
        n_real, n_model = self.agent.batch_split(model_data=len(self.d_model) > 0)

        def draw(buffer: ReplayBuffer, rows: int) -> list[Batch]:
            stacked = buffer.sample(rows * n, self.rng, self.device) if rows else buffer.empty_batch(self.device)
            return stacked.split(rows) if rows else [stacked] * n  # real_ratio 0 or 1: one side is empty

        return list(zip(draw(self.d_env, n_real), draw(self.d_model, n_model), strict=True))

    def update(self) -> None:
        model = self.model if self.model_fitted else None
        # G2 is most of a run's compute, nearly all of it dense matrix products: bfloat16 autocast cut an update
        # at the authors' settings 1.9x on an AVX512-BF16 CPU (parameters and optimiser state stay float32).
        bf16 = self.precision == "bfloat16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            for real, imagined in self._batches():
                stats = self.agent.update(real, imagined, model)
                for k, v in stats.items():
                    self.update_sums[k] += v  # on the device: read once per evaluation, not per update
                self.update_count += 1

    # ---- evaluation, metrics, plots ----------------------------------------------------------

    def evaluate(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One deterministic evaluation, appended to metrics.jsonl (with `extra`'s fields, e.g. `finetune`)."""
        returns = evaluate_policy(self.agent, self.cfg.env.id, self.eval_seeds, self.cfg.env.max_episode_steps)
        # Q − realised soft return on stochastic episodes: how far the critic over- or underestimates at each evaluation.
        bias = (mean_critic_bias(self.agent, self.cfg.env.id, self.eval_seeds, self.cfg.agent.gamma,
                                 self.cfg.env.max_episode_steps) if self.env_step > self.learning_starts else None)
        losses = {k: float(v) / self.update_count for k, v in self.update_sums.items()} if self.update_count else {}
        record = {
            "env_step": self.env_step,
            "eval_return_mean": float(returns.mean()),
            "eval_return_std": float(returns.std()),
            "eval_returns": [float(x) for x in returns],
            "critic_bias": None if bias is None else round(bias, 3),
            "train_return_mean": (float(np.mean(self.episode_returns_since_eval))
                                  if self.episode_returns_since_eval else None),
            "losses": losses,
            "model": dict(self.fit_stats),
            "buffer_env": len(self.d_env),
            "buffer_env_recorded": self.d_env.source_counts()["recorded"],  # rows added by `finetune`
            "buffer_model": len(self.d_model),
            "wall_time_s": round(sum(self.timers.values()), 3),
            "phase_time_s": {k: round(v, 3) for k, v in self.timers.items()},
            "phase_cpu_s": {k: round(v, 3) for k, v in self.cpu_timers.items()},
            "data_env": self.data_env(),
            "eval_env": {"kind": "in-process", "env_id": self.cfg.env.id},
            **(extra or {}),
        }
        self.update_sums.clear()
        self.update_count = 0
        self.episode_returns_since_eval.clear()
        with self.paths.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._loggers is not None:
            self._loggers.log(record)
        self._plot()
        log.info("step %d: eval return %.2f ± %.2f  losses %s", self.env_step, record["eval_return_mean"],
                 record["eval_return_std"], json.dumps({k: round(v, 5) for k, v in losses.items()}))
        return record

    def data_env(self) -> dict[str, Any]:
        """Where the real transitions come from: this process's env, or what a robot link says of itself."""
        describe = getattr(self.env.unwrapped, "describe", None)
        return describe() if callable(describe) else {"kind": "in-process", "env_id": self.cfg.env.id}

    def _plot(self) -> None:
        rows = read_metrics(self.paths.metrics)
        steps = [r["env_step"] for r in rows]
        curve = ([r["eval_return_mean"] for r in rows], [r["eval_return_std"] for r in rows])
        plot_learning_curves({f"MAAC seed {self.cfg.train.seed}": (steps, *curve)}, self.paths.curve,
                             title=f"{self.cfg.env.id} ({self.paths.root.name})")

    # ---- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        rng = {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state(),
               "torch_gen": self.torch_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "env_id": self.cfg.env.id,
            "env_step": self.env_step,
            "episode_index": self.episode_index,
            "last_return": self.last_return,
            "model_fitted": self.model_fitted,
            "agent": self.agent.state_dict(),
            "model": self.model.state_dict(),
            "d_env": self.d_env.state_dict(),
            "d_model": self.d_model.state_dict(),
            "rng": rng,
            "timers": dict(self.timers),
            "cpu_timers": dict(self.cpu_timers),
            "fit_stats": dict(self.fit_stats),
            "update_sums": {k: float(v) for k, v in self.update_sums.items()},
            "update_count": self.update_count,
            "episode_returns_since_eval": list(self.episode_returns_since_eval),
        }

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        atomic_write(self.paths.checkpoint, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> None:
        ckpt = load_checkpoint(self.paths.checkpoint, self.cfg.env.id)
        self.agent.load_state_dict(ckpt["agent"])
        self.model.load_state_dict(ckpt["model"])
        self.d_env.load_state_dict(ckpt["d_env"])
        self.d_model.load_state_dict(ckpt["d_model"])
        self.rng.bit_generator.state = ckpt["rng"]["numpy"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.torch_gen.set_state(ckpt["rng"]["torch_gen"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.env_step = int(ckpt["env_step"])
        self.last_return = float(ckpt["last_return"])
        self.model_fitted = bool(ckpt["model_fitted"])
        self.timers = defaultdict(float, ckpt["timers"])
        self.cpu_timers = defaultdict(float, ckpt.get("cpu_timers", {}))  # optional in format 1: such a run resumes with its CPU time from zero
        self.fit_stats = dict(ckpt["fit_stats"])
        self.update_sums = defaultdict(float, ckpt["update_sums"])
        self.update_count = int(ckpt["update_count"])
        self.episode_returns_since_eval = list(ckpt["episode_returns_since_eval"])
        # The interrupted episode is not continued (see the module docstring): next seed, fresh reset.
        self.episode_index = int(ckpt["episode_index"]) + 1
        self.state = None
        self.resumed_at = self.env_step
        truncate_metrics(self.paths.metrics, self.env_step)
        log.info("resumed from %s at env step %d (D_env %d, D_model %d)", self.paths.checkpoint, self.env_step,
                 len(self.d_env), len(self.d_model))

    # ---- the loop ----------------------------------------------------------------------------

    def train(self, progress: bool = True) -> list[dict[str, Any]]:
        """Run Algorithm 1 up to `train.total_steps`; returns the evaluation records of this call.

        Ctrl-C (SIGINT, in the main thread) stops it between two env steps: the checkpoint of that step is
        written and `TrainingInterrupted` (a KeyboardInterrupt) raised; a second Ctrl-C interrupts at once,
        leaving the last periodic checkpoint. Every evaluation also goes to TensorBoard (and W&B if asked).
        """
        t = self.cfg.train
        records = []
        self._loggers = RunLoggers(
            self.paths.root, config=self.cfg.model_dump(mode="json"), use_wandb=t.wandb,
            # events past the checkpoint were logged by the process that was interrupted: hide them
            purge_step=None if self.resumed_at is None else self.resumed_at + 1,
            start_step=self.env_step, start_wall_s=sum(self.timers.values()))
        bar, random_phase = self._progress_bar(progress), self.env_step < self.learning_starts
        started_at = self.env_step
        last_wall, last_cpu = time.perf_counter(), time.process_time()

        def phase(name: str) -> None:
            nonlocal last_wall, last_cpu
            wall, cpu = time.perf_counter(), time.process_time()
            self.timers[name] += wall - last_wall
            self.cpu_timers[name] += cpu - last_cpu
            last_wall, last_cpu = wall, cpu

        try:
            with _StopRequest() as stop:
                while self.env_step < t.total_steps and not self._target_held():
                    if stop.requested:
                        self.save_checkpoint()
                        raise TrainingInterrupted(self.env_step, self.paths.checkpoint)
                    self._step_once(records, phase)
                    if self.env_step == self.learning_starts and random_phase:
                        bar.close()
                        bar, random_phase = self._progress_bar(progress), False
                    bar.update(self.env_step - bar.n)
                    if progress and self.env_step % 50 == 0:
                        bar.set_postfix_str(self._postfix(records), refresh=False)
            if self.env_step < t.total_steps:
                if self.env_step > started_at:  # a rerun of a run that already held the target writes nothing
                    self.save_checkpoint()
                log.info("stopped at env step %d: every episode of the last %d evaluations returned at least %g "
                         "(train.stop_return)", self.env_step, t.stop_evals, t.stop_return)
        finally:
            bar.close()
            self._loggers.close()
            self._loggers = None
            self.resumed_at = None  # purge once: a later call in this process continues what this one logged
        return records

    def _progress_bar(self, progress: bool) -> tqdm:
        """A bar per phase: random actions take microseconds, learning steps tens of milliseconds, so one bar's
        rate (and its time estimate) would mix the two. The learning bar's rate is its average since the phase
        began (smoothing 0), which amortises the periodic model fits and evaluations into the estimate."""
        random = self.env_step < self.learning_starts
        return tqdm(total=self.cfg.train.total_steps, initial=self.env_step, disable=not progress, unit="step",
                    desc="random actions" if random else "learning", smoothing=0.3 if random else 0.0,
                    dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def _target_held(self) -> bool:
        """Whether the run may stop early: `train.stop_return` reached by every episode of the last `stop_evals`
        evaluations. Read from metrics.jsonl, which a resume truncates to its checkpoint, so it survives restarts."""
        t = self.cfg.train
        if t.stop_return is None or self.env_step % t.eval_every:
            return False
        tail = read_metrics(self.paths.metrics)[-t.stop_evals:]
        return len(tail) == t.stop_evals and all(min(r["eval_returns"]) >= t.stop_return for r in tail)

    def _step_once(self, records: list[dict[str, Any]], phase: Any) -> None:
        """One iteration of Algorithm 1: an env step, then whatever learning, evaluation and checkpoint is due."""
        t = self.cfg.train
        stored = self._env_step()
        phase("env")
        if not stored:  # nothing new to learn from, and this env step's learning, evaluation, checkpoint are done
            return
        if self.env_step >= self.learning_starts:
            if self.uses_model and self._due(self.cfg.model.train_every):
                self.fit_model()
                phase("model_fit")
            if self.uses_model and not self.cfg.agent.real_data_only and self._due(self.cfg.rollout.every):
                self.imagine()
                phase("rollout")
            self.update()
            phase("update")
        if self.env_step % t.eval_every == 0 or self.env_step == t.total_steps:
            records.append(self.evaluate())
            phase("eval")
        if self.env_step % t.checkpoint_every == 0 or self.env_step == t.total_steps:
            self.save_checkpoint()
            phase("checkpoint")

    def _postfix(self, records: list[dict[str, Any]]) -> str:
        """Last episode return, last evaluation, model holdout MSE, mean policy and Q losses since the last eval."""
        parts = [f"ret {self.last_return:.1f}"]
        if records:
            parts.append(f"eval {records[-1]['eval_return_mean']:.1f}")
        if "holdout_mse" in self.fit_stats:
            parts.append(f"model {self.fit_stats['holdout_mse']:.4f}")
        # Running means since the last evaluation, or that evaluation's means right after it.
        losses = ({k: float(v) / self.update_count for k, v in self.update_sums.items()} if self.update_count
                  else records[-1]["losses"] if records else {})
        for key, label in (("policy_loss", "pi"), ("q_loss", "q")):
            if key in losses:
                parts.append(f"{label} {losses[key]:.3f}")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------
# files


def load_checkpoint(path: Path, env_id: str | None = None) -> dict[str, Any]:
    """A trainer checkpoint, loaded without unpickling arbitrary objects (weights_only)."""
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
        raise RunError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"checkpoint {path} has format {ckpt.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    if env_id is not None and ckpt["env_id"] != env_id:
        raise RunError(f"checkpoint {path} was trained on {ckpt['env_id']}, the run config says {env_id}")
    return ckpt


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation records of a run's `metrics.jsonl`, in order ([] when it has none yet).

    A last line that a kill cut short (no newline, not JSON) is skipped: the evaluation it held is lost, the
    rest of the run is fine, and the next resume rewrites the file without it. Any other line that is not a
    JSON object is corruption, not a kill, so it raises a RunError naming the file and the line. Blank lines
    are ignored.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn by a kill mid-write
            raise RunError(f"{path}:{number}: not a JSON evaluation record ({err})") from None
        if not isinstance(row, dict):
            raise RunError(f"{path}:{number}: not a JSON evaluation record (a {type(row).__name__})")
        rows.append(row)
    return rows


def truncate_metrics(path: Path, env_step: int) -> None:
    """Keep only evaluations up to `env_step`: a resumed run restarts from that checkpoint, so later
    lines (and a torn line from a kill) would otherwise be duplicated or unreadable."""
    if not path.is_file():
        return
    kept = [row for row in read_metrics(path) if row["env_step"] <= env_step]
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept).encode())


def _read_run_config(run_dir: Path, overrides: dict[str, Any] | None = None,
                     flags: dict[str, str] | None = None) -> Config:
    paths = RunPaths(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}")
    if not paths.config.is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(paths.config, overrides, flags)


@dataclass
class LoadedRun:
    """A trained run, ready for export or evaluation (CPU, eval mode)."""

    config: Config
    task: Task
    agent: MAACAgent
    model: GaussianEnsemble
    env_step: int
    d_env: ReplayBuffer | None = None  # the real transitions the checkpoint holds (export calibrates the guard on them)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a run's agent and ensemble from its `config.yaml` and latest checkpoint, with its D_env (sized to
    the transitions it holds, not to train.buffer_size)."""
    run_dir = Path(run_dir)
    cfg = _read_run_config(run_dir)
    path = RunPaths(run_dir).checkpoint
    if not path.is_file():
        raise RunError(f"{run_dir} has no checkpoint yet ({path}); train longer or wait for train.checkpoint_every")
    ckpt = load_checkpoint(path, cfg.env.id)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})})
    task, agent, model = build_components(cfg, torch.device("cpu"))
    agent.load_state_dict(ckpt["agent"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    info = task.info
    d_env = ReplayBuffer(info.state_dim, info.act_dim, max(1, int(ckpt["d_env"]["size"])))
    d_env.load_state_dict(ckpt["d_env"])
    return LoadedRun(config=cfg, task=task, agent=agent, model=model, env_step=int(ckpt["env_step"]), d_env=d_env)


# --------------------------------------------------------------------------------------------
# CLI entry points


def _default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = cfg.env.id.rpartition(":")[2].split("-")[0].lower()  # pkg.mod:MyEnv-v0 -> myenv
    return Path("runs") / f"{name}-s{cfg.train.seed}-{stamp}"


class _LogToFile:
    """Attach train.log to the trainer's logger for the duration of a run (tests run several)."""

    def __init__(self, path: Path) -> None:
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> None:
        log.addHandler(self.handler)
        log.setLevel(logging.INFO)

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
        self.handler.close()


def prepare_run(config: str | Path | None = None, resume: str | Path | None = None, seed: int | None = None,
                steps: int | None = None, out: str | Path | None = None, device: str | None = None,
                sets: list[str] | None = None) -> tuple[Config, Path, bool]:
    """Validate the CLI's choices before anything heavy starts; returns (config, run_dir, resuming).

    `sets`: `--set section.key=value` items, applied after the file and before --steps/--seed/--device.
    """
    if (config is None) == (resume is None):
        raise UserError("give exactly one of --config (start a new run) or --resume RUN_DIR (continue one)")
    overrides, flags = parse_set(sets)
    for key, flag, value in (("train.total_steps", "--steps", steps), ("train.device", "--device", device),
                             ("train.seed", "--seed", seed)):
        if value is not None and (key != "train.seed" or resume is None):
            overrides[key], flags[key] = value, f"{flag} {value}"
    if resume is not None:
        if seed is not None:
            raise UserError("--seed cannot change a run being resumed; start a new run with --config")
        if out is not None:
            raise UserError("--out cannot be combined with --resume; the run continues in its own directory")
        run_dir = Path(resume)
        cfg = _read_run_config(run_dir, overrides, flags)
        if not RunPaths(run_dir).checkpoint.is_file():
            raise RunError(f"cannot resume {run_dir}: it has no checkpoint yet (checkpoints/latest.pt)")
        _resolve_device(cfg.train.device)
        return cfg, run_dir, True
    cfg = load_config(config, overrides, flags)  # type: ignore[arg-type]
    _resolve_device(cfg.train.device)  # before a run directory is created for nothing
    run_dir = Path(out) if out is not None else _default_run_dir(cfg)
    if RunPaths(run_dir).checkpoint.exists() or RunPaths(run_dir).metrics.exists():
        raise RunError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    return cfg, run_dir, False


def describe_task(task: Task) -> str:
    """The run's reward and termination in words (train.log at every start; `train` prints it)."""
    d = task.describe()
    reward = f"closed-form {d['reward_fn']}" if "reward_fn" in d else "learned by the ensemble"
    termination = {"closed_form": f"closed-form {d.get('termination_fn')}",
                   "learned": "learned by the ensemble's termination head",
                   "never": "none (never terminates)"}[d["termination"]]
    return f"reward {reward}; termination {termination}"


def _record_session(trainer: Trainer, extra: dict[str, Any] | None = None) -> None:
    """Append what this (re)start runs on to RUN_DIR/sessions.jsonl: a run's speed and its numbers are read
    against the cores, threads and precision it had, which can change at every resume."""
    import platform

    record = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "env_step": trainer.env_step,
              "cores_available": trainer.cores, "cores_busy": trainer.busy_cores,
              "torch_threads": torch.get_num_threads(),
              "device": str(trainer.device), "precision": trainer.precision, "machine": platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__, **trainer.task.describe(),
              **(extra or {})}
    with trainer.paths.sessions.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _local_env(cfg: Config) -> gym.Env:
    return make_env(cfg.env.id, max_episode_steps=cfg.env.max_episode_steps)


def train(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          env_factory: Callable[[Config], gym.Env] | None = None) -> Trainer:
    """Run (or continue) training into `run_dir`; the programmatic twin of `maac-robot train`.
    `env_factory`: the env of the real data (see `Trainer`); closing an env it made is the caller's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunPaths(run_dir).config)
    with _LogToFile(RunPaths(run_dir).log):
        trainer = Trainer(cfg, run_dir, env_factory)
        if resume:
            trainer.load_checkpoint()
        else:
            log.info("new run %s: %s, seed %d, %d steps, device %s, %d torch threads", run_dir, cfg.env.id,
                     cfg.train.seed, cfg.train.total_steps, trainer.device, torch.get_num_threads())
        log.info("task: %s", describe_task(trainer.task))
        if env_factory is not None:
            log.info("real data from %s; evaluation in-process on %s", json.dumps(trainer.data_env()), cfg.env.id)
        _record_session(trainer, {"data_env": trainer.data_env()})
        try:
            trainer.train(progress=progress)
        except TrainingInterrupted as stop:
            log.info("interrupted at env step %d; checkpoint saved", stop.env_step)
            raise
        log.info("finished at env step %d", trainer.env_step)
    return trainer


__all__ = ["LoadedRun", "RunError", "Trainer", "TrainingInterrupted", "eval_seeds", "load_run", "prepare_run",
           "read_metrics", "train"]
