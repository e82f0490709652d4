"""What it takes for the controller to be on time on a loaded machine (not a test).

Each configuration runs in a fresh process (scheduling policy, GIL switch interval and ZeroMQ's
I/O thread are process-wide):

* `loop`: the controller alone, `--steps` CEM steps with a deadline of budget_frac·dt, one step
  per dt; normal scheduling vs SCHED_FIFO, CPython's default 5 ms GIL switch interval vs 0.5 ms.
* `sim`: controller and `maac-robot sim` (real time, both SCHED_FIFO) over loopback; the
  controller's priority set before vs after its ZeroMQ socket exists (then the I/O thread
  does or does not inherit it). Reports robot-side held ticks and observation age at decode.

    python benchmarks/mpc_scheduling.py --artifacts ARTIFACTS --config hopper --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = [
    {"part": "loop", "priority": None, "switch_s": 5e-4},
    {"part": "loop", "priority": 10, "switch_s": 5e-4},
    {"part": "loop", "priority": 10, "switch_s": 5e-3},
    {"part": "sim", "priority": 10, "order": "after_socket"},
    {"part": "sim", "priority": 10, "order": "before_socket"},
]


def child(args: argparse.Namespace, spec: dict) -> dict:
    import os

    from controller.loop import GRAPHS
    from controller.run import load_controller_config, make_controller
    from maac_robot.runtime.artifacts import load_artifacts

    cfg = load_controller_config(args.config).model_copy(update={"realtime_priority": spec["priority"]})
    arts = load_artifacts(args.artifacts, graphs=GRAPHS)
    dt = arts.manifest.dt

    def realtime() -> None:
        sys.setswitchinterval(spec.get("switch_s", 5e-4))
        if spec["priority"]:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(spec["priority"]))

    if spec["part"] == "loop":
        realtime()
        controller = make_controller(arts, cfg, "cem", 0)
        state = np.zeros(arts.manifest.state_dim, np.float32)
        records = []
        for _ in range(args.steps):
            start = time.perf_counter()
            records.append(controller.act(state, start + cfg.budget_frac * dt, start)[1])
            time.sleep(max(0.0, start + dt - time.perf_counter()))
        controller.close()
        lat = np.array([r.latency for r in records]) * 1e3
        return {"latency_ms_p50_p99_max": np.percentile(lat, [50, 99, 100]).round(2).tolist(),
                "fallbacks": dict(Counter(r.fallback or "none" for r in records)),
                "iterations_mean": float(np.mean([r.iterations for r in records]))}

    from mpc import sim_process  # benchmarks/mpc.py

    from maac_robot.runtime.protocol import RobotClient

    if spec["order"] == "before_socket":  # before sim_process's probe creates the process's ZeroMQ context
        realtime()
    with sim_process(args.config.resolve(), "realtime", spec["priority"]) as endpoint:
        client = RobotClient(endpoint, timeout_s=2.0)
        client.hello()
        if spec["order"] == "after_socket":
            realtime()
        controller = make_controller(arts, cfg, "cem", 0)
        ages, sent, held = [], [], 0
        steps, seed = 0, 0
        while steps < args.steps:
            controller.reset()
            obs = client.reset(seed)
            seed += 1
            while not obs.done and steps < args.steps:
                received = time.perf_counter() - max(0.0, time.time() - obs.t_received)
                action, _ = controller.act(obs.state, received + cfg.budget_frac * dt, received)
                client.send_action(action, obs_seq=obs.seq)
                ages.append(obs.t_received - obs.t_robot)
                sent.append(time.time() - obs.t_robot)
                nxt = client.latest_observation(10 * dt)
                if nxt is None:
                    raise SystemExit("no observation from the sim")
                held += bool(nxt.info.get("held"))
                obs, steps = nxt, steps + 1
        controller.close()
        client.close()
    return {"steps": steps, "held_ticks": held,
            "obs_age_at_decode_ms_p50_p99": (np.percentile(ages, [50, 99]) * 1e3).round(2).tolist(),
            "action_after_publish_ms_p50_p99_max": (np.percentile(sent, [50, 99, 100]) * 1e3).round(2).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True, help="task YAML (env for the sim, controller section)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args, json.loads(args.child))))
        return
    import os

    results = []
    print(f"load average {os.getloadavg()}")
    for _ in range(args.repeats):
        for spec in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--artifacts", str(args.artifacts), "--config",
                                  str(args.config), "--steps", str(args.steps), "--child", json.dumps(spec)],
                                 capture_output=True, text=True, check=True)
            result = {**spec, **json.loads(out.stdout.strip().splitlines()[-1])}
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"load average {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))


if __name__ == "__main__":
    main()
