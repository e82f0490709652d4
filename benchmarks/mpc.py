"""Policy-only vs CEM-MPC on trained artifacts, through the sim over loopback ZeroMQ (not a test).

Two measurements, each against a sim running as its own process (as deployed):

1. Lockstep returns, the paper's Table 1 analogue: the deterministic policy and CEM-MPC (all
   `iterations`, no deadline) on the same reset seeds; plus any planner variants given with
   --variant NAME:key=value,... (ControllerConfig fields) on the same seeds, to measure what helps.
2. Real time at the env's native rate: CEM-MPC episodes until at least --realtime-steps control
   steps, with the planning deadline budget_frac·dt: planning latency median/p99, CEM iterations
   achieved, fallbacks, deadline misses (controller side: action later than dt after the
   observation) and robot-side held ticks (a tick that found no fresh action).

    python benchmarks/mpc.py --artifacts artifacts/hc --config half_cheetah --episodes 10
    python benchmarks/mpc.py --artifacts artifacts/hop --config hopper --population 64 \\
        --budget-frac 0.4 --variant no-policy-samples:policy_frac=0 --json benchmarks/logs/mpc-hopper.json

Output: markdown on stdout and (with --json) every figure, the command, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from controller.loop import GRAPHS, Telemetry  # noqa: E402
from controller.run import (  # noqa: E402
    EpisodeResult,
    apply_realtime_settings,
    compare_table,
    load_controller_config,
    make_controller,
    run_episodes,
)
from loopback import free_port  # noqa: E402
from maac_robot.runtime.artifacts import load_artifacts  # noqa: E402
from maac_robot.runtime.protocol import RobotClient, RobotTimeout  # noqa: E402


@contextmanager
def sim_process(config: Path, mode: str, priority: int | None = None) -> Iterator[str]:
    """`maac-robot sim` in its own process on a free loopback port (SCHED_FIFO `priority` via chrt); stopped on exit."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    chrt = ["chrt", "-f", str(priority)] if priority else []
    command = [*chrt, sys.executable, "-m", "maac_robot.cli", "sim", "--config", str(config), "--bind", endpoint,
               "--mode", mode]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    try:
        deadline = time.monotonic() + 60
        with RobotClient(endpoint, timeout_s=0.5) as probe:
            while True:
                try:
                    probe.heartbeat()
                    break
                except RobotTimeout:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"sim did not start: {proc.stderr.read().decode()[-2000:]}") from None
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def _summary(results: list[EpisodeResult]) -> dict[str, Any]:
    rets = np.array([r.ret for r in results])
    tel = Telemetry(records=[rec for r in results for rec in r.telemetry.records],
                    held_ticks=sum(r.telemetry.held_ticks for r in results),
                    dropped_observations=sum(r.telemetry.dropped_observations for r in results))
    gains = [rec.score - rec.policy_score for rec in tel.records if np.isfinite(rec.score)]
    return {"episodes": len(rets), "returns": rets.tolist(), "return_mean": float(rets.mean()),
            "return_std": float(rets.std()), "steps": int(sum(r.steps for r in results)),
            "predicted_gain_mean": float(np.mean(gains)) if gains else None, **tel.summary()}


def _parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, assignments = text.partition(":")
    fields = {}
    for item in filter(None, assignments.split(",")):
        key, _, value = item.partition("=")
        fields[key] = yaml.safe_load(value)
    return name, fields


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True, help="task YAML (env section for the sim, controller section)")
    p.add_argument("--episodes", type=int, default=10, help="lockstep episodes per planner")
    p.add_argument("--realtime-steps", type=int, default=10_000,
                   help="at least this many real-time CEM steps (0: skip)")
    p.add_argument("--max-episode-steps", type=int, help="override env.max_episode_steps (default: the env's 1000)")
    p.add_argument("--population", type=int)
    p.add_argument("--iterations", type=int)
    p.add_argument("--budget-frac", type=float)
    p.add_argument("--realtime-priority", type=int, help="SCHED_FIFO priority of controller and sim (real-time part)")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... extra lockstep CEM variant")
    p.add_argument("--seed", type=int, default=1000, help="first reset seed")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    cfg = load_controller_config(args.config)
    overrides = {k: v for k, v in (("population", args.population), ("iterations", args.iterations),
                                   ("budget_frac", args.budget_frac),
                                   ("realtime_priority", args.realtime_priority)) if v is not None}
    cfg = cfg.model_copy(update=overrides)
    cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the overrides
    arts = load_artifacts(args.artifacts, graphs=GRAPHS)
    m = arts.manifest
    task = yaml.safe_load(args.config.read_text())
    if args.max_episode_steps:
        task["env"]["max_episode_steps"] = args.max_episode_steps
    sim_config = Path(tempfile.mkdtemp()) / "sim.yaml"
    sim_config.write_text(yaml.safe_dump({"env": task["env"]}))
    seeds = [args.seed + i for i in range(args.episodes)]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
                    "loadavg_start": os.getloadavg()},
        "versions": _versions(), "env_id": m.env_id, "artifacts": str(args.artifacts), "train_steps": m.train_steps,
        "plan_horizon": m.plan_horizon, "num_elites": m.num_elites, "dt": m.dt, "controller": cfg.model_dump(),
    }
    print(f"# {m.env_id}: artifacts {args.artifacts} ({m.train_steps} train steps), plan H {m.plan_horizon}, "
          f"population {cfg.population}, iterations {cfg.iterations}, budget {cfg.budget_frac}·dt, "
          f"dt {m.dt * 1e3:.0f} ms", flush=True)

    lockstep: dict[str, list[EpisodeResult]] = {}
    with sim_process(sim_config, "lockstep") as endpoint, RobotClient(endpoint, timeout_s=10) as client:
        client.hello()
        variants = [("policy", "policy", cfg), ("cem", "cem", cfg)]
        variants += [(name, "cem", cfg.model_copy(update=f)) for name, f in map(_parse_variant, args.variant)]
        for name, planner, vcfg in variants:
            controller = make_controller(arts, type(cfg).model_validate(vcfg.model_dump()), planner, vcfg.seed)
            try:
                lockstep[name] = run_episodes(client, controller, seeds, f"lockstep {name}")
            finally:
                controller.close()
    report["lockstep"] = {name: _summary(res) for name, res in lockstep.items()}
    print("\n## Lockstep (no deadline, all iterations), same seeds\n")
    print(compare_table(lockstep), flush=True)

    if args.realtime_steps:
        realtime: list[EpisodeResult] = []
        apply_realtime_settings(cfg)  # before the realtime socket's context: its I/O thread inherits the priority
        with (sim_process(sim_config, "realtime", cfg.realtime_priority) as endpoint,
              RobotClient(endpoint, timeout_s=10, context=zmq.Context()) as client):
            client.hello()
            controller = make_controller(arts, cfg, "cem", cfg.seed)
            try:
                seed = args.seed
                while sum(r.steps for r in realtime) < args.realtime_steps:
                    realtime += run_episodes(client, controller, [seed], "realtime cem")
                    seed += 1
            finally:
                controller.close()
        report["realtime_cem"] = _summary(realtime)
        s = report["realtime_cem"]
        print(f"\n## Real time at {1 / m.dt:.0f} Hz (budget {cfg.budget_frac}·dt = "
              f"{cfg.budget_frac * m.dt * 1e3:.1f} ms, "
              f"SCHED_FIFO priority {cfg.realtime_priority})\n")
        print(f"{s['steps']} steps over {s['episodes']} episodes: return {s['return_mean']:.1f} ± "
              f"{s['return_std']:.1f}; "
              f"planning latency median {s['latency_ms_median']:.2f} ms, p99 {s['latency_ms_p99']:.2f} ms, "
              f"max {s['latency_ms_max']:.2f} ms; CEM iterations mean {s['iterations_mean']:.2f}; deadline misses "
              f"{s['deadline_misses']}; robot held ticks {s['held_ticks']}; dropped observations "
              f"{s['dropped_observations']}; fallbacks " + ", ".join(
                  f"{k.removeprefix('fallback_')} {v}" for k, v in s.items() if k.startswith("fallback_")))
    report["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\nload average start {report['machine']['loadavg_start']}, end {report['machine']['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _versions() -> dict[str, str]:
    import onnxruntime
    import pydantic
    import zmq

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "pyzmq": zmq.__version__, "pydantic": pydantic.__version__}


if __name__ == "__main__":
    main()
