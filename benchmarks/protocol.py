"""Protocol benchmark: what talking to the robot over ZeroMQ costs, compared with stepping in-process.

    python benchmarks/protocol.py [--exchanges 20000] [--steps 10000] [--json out.json]

Measured, with the sim in its own process (as deployed) and the client here:
1. round trip of one action->observation exchange (`RobotClient.step`, lockstep HalfCheetah-v5)
   over tcp loopback, tcp loopback with CURVE authentication and encryption, and ipc: median and p99 of the full round trip, and of the protocol overhead
   = round trip - the sim's own `env.step` time (which the sim reports in `info["sim_step_s"]`);
   plus a bare ZeroMQ DEALER/ROUTER echo of the same frame sizes (the transport floor), and the
   CPU the codec and the action gate spend per exchange without sockets;
   With ``--realtime-priority P`` that latency part (and the processes it starts) runs under
   SCHED_FIFO, as control processes on a robot computer would;
2. lockstep env steps/s through the protocol vs in-process Gymnasium stepping, HalfCheetah-v5 and
   Hopper-v5, random actions, resets included in both.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maac_robot.runtime.auth import ClientCurve, create_keys  # noqa: E402
from maac_robot.runtime.protocol import RobotClient  # noqa: E402


def _serve(kind: str, env_id: str, endpoint: str) -> None:
    """Child process: a sim (or a bare echo) on `endpoint` until told to stop."""
    if kind == "echo":
        reply = _typical_frames()[1]
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        print("ready", flush=True)
        while sock.poll(5000):
            frames = sock.recv_multipart()
            if frames[1] == b"stop":
                return
            sock.send_multipart([frames[0], *reply])
        return
    from sim.server import SimServer

    keys = os.environ.get("MAAC_BENCH_KEYS")  # set for the CURVE variant
    auth = {"server_key": f"{keys}/server.key_secret", "authorized": f"{keys}/clients"} if keys else {}
    server = SimServer(env_id, bind=endpoint, mode="lockstep", seed=0, **auth)
    print("ready", flush=True)
    try:
        server.serve()
    finally:
        server.close()


class _Child:
    def __init__(self, kind: str, env_id: str, endpoint: str, keys: Path | None = None) -> None:
        env = {**os.environ, **({"MAAC_BENCH_KEYS": str(keys)} if keys else {})}
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, env_id, endpoint],
                                     stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(), env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{kind} server for {env_id} on {endpoint} did not start")

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@contextmanager
def _fifo(priority: int | None) -> Iterator[None]:
    """Optionally run a block (and the processes it starts, which inherit it) under SCHED_FIFO `priority`,
    as a robot computer would run its control processes; back to normal scheduling afterwards."""
    if priority is None:
        yield
        return
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _stats(samples_s: np.ndarray) -> dict[str, float]:
    us = samples_s * 1e6
    return {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "n": int(us.size)}


def round_trip(endpoint: str, exchanges: int, warmup: int = 500,
               keys: Path | None = None) -> dict[str, dict[str, float]]:
    """`keys`: a directory from `session_keys`, for the CURVE variant."""
    rtt, overhead = [], []
    rng = np.random.default_rng(0)
    curve = ClientCurve.load(keys / "clients" / "controller.key_secret", keys / "server.key") if keys else None
    with _Child("sim", "HalfCheetah-v5", endpoint, keys), \
            RobotClient(endpoint, timeout_s=5.0, curve=curve) as client:
        info = client.hello()
        obs = client.reset(seed=0)
        for i in range(warmup + exchanges):
            if obs.done:
                obs = client.reset()
            action = rng.uniform(info.act_low, info.act_high)
            start = time.perf_counter()
            obs = client.step(action)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                rtt.append(elapsed)
                overhead.append(elapsed - obs.info["sim_step_s"])
    return {"round_trip": _stats(np.array(rtt)), "overhead": _stats(np.array(overhead))}


def _typical_frames() -> tuple[list[bytes], list[bytes]]:
    """An encoded HalfCheetah action and observation (with a typical info dict), for the bare echo."""
    from maac_robot.runtime.protocol import Action, ObservationMsg, encode
    from sim.server import SafetyCounters, _flags

    info = {**_flags(), "sim_step_s": 4e-5, **vars(SafetyCounters()),
            "env": {"x_position": 0.1, "x_velocity": 0.2, "reward_forward": 0.2, "reward_ctrl": -0.1}}
    action = encode(Action(seq=12345, t=time.time(), obs_seq=12344), [np.zeros(6)])
    obs = encode(ObservationMsg(seq=12345, t=time.time(), session="0" * 16, episode=1, step=500,
                                action_seq=12345, reward=0.5, info=info), [np.zeros(18)])
    return action, obs


def echo_round_trip(endpoint: str, exchanges: int, warmup: int = 500) -> dict[str, float]:
    """Bare transport: an action's frames out, an observation's frames back; no codec, no sim."""
    frames = _typical_frames()[0]
    samples = []
    with _Child("echo", "-", endpoint):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for i in range(warmup + exchanges):
            start = time.perf_counter()
            sock.send_multipart(frames)
            if not sock.poll(5000):
                raise RuntimeError("echo server did not answer")
            sock.recv_multipart()
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        sock.send(b"stop")
        sock.close(linger=100)
    return _stats(np.array(samples))


def codec_cpu(exchanges: int) -> dict[str, float]:
    """CPU the protocol itself spends per exchange, no sockets: both encodes, both decodes, the action gate."""
    from maac_robot.runtime.protocol import decode, encode
    from sim.server import ActionGate

    action_frames, obs_frames = _typical_frames()
    action_msg, (action,) = decode(action_frames)
    obs_msg, (state,) = decode(obs_frames)
    gate = ActionGate(-np.ones(6), np.ones(6))
    samples = []
    for _ in range(exchanges):
        start = time.perf_counter()
        decode(encode(action_msg, [action]))
        gate.check(action)
        decode(encode(obs_msg, [state]))
        samples.append(time.perf_counter() - start)
    return _stats(np.array(samples))


def steps_per_second(env_id: str, endpoint: str, steps: int) -> dict[str, float]:
    from maac_robot.envs import make_env

    env = make_env(env_id)
    low, high = env.action_space.low, env.action_space.high
    actions = np.random.default_rng(0).uniform(low, high, size=(steps, low.shape[0]))
    env.reset(seed=0)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    in_process = steps / (time.perf_counter() - start)
    with _Child("sim", env_id, endpoint), RobotClient(endpoint, timeout_s=5.0) as client:
        client.reset(seed=0)
        start = time.perf_counter()
        for action in actions:
            if client.step(action).done:
                client.reset()
        protocol = steps / (time.perf_counter() - start)
    return {"in_process_steps_per_s": in_process, "protocol_steps_per_s": protocol}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--port", type=int, default=5599)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--realtime-priority", type=int, metavar="P",
                        help="run the latency part (client, sim and echo processes) under SCHED_FIFO priority P")
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "ENV", "ENDPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(*args.serve)
        return
    tmp = tempfile.mkdtemp(prefix="protocol-bench-")
    endpoints = {"tcp": f"tcp://127.0.0.1:{args.port}", "ipc": f"ipc://{tmp}/sim.sock"}
    import gymnasium
    import mujoco
    import pydantic

    results: dict = {"versions": {"python": platform.python_version(), "pyzmq": zmq.__version__,
                                  "libzmq": zmq.zmq_version(), "pydantic": pydantic.__version__,
                                  "numpy": np.__version__, "gymnasium": gymnasium.__version__,
                                  "mujoco": mujoco.__version__}}
    results["loadavg_before"] = os.getloadavg()
    results["codec_cpu"] = codec_cpu(args.exchanges)
    results["realtime_priority"] = args.realtime_priority
    keys = Path(tmp) / "keys"
    create_keys(keys, "server")
    create_keys(keys / "clients", "controller")
    with _fifo(args.realtime_priority):  # before the first socket: ZeroMQ's I/O thread inherits the policy
        for name, endpoint in endpoints.items():
            results[f"exchange_{name}"] = round_trip(endpoint, args.exchanges)
            results[f"echo_{name}"] = echo_round_trip(endpoint, args.exchanges)
        # CURVE's cost: plain and CURVE runs alternate, so a noisy spell on the shared machine hits both
        pairs = [(round_trip(endpoints["tcp"], args.exchanges // 2),
                  round_trip(endpoints["tcp"], args.exchanges // 2, keys=keys)) for _ in range(3)]
        results["curve_pairs"] = [{"plain": p["round_trip"], "curve": c["round_trip"]} for p, c in pairs]
        results["exchange_tcp+curve"] = pairs[-1][1]
    for env_id in ("HalfCheetah-v5", "Hopper-v5"):
        results[f"steps_{env_id}"] = {name: steps_per_second(env_id, endpoint, args.steps)
                                      for name, endpoint in endpoints.items()}
    results["loadavg_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    print(f"\n| transport | what | median µs | p99 µs | max µs | n |\n|---|---|---|---|---|---|")
    for name in endpoints:
        rows = [("action→observation round trip", results[f"exchange_{name}"]["round_trip"]),
                ("protocol overhead (round trip − sim env.step)", results[f"exchange_{name}"]["overhead"]),
                ("bare ZeroMQ echo, same frame sizes", results[f"echo_{name}"])]
        for what, s in rows:
            print(f"| {name} | {what} | {s['median_us']:.0f} | {s['p99_us']:.0f} | {s['max_us']:.0f} | {s['n']} |")
    print("\n| CURVE cost, alternating runs (tcp) | plain median / p99 µs | CURVE median / p99 µs | median ratio |"
          "\n|---|---|---|---|")
    for i, pair in enumerate(results["curve_pairs"]):
        p, c = pair["plain"], pair["curve"]
        print(f"| pair {i + 1} | {p['median_us']:.0f} / {p['p99_us']:.0f} | {c['median_us']:.0f} / {c['p99_us']:.0f} "
              f"| {c['median_us'] / p['median_us']:.2f} |")
    print("\n| env | in-process steps/s | lockstep via tcp steps/s | via ipc steps/s |\n|---|---|---|---|")
    for env_id in ("HalfCheetah-v5", "Hopper-v5"):
        r = results[f"steps_{env_id}"]
        print(f"| {env_id} | {r['tcp']['in_process_steps_per_s']:,.0f} | {r['tcp']['protocol_steps_per_s']:,.0f} "
              f"| {r['ipc']['protocol_steps_per_s']:,.0f} |")
    c = results["codec_cpu"]
    print(f"\ncodec + action gate CPU per exchange (no sockets): median {c['median_us']:.0f} µs, "
          f"p99 {c['p99_us']:.0f} µs")
    print(f"load average before {results['loadavg_before']}, after {results['loadavg_after']}; "
          f"latency part under SCHED_FIFO priority {args.realtime_priority}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
