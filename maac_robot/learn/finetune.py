"""`maac-robot finetune RUN --data DIR --out NEW_RUN [--steps N]`: recorded episodes back into a run.

1. The recordings in DIR (`maac_robot.runtime.recording`: `control --record` or `sim --record`) are
   loaded and checked against RUN before anything is written: env id, state and action dims, and, where
   a recording carries the artifacts' `state_layout`, its state dim names and env kwargs. A mismatch is
   refused (RecordingError) naming the file and what differs.
2. RUN is copied to NEW_RUN (RUN is never modified) and its checkpoint loaded into a `Trainer`
   (networks, optimisers, D_env, D_model, RNGs, counters).
3. The recorded transitions go into D_env tagged `SOURCE_RECORDED` (`ReplayBuffer.source`; the trainer's own
   env steps are `SOURCE_ENV`), so they stay distinguishable in the buffer and in every later checkpoint.
   Controller steps that were not one real transition (`Episode.usable_mask`: predicted, skipped or
   substituted) and non-finite rows are left out. D_env keeps its capacity (`train.buffer_size`): when it
   is full, the recorded rows replace its oldest ones, as new env steps would. Sampling is uniform over
   D_env, so the recorded rows weigh as their share of it (metrics.jsonl: `buffer_env_recorded`).
4. The ensemble is refit on the whole D_env (G1), then `--steps N` G2 *rounds* run: there is no robot to
   step, and stepping the training env would add simulator data, not correct the model with the robot's,
   so a round is what follows an env step in training minus the env step: `agent.updates_per_step` G2
   updates, with the model refit every `model.train_every` rounds and imagined rollouts from D_env (robot
   rows included) every `rollout.every` rounds (the first round included, so D_model holds rollouts of
   the refit model). The env step counter does not move. Default N: one round per recorded transition
   added, the ratio training keeps.
5. One evaluation on the training env goes to metrics.jsonl with the same `env_step` and a `finetune` field
   (what was added, rounds, updates, fits, D_env by source), a `finetune` line to sessions.jsonl, and the
   checkpoint is saved: `maac-robot export NEW_RUN`, `evaluate`, `train --resume` treat it as any run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maac_robot.learn.buffer import SOURCE_RECORDED
from maac_robot.learn.config import Config
from maac_robot.learn.trainer import RunError, RunPaths, Trainer, _LogToFile, _read_run_config, _record_session
from maac_robot.runtime.errors import UserError
from maac_robot.runtime.recording import Episode, RecordingError, load_episode

log = logging.getLogger("maac_robot.learn.trainer")


@dataclass
class FinetuneResult:
    trainer: Trainer
    record: dict[str, Any]  # the finetune field of the metrics line
    evaluation: dict[str, Any] = field(default_factory=dict)


def load_recordings(data_dir: str | Path, cfg: Config) -> list[tuple[Path, Episode]]:
    """Every `*.npz` in `data_dir`, each checked against the run's env (RecordingError naming file and difference)."""
    from maac_robot.envs import state_layout
    from maac_robot.learn.tasks import get_task

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise RecordingError(f"recording directory not found: {data_dir}")
    files = sorted(data_dir.glob("*.npz"))
    if not files:
        raise RecordingError(f"{data_dir} holds no recorded episodes (*.npz from `control --record` or "
                             f"`sim --record`)")
    info = get_task(cfg.env.id).info
    layout = None
    episodes = []
    for path in files:
        ep = load_episode(path)
        problems = []
        env_id = ep.meta.get("env_id")
        if env_id != cfg.env.id:
            problems.append(f"env {env_id!r} vs the run's {cfg.env.id!r}")
        dims = (ep.states.shape[1], ep.actions.shape[1])
        if dims != (info.state_dim, info.act_dim):
            problems.append(f"state/action dims {dims[0]}/{dims[1]} vs the run's {info.state_dim}/{info.act_dim}")
        for key, have in (("state_dim", dims[0]), ("act_dim", dims[1])):
            if key in ep.meta and ep.meta[key] != have:
                problems.append(f"meta {key} {ep.meta[key]} vs its arrays' {have}")
        recorded = ep.meta.get("state_layout")
        if not problems and isinstance(recorded, dict):
            layout = layout or state_layout(cfg.env.id)
            if recorded.get("names") is not None and layout.names is not None and recorded["names"] != layout.names:
                diff = [i for i, (a, b) in enumerate(zip(recorded["names"], layout.names)) if a != b]
                problems.append(f"state layout names differ from the run's at dims {diff[:5]} (e.g. "
                                f"{recorded['names'][diff[0]]!r} vs {layout.names[diff[0]]!r})" if diff else
                                "state layout names differ from the run's")
            if recorded.get("env_kwargs", layout.env_kwargs) != layout.env_kwargs:
                problems.append(f"state layout env_kwargs {recorded['env_kwargs']} vs the run's {layout.env_kwargs}")
        if problems:
            raise RecordingError(f"{path}: recorded for another env or state layout than the run ("
                                 + "; ".join(problems) + "); finetune takes recordings of the run's own env only")
        episodes.append((path, ep))
    return episodes


def finetune(run_dir: str | Path, data_dir: str | Path, out: str | Path, steps: int | None = None,
             progress: Any = None, prepare: Callable[[Trainer], str] | None = None) -> FinetuneResult:
    """Copy `run_dir` to `out`, add the recordings in `data_dir` to its D_env, refit the ensemble and run `steps`
    G2 rounds (module docstring); returns the trainer (checkpoint saved) and what was done.

    `progress(what)`, if given, is called with a short line at each phase. `prepare(trainer)`, if given, runs
    after the recorded rows are added and before the refit, and returns a line saying what it changed (logged
    and kept in the `finetune` record): the seam through which a study reshapes D_env or D_model (e.g. drops
    the simulator's rows) while the rounds stay the library's (`benchmarks/finetune_screen.py`).
    """
    say = progress or (lambda what: None)
    run_dir, out = Path(run_dir), Path(out)
    cfg = _read_run_config(run_dir)
    if not RunPaths(run_dir).checkpoint.is_file():
        raise RunError(f"{run_dir} has no checkpoint yet ({RunPaths(run_dir).checkpoint}); nothing to finetune")
    if steps is not None and steps < 0:
        raise UserError(f"--steps must be 0 or more, got {steps}")
    if out.exists():
        raise RunError(f"{out} already exists; finetune writes a new run directory (pick another --out)")
    recordings = load_recordings(data_dir, cfg)
    usable = [(p, ep, ep.usable_mask()) for p, ep in recordings]
    added = sum(int(mask.sum()) for _, _, mask in usable)
    if added == 0:
        raise RecordingError(f"{data_dir}: none of the {sum(len(ep) for _, ep in recordings)} recorded steps is a "
                             f"usable transition (all predicted, skipped or substituted)")
    rounds = added if steps is None else steps

    say(f"copying {run_dir} to {out}")
    shutil.copytree(run_dir, out)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    with _LogToFile(RunPaths(out).log):
        trainer = Trainer(cfg, out)
        trainer.load_checkpoint()
        before = trainer.d_env.source_counts()
        for _path, ep, mask in usable:
            trainer.d_env.add_batch(ep.states[mask], ep.actions[mask], ep.rewards[mask], ep.next_states[mask],
                                    ep.terminated[mask], source=SOURCE_RECORDED)
        sources = sorted({ep.source for _, ep in recordings})
        log.info("finetune from %s: %d transitions of %d recorded episode(s) in %s (%s) added to D_env (%d left "
                 "out); D_env %s", run_dir, added, len(recordings), data_dir, ", ".join(sources),
                 sum(len(ep) for _, ep in recordings) - added, json.dumps(trainer.d_env.source_counts()))
        prepared = None
        if prepare is not None:
            prepared = prepare(trainer)
            log.info("finetune prepare: %s; D_env %s, D_model %d rows", prepared,
                     json.dumps(trainer.d_env.source_counts()), len(trainer.d_model))
        fits = rollouts = 0
        if trainer.uses_model:
            say(f"refitting the ensemble on D_env ({len(trainer.d_env)} transitions, {added} recorded)")
            trainer.fit_model()
            fits += 1
        say(f"{rounds} G2 round(s) of {cfg.agent.updates_per_step} update(s)")
        for i in range(rounds):
            if trainer.uses_model and i > 0 and i % cfg.model.train_every == 0:
                trainer.fit_model()
                fits += 1
            if trainer.uses_model and not cfg.agent.real_data_only and i % cfg.rollout.every == 0:
                trainer.imagine()
                rollouts += 1
            trainer.update()
        trainer.timers["finetune"] += time.perf_counter() - start_wall
        trainer.cpu_timers["finetune"] += time.process_time() - start_cpu
        record = {"from_run": str(run_dir), "data": str(data_dir), "episodes": len(recordings),
                  "sources": sources, "recorded_steps": sum(len(ep) for _, ep in recordings),
                  "transitions_added": added, "rounds": rounds,
                  "updates": rounds * cfg.agent.updates_per_step, "model_fits": fits, "rollouts": rollouts,
                  "d_env_before": before, "d_env": trainer.d_env.source_counts(),
                  **({"prepared": prepared} if prepare is not None else {})}
        say("evaluating on the training env")
        evaluation = trainer.evaluate(extra={"finetune": record})
        trainer.save_checkpoint()
        _record_session(trainer, extra={"finetune": record})
        log.info("finetune done: %d rounds, %d model fit(s), %d rollout round(s); checkpoint saved", rounds, fits,
                 rollouts)
    return FinetuneResult(trainer=trainer, record=record, evaluation=evaluation)


__all__ = ["FinetuneResult", "finetune", "load_recordings"]
