"""What `maac-robot train | evaluate | diagnose | export | inspect | finetune` print: the library computes and returns,
these functions turn its results into lines for a person.

Each imports its part of the library when called, so `maac-robot inspect` on a robot computer never
imports torch.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

from maac_robot.runtime.errors import UserError


def _step_line(command: str):
    """A progress callback `(step, steps, what)` that prints one short line per step to stderr."""

    def report(step: int, steps: int, what: str) -> None:
        print(f"{command}: [{step}/{steps}] {what}", file=sys.stderr, flush=True)

    return report


def _positive_episodes(episodes: int) -> None:
    if episodes <= 0:
        raise UserError(f"--episodes must be positive, got {episodes}")


def train_from_cli(config: Path | None = None, resume: Path | None = None, seed: int | None = None,
                   steps: int | None = None, out: Path | None = None, device: str | None = None,
                   sets: list[str] | None = None, connect: str | None = None, client_key: Path | None = None,
                   server_public: Path | None = None, reconnect: bool = True) -> int:
    """`maac-robot train`: new run from --config, or --resume an interrupted one.

    `connect`: collect the real data from the robot (or sim) at this endpoint (`maac_robot.remote_env`), with
    `control`'s keys and the config's `controller` link settings; it is checked against the run before anything
    is written, and a robot that does not come back within `controller.reconnect_s` ends training with an error
    after a checkpoint."""
    from maac_robot.learn.tasks import get_task
    from maac_robot.learn.trainer import (RunPaths, TrainingInterrupted, describe_task, load_checkpoint,
                                          prepare_run, read_metrics, train)

    if connect is None and (client_key is not None or server_public is not None or not reconnect):
        raise UserError("--client-key, --server-public and --no-reconnect are for --connect (training against a "
                        "robot or the sim over the wire)")
    cfg, run_dir, resuming = prepare_run(config, resume, seed, steps, out, device, sets)
    task = describe_task(get_task(cfg.env.id, cfg.env.terminates))  # a bad registration fails before the run starts
    if resuming:
        done = int(load_checkpoint(RunPaths(run_dir).checkpoint, cfg.env.id)["env_step"])
        if done >= cfg.train.total_steps:
            print(f"{run_dir} already trained {done} of {cfg.train.total_steps} env steps; "
                  f"raise the budget with --steps N to continue")
            return 0
    again = f"maac-robot train --resume {shlex.quote(str(run_dir))}" + (
        f" --connect {shlex.quote(connect)}" if connect else "")
    env = None
    if connect is not None:
        import logging

        from maac_robot.remote_env import connect as connect_robot

        # reconnects are told on a child of the trainer's logger: into train.log, next to the pause they cause
        env = connect_robot(connect, cfg.env.id, cfg.env.max_episode_steps, cfg.controller, reconnect=reconnect,
                            client_key=client_key, server_public=server_public,
                            logger=logging.getLogger("maac_robot.learn.trainer.link"))
        # a pause for a lost robot (and the link coming back) is said on the console too, not only in train.log
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("train: %(message)s"))
        logging.getLogger("maac_robot.learn.trainer").addHandler(console)
        robot = env.unwrapped.robot
        print(f"real data from {robot.env_id} at {connect} ({robot.mode}, dt {robot.dt * 1e3:.1f} ms); evaluation "
              f"in-process on {cfg.env.id}", file=sys.stderr)
    print(f"run directory: {run_dir} (curves: tensorboard --logdir {run_dir / 'tensorboard'}; Ctrl-C saves a "
          f"checkpoint and stops)", file=sys.stderr)
    print(f"{cfg.env.id}: {task}", file=sys.stderr)
    try:
        trainer = train(cfg, run_dir, resume=resuming, env_factory=None if env is None else lambda _: env)
    except TrainingInterrupted as stop:
        print(f"interrupted at env step {stop.env_step}; checkpoint saved; continue with: {again}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: the last periodic checkpoint, if any, is what remains
        path = RunPaths(run_dir).checkpoint
        if path.is_file():
            done = int(load_checkpoint(path, cfg.env.id)["env_step"])
            print(f"interrupted; the last checkpoint is at env step {done}; continue with: {again}", file=sys.stderr)
        else:
            print("interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        return 130
    except UserError as err:
        path = RunPaths(run_dir).checkpoint
        if env is None or not path.is_file():
            raise
        done = int(load_checkpoint(path, cfg.env.id)["env_step"])
        raise UserError(f"{err}; the checkpoint is at env step {done}; continue with: {again}") from None
    finally:
        if env is not None:
            env.close()
            logging.getLogger("maac_robot.learn.trainer").removeHandler(console)
    rows = read_metrics(RunPaths(run_dir).metrics)
    if rows:
        last = rows[-1]
        print(f"{cfg.env.id}: {trainer.env_step} env steps, last evaluation "
              f"{last['eval_return_mean']:.1f} ± {last['eval_return_std']:.1f}; run saved in {run_dir}")
    return 0


DEFAULT_EVAL_SEED, DEFAULT_EVAL_EPISODES = 10_000, 10


def _seed_range(seeds: list[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def evaluate_from_cli(run_dir: Path, episodes: int | None = None, seed: int | None = None, seeds: str = "default",
                      video: Path | None = None) -> int:
    """`maac-robot evaluate`: mean ± std return of the run's deterministic policy.

    `seeds="default"`: reset seeds `seed`.. (10000..). `seeds="training"`: the reset seeds of the training
    curve's evaluations (`trainer.eval_seeds`), so the number can be compared with metrics.jsonl.
    """
    if video is not None:
        from maac_robot.video import check_video_support

        check_video_support("--video")  # before anything imports MuJoCo (it picks EGL then)
    from maac_robot.learn.evaluation import evaluate_policy
    from maac_robot.learn.trainer import RunPaths, eval_seeds, load_run, read_metrics

    if seeds == "training" and seed is not None:
        raise UserError("--seed sets the first reset seed of --seeds default; --seeds training uses the run's own")
    run = load_run(run_dir)
    cfg = run.config
    curve = eval_seeds(cfg.train.seed, cfg.train.eval_episodes)
    if seeds == "training":
        episodes = cfg.train.eval_episodes if episodes is None else episodes
        _positive_episodes(episodes)
        chosen = eval_seeds(cfg.train.seed, episodes)
    else:
        episodes = DEFAULT_EVAL_EPISODES if episodes is None else episodes
        _positive_episodes(episodes)
        first = DEFAULT_EVAL_SEED if seed is None else seed
        chosen = [first + i for i in range(episodes)]

    def report(i: int, n: int, reset_seed: int, ret: float, length: int) -> None:
        print(f"evaluate: [{i}/{n}] reset seed {reset_seed}: return {ret:.1f} in {length} steps",
              file=sys.stderr, flush=True)

    print(f"evaluate: {episodes} episode(s) of {cfg.env.id}" + (f", recording to {video}" if video else ""),
          file=sys.stderr, flush=True)
    returns = evaluate_policy(run.agent, cfg.env.id, chosen, cfg.env.max_episode_steps, video=video,
                              on_episode=report)
    which = "the training curve's" if seeds == "training" else "--seeds default"
    print(f"{cfg.env.id} after {run.env_step} env steps: return {returns.mean():.1f} ± {returns.std():.1f} "
          f"over {episodes} episodes (deterministic policy, reset seeds {_seed_range(chosen)}, {which})")
    if seeds == "training":
        row = next((r for r in read_metrics(RunPaths(run_dir).metrics) if r["env_step"] == run.env_step), None)
        if row is not None:
            print(f"the training curve read {row['eval_return_mean']:.1f} ± {row['eval_return_std']:.1f} at this "
                  f"step over its {len(row.get('eval_returns', [])) or cfg.train.eval_episodes} episodes "
                  f"(reset seeds {_seed_range(curve)})")
    else:
        print(f"the training curve (metrics.jsonl) evaluates on other reset seeds, {_seed_range(curve)} "
              f"(train.eval_episodes {cfg.train.eval_episodes}): `--seeds training` uses them, so the numbers compare")
    if video is not None:
        print(f"video of the {episodes} episode(s): {video}")
    return 0


def diagnose_from_cli(run_dir: Path, episodes: int = 3, seed: int = 10_000) -> int:
    """`maac-robot diagnose`: one line per episode, then the critic's mean bias and the ensemble's mean foresight."""
    from maac_robot.learn.diagnostics import FORESIGHT_STEPS, diagnose
    from maac_robot.learn.trainer import load_run

    _positive_episodes(episodes)
    run = load_run(run_dir)

    def report(i: int, n: int, reset_seed: int) -> None:
        print(f"diagnose: [{i}/{n}] reset seed {reset_seed}: a deterministic and a stochastic episode",
              file=sys.stderr, flush=True)

    rows = diagnose(run, [seed + i for i in range(episodes)], on_episode=report)
    print(f"{run.config.env.id} after {run.env_step} env steps, α {run.agent.alpha:.3g}, γ {run.config.agent.gamma}")
    for r in rows:
        end = "terminated" if r["terminated"] else "time limit"
        last = ", ".join(f"{k} {v}" for k, v in r["final_state"].items())
        foresight = " ".join(f"k={k}: {v:.0%}" for k, v in r["elites_predicting_end"].items())
        bias = "n/a (cut by the time limit)" if r["q_bias_mean"] is None else f"{r['q_bias_mean']:+.1f}"
        print(f"seed {r['seed']}: deterministic return {r['return']:.1f} in {r['length']} steps ({end}"
              f"{'; last state ' + last if last else ''}){'; elites predicting the end ' + foresight if foresight else ''}"
              f" | stochastic return {r['stochastic_return']:.1f}: Q(s0) {r['q_start']:.1f} vs realised soft return "
              f"{r['soft_return_start'] if r['soft_return_start'] is not None else 'n/a'}, mean bias {bias}")
    biases = [r["q_bias_mean"] for r in rows if r["q_bias_mean"] is not None]
    if biases:
        sign = "expects more than the policy gets" if np.mean(biases) > 0 else "expects less than the policy gets"
        print(f"critic bias over the episodes: {np.mean(biases):+.1f} (the critic {sign})")
    imagined = [r["model_return"] for r in rows if r["model_return"] is not None]
    if imagined:
        print(f"ensemble's {rows[0]['model_return_steps']}-step return along the deterministic episodes: predicted "
              f"{np.mean([m['predicted'] for m in imagined]):.3f} vs realised {np.mean([m['real'] for m in imagined]):.3f}")
    ends = [r["elites_predicting_end"] for r in rows if r["elites_predicting_end"]]
    if ends:
        print(f"ensemble foresight over {len(ends)} terminated episode(s): " + ", ".join(
            f"k={k}: {np.mean([e[k] for e in ends if k in e]):.0%}" for k in FORESIGHT_STEPS if any(k in e for e in ends)))
    return 0


def export_from_cli(run_dir: Path, out: Path, plan_horizon: int | None = None, guard_percentile: float | None = None,
                    guard_margin: float | None = None) -> int:
    """`maac-robot export RUN --out DIR [--plan-horizon H] [--guard-percentile P] [--guard-margin M]`."""
    from maac_robot.learn.export import GUARD_MARGIN, GUARD_PERCENTILE, export_from_run

    guard_percentile = GUARD_PERCENTILE if guard_percentile is None else guard_percentile
    guard_margin = GUARD_MARGIN if guard_margin is None else guard_margin
    if not 0 < guard_percentile <= 100:
        raise UserError(f"--guard-percentile must be in (0, 100], got {guard_percentile:g}")
    if guard_margin <= 0:
        raise UserError(f"--guard-margin must be positive, got {guard_margin:g}")
    print(f"export: loading {run_dir}", file=sys.stderr, flush=True)
    manifest = export_from_run(run_dir, out, plan_horizon, progress=_step_line("export"),
                               guard_percentile=guard_percentile, guard_margin=guard_margin)
    print(f"exported {manifest.env_id} run {run_dir} (step {manifest.train_steps}, H={manifest.horizon}, "
          f"plan H={manifest.plan_horizon}, {manifest.num_models} models / {manifest.num_elites} elites, "
          f"opset {manifest.opset}) to {out}: " + ", ".join(manifest.files))
    return 0


def inspect_from_cli(artifacts: Path) -> int:
    """`maac-robot inspect DIR`: verify the artifacts and print the manifest and graph signatures."""
    from maac_robot.runtime.artifacts import load_artifacts

    print(load_artifacts(artifacts, warm_up=False).describe())
    return 0


def finetune_from_cli(run_dir: Path, data: Path, out: Path, steps: int | None = None) -> int:
    """`maac-robot finetune RUN --data DIR --out NEW_RUN [--steps N]`."""
    from maac_robot.learn.finetune import finetune

    result = finetune(run_dir, data, out, steps, progress=lambda what: print(f"finetune: {what}", file=sys.stderr,
                                                                             flush=True))
    r, ev = result.record, result.evaluation
    print(f"finetuned {run_dir} into {out}: {r['transitions_added']} recorded transitions from {r['episodes']} "
          f"episode(s) ({', '.join(r['sources'])}; {r['recorded_steps'] - r['transitions_added']} step(s) left out) "
          f"added to D_env (now {r['d_env']['env']} env + {r['d_env']['recorded']} recorded), {r['model_fits']} "
          f"model fit(s), {r['rounds']} G2 round(s) = {r['updates']} updates, env step {result.trainer.env_step} "
          f"unchanged; evaluation {ev['eval_return_mean']:.1f} ± {ev['eval_return_std']:.1f}; export with: "
          f"maac-robot export {shlex.quote(str(out))} --out ARTIFACTS")
    return 0
