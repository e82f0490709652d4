"""Fault and attack suite for the robot link: live sim processes on loopback, hostile peers, a lossy link.

    python benchmarks/faults.py --artifacts artifacts/faults-ip [--fuzz 10000] [--episodes 2]

`--artifacts`: an exported InvertedPendulum policy that balances (return 1000), e.g.
`maac-robot train --config inverted_pendulum --seed 1 --steps 5000 --out runs/faults-ip`
then `maac-robot export runs/faults-ip --out artifacts/faults-ip`. Every sim is its own process
(`maac-robot sim`), so a crash, an abort or a stall is what a robot would suffer. Hostile peers use
plain ZeroMQ sockets or hand-written ZMTP over TCP, never the project's client. Every loop is bounded
in count and time. Writes `benchmarks/faults.csv` (one row per measurement, with command and commit)
and the table between the `faults` markers of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from controller.loop import GRAPHS  # noqa: E402
from controller.run import make_controller, reset_owned, run_episode, run_resilient  # noqa: E402
from loopback import free_port  # noqa: E402
from maac_robot.runtime.artifacts import load_artifacts  # noqa: E402
from maac_robot.runtime.auth import ClientCurve, create_keys  # noqa: E402
from maac_robot.runtime.config import ControllerConfig  # noqa: E402
from maac_robot.runtime.protocol import (  # noqa: E402
    Action,
    Heartbeat,
    Hello,
    ObservationMsg,
    ProtocolError,
    Reset,
    RobotClient,
    RobotTimeout,
    Shutdown,
    encode,
)
from sim.faults import LossyProxy  # noqa: E402

ENV = "InvertedPendulum-v5"
ROWS: list[dict] = []


def record(scenario: str, what: str, value: float | str, target: str = "", met: bool | None = None, **extra) -> None:
    row = {"scenario": scenario, "what": what, "value": value, "target": target,
           "met": "" if met is None else ("yes" if met else "NO"), **extra}
    ROWS.append(row)
    print(f"[{scenario}] {what}: {value}" + (f"  (target {target}: {row['met']})" if target else ""), flush=True)


class Sim:
    """`maac-robot sim` in its own process on a loopback port."""

    def __init__(self, tmp: Path, mode: str, *, port: int | None = None, max_steps: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        config = tmp / f"sim-{mode}-{self.port}.yaml"
        config.write_text(yaml.safe_dump({"env": {"id": ENV, "max_episode_steps": max_steps},
                                          "sim": {"mode": mode}}))
        self.log = open(tmp / f"sim-{self.port}.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "maac_robot.cli", "sim", "--config", str(config),
                                      "--bind", self.endpoint, *extra], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=tmp)
        timer = threading.Timer(60, self.proc.kill)
        timer.start()
        banner = self.proc.stdout.readline()
        timer.cancel()
        if not banner.startswith("sim: serving"):
            raise RuntimeError(f"sim did not start: {banner!r}")
        self.ready = time.monotonic()
        self.base_mb = self.rss_mb()[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@contextmanager
def sim(tmp: Path, mode: str, **kw) -> Iterator[Sim]:
    s = Sim(tmp, mode, **kw)
    try:
        yield s
    finally:
        s.stop()


class TimedClient(RobotClient):
    """A RobotClient that notes when observations and successful resets arrive (for stalls and reconnects)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.arrivals: list[float] = []
        self.resets: list[float] = []

    def latest_observation(self, timeout_s=None):
        obs = super().latest_observation(timeout_s)
        if obs is not None:
            self.arrivals.append(time.monotonic())
        return obs

    def reset(self, seed=None):
        obs = super().reset(seed)
        self.resets.append(time.monotonic())
        return obs


def _controller(artifacts):
    return make_controller(artifacts, ControllerConfig(planner="policy"), "policy", 0)


def _client(endpoint: str, dt: float, cls=RobotClient, **kw) -> RobotClient:
    client = cls(endpoint, timeout_s=max(1.0, 10 * dt), name="faults", **kw)
    client.hello()
    return client


def _owner_in_background(endpoint: str, artifacts) -> tuple[TimedClient, object, threading.Thread, list]:
    """A controller owning one episode (seed 0) in a thread, reconnecting as `maac-robot control` does."""
    client = _client(endpoint, artifacts.manifest.dt, TimedClient)
    controller = _controller(artifacts)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(
        run_resilient(client, controller, seed=0, manifest=artifacts.manifest, reconnect_s=30.0)))
    thread.start()
    return client, controller, thread, results


def _max_gap_periods(times: list[float], dt: float) -> float:
    return float(np.max(np.diff(times)) / dt) if len(times) > 1 else float("nan")


# ---- attacks ----
def fuzz(tmp: Path, n: int) -> None:
    """`n` hand-built messages, each waited for: random frames, corrupted real headers, hostile valid ones."""
    rng = np.random.default_rng(0)
    valid = [encode(Hello(seq=1, t=1.0)), encode(Action(seq=2, t=1.0, obs_seq=1), [np.zeros(1)]),
             encode(Reset(seq=3, t=1.0, seed=1)), encode(Shutdown(seq=4, t=1.0)),
             encode(ObservationMsg(seq=5, t=1.0, session="x", episode=0, step=0), [np.zeros(5)])]
    junk = [None, True, -1, 2**70, 1e308, float("nan"), "x" * 300, [1, 2], {"a": 1}, "reset", "action"]
    with sim(tmp, "lockstep") as s:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(s.endpoint)
        hangs, start = 0, time.monotonic()
        for i in range(n):
            kind = i % 4
            if kind == 0:
                frames = [rng.bytes(int(rng.integers(0, 300))) for _ in range(int(rng.integers(1, 10)))]
            elif kind == 3:
                frames = [b'{"v":2}', rng.bytes(int(rng.integers(65_537, 200_000)))]
            else:
                frames = list(valid[int(rng.integers(len(valid)))])
                header = json.loads(frames[0])
                for key in rng.choice([*header, "type", "extra"], size=int(rng.integers(0, 3))):
                    header[str(key)] = junk[int(rng.integers(len(junk)))]
                frames[0] = json.dumps(header).encode()
                if kind == 2 and len(frames) > 1:
                    frames[1] = frames[1][: int(rng.integers(0, len(frames[1]) + 1))]
            sock.send_multipart(frames)
            if not sock.poll(2000):
                hangs += 1
            while sock.poll(0):
                sock.recv_multipart()
        elapsed = time.monotonic() - start
        sock.close(linger=0)
        with RobotClient(s.endpoint, 2.0) as client:  # the fuzzer's own resets may still own the episode
            reset_owned(client, seed=0, wait_s=client.hello().owner_timeout_s + 1.0)
            honest = client.step(np.zeros(1)).step == 1
        record("fuzz", "hand-built messages", n, extra_rate=f"{n / elapsed:.0f} msg/s")
        record("fuzz", "crashes", int(not s.alive()), "0", s.alive())
        record("fuzz", "hangs (no reply within 2 s)", hangs, "0", hangs == 0)
        record("fuzz", "honest episode afterwards", "works" if honest else "FAILS", "works", honest)
        record("fuzz", "peak RSS MiB (start)", f"{s.rss_mb()[1]:.0f} ({s.base_mb:.0f})")


def routing_ids(tmp: Path) -> None:
    """Claim the ids an unseeded libzmq generates, then connect id-less peers, a controller and the health probe."""
    first = 0x6B8B4567
    with sim(tmp, "lockstep") as s:
        ctx = zmq.Context()
        socks = []
        ping = encode(Heartbeat(seq=1, t=1.0))
        for n in range(first - 32, first + 224):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, b"\x00" + n.to_bytes(4, "big"))
            sock.connect(s.endpoint)
            sock.send_multipart(ping)
            socks.append(sock)
        for _ in range(256):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(s.endpoint)
            sock.send_multipart(ping)
            socks.append(sock)
        answered = sum(bool(sock.poll(3000)) for sock in socks)
        probe = subprocess.run([sys.executable, "-m", "sim.health", s.endpoint, "--timeout", "2"],
                               capture_output=True, text=True, timeout=30)
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        record("routing ids", "planted + id-less peers answered", f"{answered}/{len(socks)}")
        record("routing ids", "crashes", int(not s.alive()), "0", s.alive())
        record("routing ids", "health probe afterwards", "healthy" if probe.returncode == 0 else "FAILS",
               "healthy", probe.returncode == 0)


def stranger(tmp: Path, artifacts) -> None:
    """While a controller owns a realtime episode, another peer keeps sending resets, actions and shutdowns."""
    dt = artifacts.manifest.dt
    with sim(tmp, "realtime", max_steps=250) as s:
        owner = _client(s.endpoint, dt)
        stop = threading.Event()
        codes: dict[str, int] = {}
        takeovers = 0

        def attack() -> None:
            nonlocal takeovers
            with RobotClient(s.endpoint, 0.5, name="stranger") as intruder:
                for i in range(2000):
                    if stop.is_set():
                        return
                    try:
                        if i % 3 == 0:
                            intruder.reset(seed=i)
                            takeovers += 1
                        elif i % 3 == 1:
                            intruder.step(np.full(1, 3.0 if i % 2 else np.nan))
                        else:
                            intruder.shutdown()
                    except ProtocolError as err:
                        codes[err.code] = codes.get(err.code, 0) + 1
                    except RobotTimeout:
                        codes["timeout"] = codes.get("timeout", 0) + 1
                    time.sleep(0.01)

        controller = _controller(artifacts)
        thread = threading.Thread(target=attack)
        owner_seed = 0
        owner.reset(seed=owner_seed)  # own the robot before the stranger starts
        thread.start()
        try:
            result = run_episode(owner, controller, seed=owner_seed)
        finally:
            stop.set()
            thread.join(10)
            owner.close()
            controller.close()
        record("stranger", "stranger requests refused", json.dumps(codes, sort_keys=True))
        record("stranger", "takeovers", takeovers, "0", takeovers == 0)
        record("stranger", "owner's return (250-step cap)", f"{result.ret:.0f}")
        record("stranger", "crashes / stopped by shutdown", int(not s.alive()), "0", s.alive())


def _zmtp_connect(port: int) -> socket.socket:
    """A ZMTP 3.0 NULL-mechanism DEALER handshake written by hand."""
    def prop(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value

    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
    greeting = b""
    while len(greeting) < 64:
        greeting += sock.recv(64 - len(greeting))
    body = b"\x05READY" + prop(b"Socket-Type", b"DEALER") + prop(b"Identity", b"")
    sock.sendall(b"\x04" + bytes([len(body)]) + body)
    return sock


def memory(tmp: Path, artifacts) -> None:
    """One message of many frames while a controller acts in real time: peak memory, stall, the owner's episode."""
    dt = artifacts.manifest.dt
    attacks = {
        "no attack (reference)": lambda s: time.sleep(3.0),
        "1 GiB in 4096 frames of 256 KiB": lambda s: _send_big(s.endpoint),
        "30 M frames of 1 byte, never finished (hand-written ZMTP)": lambda s: _send_tiny(s.port, 30_000_000),
    }
    for name, attack in attacks.items():
        with sim(tmp, "realtime", max_steps=250) as s:
            owner, controller, thread, results = _owner_in_background(s.endpoint, artifacts)
            time.sleep(1.0)
            attack(s)
            thread.join(60)
            _, peak = s.rss_mb()
            owner.close()
            controller.close()
            with RobotClient(s.endpoint, 2.0) as probe:
                counters = probe.status().counters
            ok = bool(results)
            record("memory", f"{name}: sim peak RSS − start MiB", f"{peak - s.base_mb:.0f}",
                   "< 256 + one check", peak - s.base_mb < 256 + 128)
            overruns, resets = counters["overruns"], counters["socket_resets"]
            record("memory", f"{name}: sim loop periods overrun (stall past one period)", overruns, "0",
                   overruns == 0)
            record("memory", f"{name}: connections dropped by the memory guard", resets)
            record("memory", f"{name}: longest gap between observations at the owner (periods)",
                   f"{_max_gap_periods(owner.arrivals, dt):.1f}")
            record("memory", f"{name}: owner's episode (250-step cap)",
                   f"return {results[0].ret:.0f}, restarted {results[0].interrupted}x" if ok else "FAILED",
                   "completes", ok)
            record("memory", f"{name}: crashes", int(not s.alive()), "0", s.alive())


def _send_big(endpoint: str) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart([b"\x00" * (1 << 18)] * 4096, copy=False)
    time.sleep(3.0)
    sock.close(linger=0)


def _send_tiny(port: int, frames: int) -> None:
    sock = _zmtp_connect(port)
    chunk = b"\x01\x01x" * 100_000  # 100k one-byte frames, each flagged 'more'
    deadline = time.monotonic() + 20
    try:
        for _ in range(frames // 100_000):
            if time.monotonic() > deadline:
                break
            sock.sendall(chunk)
    except OSError:
        pass  # the sim dropped the connection: what the memory guard does
    finally:
        sock.close()


def kill_sim(tmp: Path, artifacts) -> None:
    """kill -9 the sim in the middle of an episode, restart it on the same port: how soon does control resume?"""
    port = free_port()
    first = Sim(tmp, "realtime", port=port)
    client, controller, thread, results = _owner_in_background(first.endpoint, artifacts)
    time.sleep(3.0)
    first.proc.kill()
    first.proc.wait()
    killed = time.monotonic()
    with sim(tmp, "realtime", port=port, max_steps=100) as second:
        thread.join(60)
        after = [t for t in client.resets if t > second.ready]
        client.close()
        controller.close()
        reconnect = after[0] - second.ready if after else float("nan")
        record("kill -9 sim", "sim restart (kill to ready) s", f"{second.ready - killed:.2f}")
        record("kill -9 sim", "new episode after the restarted sim was ready, s", f"{reconnect:.2f}", "≤ 2",
               reconnect <= 2)
        record("kill -9 sim", "episode completed after restart",
               f"{results[0].steps} steps, interrupted {results[0].interrupted}" if results else "FAILED",
               "completes", bool(results))


def kill_controller(tmp: Path, artifacts_dir: Path, artifacts) -> None:
    """kill -9 a controller process mid-episode: the robot goes safe and another controller takes over."""
    dt = artifacts.manifest.dt
    with sim(tmp, "realtime") as s:
        proc = subprocess.Popen([sys.executable, "-m", "maac_robot.cli", "control", "--artifacts", str(artifacts_dir),
                                 "--connect", s.endpoint, "--planner", "policy", "--episodes", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(8.0)  # start-up, artifact checks, then a few seconds of control
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        with RobotClient(s.endpoint, 2.0) as probe:
            running = probe.status().running
        client = _client(s.endpoint, dt)
        taken = None
        while time.monotonic() - killed < 10:
            try:
                client.reset(seed=1)
                taken = time.monotonic() - killed
                break
            except ProtocolError:
                time.sleep(0.05)
        client.close()
        record("kill -9 controller", "sim alive, episode still served (safe action)",
               "yes" if s.alive() and running else "NO", "yes", s.alive())
        record("kill -9 controller", "another controller owns the robot after s",
               f"{taken:.2f}" if taken is not None else "never", "owner timeout (2 s)", taken is not None)


def lossy(tmp: Path, artifacts, episodes: int) -> None:
    """A proxy loses 0 / 1 / 5 / 10 % of messages each way; the same policy and seeds in both modes."""
    dt = artifacts.manifest.dt
    lossless: dict[str, float] = {}
    for mode in ("lockstep", "realtime"):
        with sim(tmp, mode) as s:
            for loss in (0.0, 0.01, 0.05, 0.10):
                proxy = LossyProxy(s.endpoint, loss, seed=int(loss * 100)).start()
                client = _client(proxy.endpoint, dt)
                controller = _controller(artifacts)
                try:
                    rets = [run_resilient(client, controller, seed=i, manifest=artifacts.manifest,
                                          reconnect_s=10.0).ret for i in range(episodes)]
                finally:
                    client.close()
                    controller.close()
                    proxy.stop()
                mean = float(np.mean(rets))
                lossless.setdefault(mode, mean)
                share = mean / lossless[mode] if lossless[mode] else float("nan")
                target, met = "", None
                if mode == "lockstep" and loss > 0:
                    target, met = "same return", mean == lossless[mode]
                elif loss == 0.01:
                    target, met = "≥ 95 %", share >= 0.95
                elif loss == 0.10:
                    target, met = "≥ 50 %", share >= 0.50
                record("lossy link", f"{mode}, {loss:.0%} loss: return ({episodes} episodes)",
                       f"{mean:.0f} ({share:.0%}); {' / '.join(f'{r:.0f}' for r in rets)}; "
                       f"dropped {proxy.counters.dropped}, retries {client.stats.retries}", target, met)


def unauthenticated(tmp: Path) -> None:
    """A keyed sim under 2000 connections with a wrong key or none: no reply, no log lines, no memory."""
    keys = tmp / "keys"
    create_keys(keys, "server")
    create_keys(keys / "clients", "controller")
    create_keys(keys / "other", "stranger")
    with sim(tmp, "lockstep", extra=("--server-key", str(keys / "server.key_secret"),
                                     "--authorized", str(keys / "clients"))) as s:
        log_before = Path(s.log.name).stat().st_size
        stranger = ClientCurve.load(keys / "other" / "stranger.key_secret", keys / "server.key")
        replies = 0
        for i in range(2000):
            with RobotClient(s.endpoint, 0.05, curve=stranger if i % 2 else None) as intruder:
                try:
                    intruder.status()
                    replies += 1
                except (RobotTimeout, ProtocolError):
                    pass
        good = ClientCurve.load(keys / "clients" / "controller.key_secret", keys / "server.key")
        with RobotClient(s.endpoint, 2.0, curve=good) as client:
            works = client.status().env_id == ENV
        s.log.flush()
        grown = Path(s.log.name).stat().st_size - log_before
        record("unauthenticated", "replies to 2000 wrong-key / no-key peers", replies, "0", replies == 0)
        record("unauthenticated", "sim log growth (bytes)", grown, "0", grown == 0)
        record("unauthenticated", "sim RSS growth MiB", f"{s.rss_mb()[0] - s.base_mb:.0f}")
        record("unauthenticated", "authorised controller afterwards", "works" if works else "FAILS", "works", works)


# ---- report ----
def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    import onnxruntime
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, pyzmq {zmq.__version__} "
            f"(libzmq {zmq.zmq_version()}), onnxruntime {onnxruntime.__version__}")


def write(command: str, commit: str) -> None:
    out = REPO / "benchmarks" / "faults.csv"
    first = ["scenario", "what", "value", "target", "met"]
    fields = first + sorted({k for row in ROWS for k in row} - set(first))
    with out.open("w", newline="") as f:
        f.write(f"# command: {command}\n# commit: {commit}\n# machine: {_machine()}\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(ROWS)
    lines = [f"Command: `{command}` at commit {commit}; {_machine()}; "
             f"{time.strftime('%Y-%m-%d')}. Rows: `benchmarks/faults.csv`.", "",
             "| scenario | what | measured | target | met |", "|---|---|---|---|---|"]
    lines += [f"| {r['scenario']} | {r['what']} | {r['value']} | {r['target']} | {r['met']} |" for r in ROWS]
    results = REPO / "benchmarks" / "RESULTS.md"
    text = results.read_text()
    begin, end = "<!-- faults:begin -->", "<!-- faults:end -->"
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n## Robot link: faults and attacks (`benchmarks/faults.py`)\n\n" + block + "\n"
    results.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="an exported InvertedPendulum policy")
    parser.add_argument("--fuzz", type=int, default=10_000, help="hand-built messages in the fuzz")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per loss level and mode")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (function names)")
    args = parser.parse_args()
    loaded: list = []

    def artifacts():  # loaded once, by the first scenario that needs the policy
        if not loaded:
            loaded.append(load_artifacts(args.artifacts, expected_env_id=ENV, graphs=GRAPHS))
        return loaded[0]

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    scenarios = {
        "fuzz": lambda tmp: fuzz(tmp, args.fuzz),
        "routing_ids": routing_ids,
        "stranger": lambda tmp: stranger(tmp, artifacts()),
        "memory": lambda tmp: memory(tmp, artifacts()),
        "kill_sim": lambda tmp: kill_sim(tmp, artifacts()),
        "kill_controller": lambda tmp: kill_controller(tmp, args.artifacts, artifacts()),
        "unauthenticated": unauthenticated,
        "lossy": lambda tmp: lossy(tmp, artifacts(), args.episodes),
    }
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        for name, run in scenarios.items():
            if args.only and name not in args.only:
                continue
            run(Path(tmp))
    write("python benchmarks/faults.py " + " ".join(sys.argv[1:]), commit)


if __name__ == "__main__":
    main()
