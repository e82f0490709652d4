"""`maac-robot`: one command line for train -> export -> evaluate -> sim -> control.

Each subcommand imports its implementation lazily, so `maac-robot control` on a robot
computer never imports torch and `maac-robot --help` is instant.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

# The built-in configs (maac_robot/configs/*.yaml), which every --config takes by name.
_BUILTIN = ", ".join(sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml")))


def _cmd_train(args: argparse.Namespace) -> int:
    from maac_robot.commands import train_from_cli

    return train_from_cli(config=args.config, resume=args.resume, seed=args.seed, steps=args.steps,
                          out=args.out, device=args.device, sets=args.set, connect=args.connect,
                          client_key=args.client_key, server_public=args.server_public,
                          reconnect=not args.no_reconnect)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from maac_robot.commands import evaluate_from_cli

    return evaluate_from_cli(run_dir=args.run, episodes=args.episodes, seed=args.seed, seeds=args.seeds,
                             video=args.video)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from maac_robot.commands import diagnose_from_cli

    return diagnose_from_cli(run_dir=args.run, episodes=args.episodes, seed=args.seed)


def _cmd_export(args: argparse.Namespace) -> int:
    from maac_robot.commands import export_from_cli

    return export_from_cli(run_dir=args.run, out=args.out, plan_horizon=args.plan_horizon,
                           guard_percentile=args.guard_percentile, guard_margin=args.guard_margin)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from maac_robot.commands import finetune_from_cli

    return finetune_from_cli(run_dir=args.run, data=args.data, out=args.out, steps=args.steps)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from maac_robot.commands import inspect_from_cli

    return inspect_from_cli(artifacts=args.artifacts)


def _check_set_keys(sets: list[str]) -> None:
    """The sim and the controller read only their own sections, so they cannot tell a typo in another
    section's key from a key meant for another process: every key is checked against the whole config here."""
    from maac_robot.learn.config import parse_set

    parse_set(sets)


def _cmd_sim(args: argparse.Namespace) -> int:
    from sim.server import sim_from_cli

    _check_set_keys(args.set)
    return sim_from_cli(config=args.config, bind=args.bind, mode=args.mode, render=args.render, seed=args.seed,
                        record=args.record, server_key=args.server_key, authorized=args.authorized,
                        admin_key=args.admin_key, insecure=args.insecure, sets=args.set, perturb=args.perturb)


def _cmd_control(args: argparse.Namespace) -> int:
    from controller.run import control_from_cli

    _check_set_keys(args.set)
    return control_from_cli(artifacts=args.artifacts, connect=args.connect, planner=args.planner,
                            episodes=args.episodes, config=args.config, seed=args.seed,
                            compare=args.compare, client_key=args.client_key, server_public=args.server_public,
                            reconnect=not args.no_reconnect, sets=args.set, record=args.record)


def _cmd_keys(args: argparse.Namespace) -> int:
    from maac_robot.runtime.auth import create_keys

    public, secret = create_keys(args.dir, args.name)
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it here, mode 0600)")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from maac_robot.deploy import up_from_cli

    return up_from_cli(artifacts=args.artifacts, config=args.config, bind=args.bind, episodes=args.episodes,
                       mode=args.mode, planner=args.planner, sets=args.set)


def _cmd_demo(args: argparse.Namespace) -> int:
    from maac_robot.deploy import demo_from_cli

    return demo_from_cli(config=args.config, out=args.out, steps=args.steps, episodes=args.episodes, sets=args.set,
                         bind=args.bind, stop_return=args.stop_return if args.stop_return > 0 else None)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help (none for flags and unset options); the epilog's key list as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _cmd_sweep(args: argparse.Namespace) -> int:
    from maac_robot.sweep.runner import sweep_from_cli

    return sweep_from_cli(config=args.config, seeds=args.seeds, out=args.out, grid=args.grid, sets=args.set,
                          steps=args.steps, address=args.address, cpus_per_trial=args.cpus_per_trial)


def _cmd_report(args: argparse.Namespace) -> int:
    from maac_robot.sweep.report import report_from_cli

    return report_from_cli(args.sweep)


def _add_set(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """--set, with every key it takes (default, description) listed at the end of --help."""
    from maac_robot.learn.config import config_help

    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, typed and validated like the file's "
                             "(repeatable; e.g. --set agent.horizon=5 --set train.eval_every=500)")
    parser.epilog = config_help(sections)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maac-robot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    p = add("train", help="train MAAC on a MuJoCo task (Algorithm 1)")
    p.add_argument("--config", type=Path, help=f"YAML config file, or a built-in one by name ({_BUILTIN})")
    p.add_argument("--resume", type=Path, help="run directory to continue from its last checkpoint")
    p.add_argument("--seed", type=int, help="overrides train.seed")
    p.add_argument("--steps", type=int, help="total env steps (overrides train.total_steps)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<task>-<seed>-<time>)")
    p.add_argument("--device", help="cpu or cuda (overrides train.device)")
    p.add_argument("--connect", metavar="ENDPOINT",
                   help="collect the real data from the robot or sim at this endpoint (e.g. tcp://HOST:5555; "
                        "lockstep or realtime) instead of an in-process env; evaluation stays in-process")
    p.add_argument("--client-key", type=Path, help="with --connect, CURVE: this trainer's NAME.key_secret")
    p.add_argument("--server-public", type=Path, help="with --connect, CURVE: the robot's public NAME.key")
    p.add_argument("--no-reconnect", action="store_true",
                   help="with --connect: stop with one line (after a checkpoint) when the robot is lost, instead "
                        "of pausing and reconnecting for up to controller.reconnect_s")
    _add_set(p)
    p.set_defaults(func=_cmd_train)

    p = add("evaluate", help="mean +- std return of the deterministic policy of a run")
    p.add_argument("run", type=Path, help="run directory (maac-robot train --out)")
    p.add_argument("--episodes", type=int,
                   help="episodes, one per reset seed (default 10; with --seeds training: train.eval_episodes)")
    p.add_argument("--seed", type=int, help="first reset seed of --seeds default (default 10000)")
    p.add_argument("--seeds", choices=["default", "training"], default="default",
                   help="default: reset seeds --seed, --seed+1, ...; training: the reset seeds of the training "
                        "curve's evaluations (metrics.jsonl), so the returns compare with it")
    p.add_argument("--video", type=Path, metavar="FILE",
                   help="also record the episodes to this mp4 (needs the [render] extra; ~0.3 s a frame headless)")
    p.set_defaults(func=_cmd_evaluate)

    p = add("diagnose", help="how a run's episodes end; its critic's bias and its ensemble's foresight")
    p.add_argument("run", type=Path, help="run directory (maac-robot train --out)")
    p.add_argument("--episodes", type=int, default=3, help="episodes, one per reset seed")
    p.add_argument("--seed", type=int, default=10_000, help="first reset seed")
    p.set_defaults(func=_cmd_diagnose)

    p = add("export", help="export a run's policy, ensemble and Q to ONNX + manifest")
    p.add_argument("run", type=Path, help="run directory (maac-robot train --out)")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write (replaced atomically)")
    p.add_argument("--plan-horizon", type=int, help="H of the fused plan graph (default: the trained agent.horizon)")
    p.add_argument("--guard-percentile", type=float,
                   help="uncertainty guard: the percentile of the ensemble's disagreement over the run's replay buffer "
                        "(default: learn.export.GUARD_PERCENTILE, 99)")
    p.add_argument("--guard-margin", type=float,
                   help="uncertainty guard: the threshold is that percentile times this margin "
                        "(default: learn.export.GUARD_MARGIN, 1.5)")
    p.set_defaults(func=_cmd_export)

    p = add("finetune", help="add recorded episodes (control/sim --record) to a copy of a run's D_env, refit, update")
    p.add_argument("run", type=Path, help="run directory to start from (maac-robot train --out); not modified")
    p.add_argument("--data", type=Path, required=True, help="directory of recorded episodes (.npz)")
    p.add_argument("--out", type=Path, required=True, help="new run directory to write (must not exist)")
    p.add_argument("--steps", type=int,
                   help="G2 rounds without env steps, each agent.updates_per_step updates, the model refit every "
                        "model.train_every and rollouts every rollout.every rounds (default: one per recorded "
                        "transition added)")
    p.set_defaults(func=_cmd_finetune)

    p = add("inspect", help="print an artifact's manifest and graph signatures")
    p.add_argument("artifacts", type=Path, help="artifact directory (maac-robot export --out)")
    p.set_defaults(func=_cmd_inspect)

    p = add("sim", help="serve a MuJoCo env over the robot protocol")
    p.add_argument("--config", type=Path, required=True,
                   help=f"YAML config file, or a built-in one by name ({_BUILTIN})")
    p.add_argument("--bind", help="endpoint (default from config: tcp://127.0.0.1:5555)")
    p.add_argument("--mode", choices=["lockstep", "realtime"], help="overrides sim.mode (default lockstep)")
    p.add_argument("--render", type=Path, help="write a video of the episodes (mp4)")
    p.add_argument("--record", type=Path, help="directory to record each episode's transitions (.npz)")
    p.add_argument("--seed", type=int, help="overrides sim.seed (reset seeds of the episodes)")
    p.add_argument("--server-key", type=Path, help="CURVE: this sim's NAME.key_secret (see `maac-robot keys`)")
    p.add_argument("--authorized", type=Path, help="CURVE: directory of the public NAME.key files of allowed controllers")
    p.add_argument("--admin-key", type=Path, help="CURVE: public key allowed to stop the sim over the wire")
    p.add_argument("--insecure", action="store_true", help="allow binding off loopback without keys (warns)")
    p.add_argument("--perturb", action="append", metavar="KEY=VALUE",
                   help="serve dynamics that differ on purpose, over the config's sim.perturb (repeatable): "
                   "mass_scale, body_mass_scale.BODY, damping_scale, friction_scale, actuator_gain_scale, "
                   "obs_noise_std, action_delay_ticks, push_prob, push_force, push_body; a value [lo,hi] is "
                   "drawn anew each episode, e.g. --perturb mass_scale=[0.8,1.2]")
    _add_set(p, ("env", "sim"))
    p.set_defaults(func=_cmd_sim)

    p = add("control", help="drive a sim or robot with the exported policy / CEM-MPC")
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory (maac-robot export --out)")
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the robot's (or sim's) endpoint")
    p.add_argument("--planner", choices=["cem", "policy"], help="overrides controller.planner (default cem)")
    p.add_argument("--episodes", type=int, default=1, help="episodes to run")
    p.add_argument("--config", type=Path,
                   help=f"YAML (a file, or a built-in name: {_BUILTIN}) whose `controller` section overrides the defaults")
    p.add_argument("--seed", type=int, default=0, help="first reset seed")
    p.add_argument("--compare", action="store_true",
                   help="policy-only vs CEM-MPC on the same seeds (lockstep), the paper's Table 1")
    p.add_argument("--client-key", type=Path, help="CURVE: this controller's NAME.key_secret")
    p.add_argument("--server-public", type=Path, help="CURVE: the robot's public NAME.key")
    p.add_argument("--no-reconnect", action="store_true",
                   help="exit with one line when the robot is lost, instead of reconnecting (controller.reconnect_s)")
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="write each episode as the controller saw it (.npz; maac-robot finetune --data DIR)")
    _add_set(p, ("controller",))
    p.set_defaults(func=_cmd_control)

    p = add("keys", help="write a CURVE key pair NAME.key / NAME.key_secret (zmq.auth format)")
    p.add_argument("dir", type=Path, help="directory to write the key pair into (created)")
    p.add_argument("--name", required=True, help="e.g. server, controller, admin")
    p.set_defaults(func=_cmd_keys)

    p = add("up", help="start sim and controller as two processes on loopback")
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory (maac-robot export --out)")
    p.add_argument("--config", type=Path, required=True,
                   help=f"YAML config file, or a built-in one by name ({_BUILTIN})")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="the sim's endpoint")
    p.add_argument("--episodes", type=int, default=3, help="episodes the controller runs")
    p.add_argument("--mode", choices=["lockstep", "realtime"], default="realtime", help="the sim's mode")
    p.add_argument("--planner", choices=["cem", "policy"], default="cem", help="the controller's planner")
    _add_set(p, ("env", "sim", "controller"))
    p.set_defaults(func=_cmd_up)

    p = add("demo", help="from nothing: train a small policy, export, run sim + MPC controller")
    p.add_argument("--config", type=Path, default=Path("inverted_pendulum"),
                   help=f"YAML config file, or a built-in one by name ({_BUILTIN}; default inverted_pendulum)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (resumed if it exists)")
    p.add_argument("--steps", type=int, default=4000,
                   help="env steps to train (default 4000: 8 of 12 InvertedPendulum seeds balanced by then, benchmarks/RESULTS.md)")
    p.add_argument("--episodes", type=int, default=2, help="CEM-MPC episodes on the sim")
    p.add_argument("--stop-return", type=float, default=1000.0,
                   help="stop training early once every episode of two consecutive evaluations returns at least this "
                        "(InvertedPendulum's maximum; 0: train all --steps)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="the sim's endpoint (default tcp://127.0.0.1:5555), checked free before training starts")
    _add_set(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sweep", help="every (variant x seed) as its own run, in parallel through Ray; resumable")
    p.add_argument("--config", type=Path, required=True,
                   help=f"YAML config file, or a built-in one by name ({_BUILTIN})")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="the seeds of every variant, e.g. 0 1 2")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="one axis of the grid (repeatable; the variants are the product of the axes), "
                        "e.g. --grid agent.horizon=0,1,3 --grid agent.steve=true,false")
    p.add_argument("--steps", type=int, help="env steps per trial (overrides train.total_steps)")
    p.add_argument("--out", type=Path, required=True,
                   help="the sweep directory: OUT/VARIANT-sSEED/ per trial, OUT/evaluations.csv; rerun the same "
                        "command to skip finished trials and resume the others")
    p.add_argument("--address", help="join this Ray cluster ('auto', HOST:PORT or ray://HOST:PORT; OUT on a "
                                     "filesystem every node mounts) instead of starting a local one on loopback")
    p.add_argument("--cpus-per-trial", type=int, default=1,
                   help="CPUs Ray reserves for each trial, and its torch threads (default 1)")
    _add_set(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="a sweep's mean curves, and IQM with 95%% bootstrap CI per variant")
    p.add_argument("sweep", type=Path, help="the sweep directory (`maac-robot sweep --out`)")
    p.set_defaults(func=_cmd_report)
    return parser


EXTRA_OF_MODULE = {"torch": "train", "onnx": "train", "onnxscript": "train", "tqdm": "train", "matplotlib": "train",
                   "tensorboard": "train", "gymnasium": "sim", "mujoco": "sim", "imageio": "render",
                   "imageio_ffmpeg": "render", "ray": "sweep"}
"""The optional dependencies and the extra that installs each: a robot computer has only the runtime."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        extra = EXTRA_OF_MODULE.get((err.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"error: `maac-robot {args.command}` needs {err.name}, which this install lacks: "
              f"pip install 'maac-robot[{extra}]'", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a CLI prints one clear line; --debug-free by design
        from maac_robot.runtime.errors import UserError

        if isinstance(err, UserError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
