"""Sim-in-the-loop deployment: `maac-robot up` (sim + controller as two OS processes) and `maac-robot demo`.

`up` is a small supervisor, not a framework: it starts exactly the two commands the docker
compose services run (`maac-robot sim ...` and `maac-robot control ...`), prefixes and streams
their output, and guarantees no orphans: when either child exits, or on Ctrl-C/SIGTERM, the
other is terminated (SIGTERM, then SIGKILL after a grace period); the children also receive
SIGKILL from the kernel if this supervisor itself is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from maac_robot.runtime.errors import UserError

GRACE_S = 5.0
DEFAULT_BIND = "tcp://127.0.0.1:5555"


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGKILL it when the supervisor dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _check_endpoint_free(endpoint: str) -> None:
    """Fail early with one clear line when the sim's TCP port is taken (ipc endpoints are removed by the sim)."""
    url = urlparse(endpoint)
    if url.scheme != "tcp":
        return
    host, port = url.hostname or "127.0.0.1", url.port
    if port is None:
        raise UserError(f"endpoint {endpoint!r} has no port; use e.g. tcp://127.0.0.1:5555")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is in use: stop the other sim or pass --bind tcp://{host}:<free port>") from None


def _stream(name: str, proc: subprocess.Popen) -> threading.Thread:
    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_S
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM and SIGINT stop the children exactly like Ctrl-C in a terminal does."""
    raise KeyboardInterrupt


def supervise(commands: dict[str, list[str]], wait_for: str) -> int:
    """Start every command, stream their output, and stop all when `wait_for` ends or any other dies.

    Returns `wait_for`'s exit code, or 1 if another process died first.
    """
    procs: dict[str, subprocess.Popen] = {}
    pumps = []
    # SIGTERM (docker stop, systemd) and SIGINT stop the children alike. SIGINT is set explicitly: a process
    # started with `&` from a script inherits it ignored, and `kill -INT` would then leave everything running.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           bufsize=1, preexec_fn=_die_with_parent,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            pumps.append(_stream(name, procs[name]))
        while True:
            for name, proc in procs.items():
                rc = proc.poll()
                if rc is None:
                    continue
                if name == wait_for:
                    return rc
                print(f"[up] {name} exited with code {rc}; stopping the others", file=sys.stderr)
                return 1
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("[up] interrupted; stopping sim and controller", file=sys.stderr)
        return 130
    finally:
        _stop(procs)
        for pump in pumps:
            pump.join(timeout=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cli() -> list[str]:
    return [sys.executable, "-m", "maac_robot.cli"]


def up_from_cli(*, artifacts: Path, config: Path, bind: str, episodes: int, mode: str, planner: str,
                sets: list[str] | None = None) -> int:
    """Start the sim and the controller on loopback and run `episodes` episodes; `sets` go to both."""
    from maac_robot.runtime.artifacts import load_artifacts
    from maac_robot.learn.config import load_config, parse_set

    cfg = load_config(config, *parse_set(sets))  # refuses a bad --set here, before anything starts
    set_flags = [arg for item in sets or [] for arg in ("--set", item)]
    if not (artifacts / "manifest.json").is_file():
        raise UserError(f"no artifacts at {artifacts}: train and export first "
                        f"(maac-robot train --config {config} --out runs/NAME; maac-robot export runs/NAME --out {artifacts})")
    load_artifacts(artifacts, expected_env_id=cfg.env.id)  # verify now, so a mismatch is one clear line here
    _check_endpoint_free(bind)
    with tempfile.TemporaryDirectory(prefix="maac-robot-keys-") as tmp:
        keys = session_keys(Path(tmp))
        commands = {
            "sim": [*_cli(), "sim", "--config", str(config), "--bind", bind, "--mode", mode, *keys["sim"],
                    *set_flags],
            "controller": [*_cli(), "control", "--artifacts", str(artifacts), "--connect", bind,
                           "--planner", planner, "--episodes", str(episodes), "--config", str(config),
                           *keys["controller"], *set_flags],
        }
        print(f"[up] sim ({mode}) on {bind}; controller ({planner}) for {episodes} episode(s); CURVE keys for this "
              f"run only; Ctrl-C stops both")
        return supervise(commands, wait_for="controller")


def session_keys(directory: Path) -> dict[str, list[str]]:
    """A server and a controller key pair made for one `up` run, as the sim's and the controller's flags.

    Even on loopback the link is then authenticated: no other local process can drive the sim `up` started.
    """
    from maac_robot.runtime.auth import create_keys

    server_public, server_secret = create_keys(directory, "server")
    controller_public, controller_secret = create_keys(directory / "authorized", "controller")
    return {"sim": ["--server-key", str(server_secret), "--authorized", str(controller_public.parent)],
            "controller": ["--client-key", str(controller_secret), "--server-public", str(server_public)]}


def export_is_current(run_dir: Path, artifacts: Path) -> bool:
    """Whether `artifacts` were exported from `run_dir`'s latest checkpoint: the manifest's env and training step
    are the checkpoint's, and the manifest was written after the checkpoint (a retrained or resumed run writes a
    newer one). `up` still verifies every file's hash before it serves them."""
    import json

    from maac_robot.learn.trainer import RunPaths, load_checkpoint

    manifest_path, checkpoint = artifacts / "manifest.json", RunPaths(run_dir).checkpoint
    if not (manifest_path.is_file() and checkpoint.is_file()):
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    ckpt = load_checkpoint(checkpoint)
    return (isinstance(manifest, dict) and manifest.get("env_id") == ckpt["env_id"]
            and manifest.get("train_steps") == int(ckpt["env_step"])
            and manifest_path.stat().st_mtime >= checkpoint.stat().st_mtime)


def demo_from_cli(*, config: Path, out: Path, steps: int | None, episodes: int, sets: list[str] | None = None,
                  bind: str = DEFAULT_BIND, stop_return: float | None = None) -> int:
    """From nothing to a robot under MPC: train (or resume) -> export (unless up to date) -> sim + controller.

    `stop_return`: training stops early once every episode of the config's `train.stop_evals` consecutive
    evaluations returns at least this (`train.stop_return`; a `--set train.stop_return=...` wins)."""
    from maac_robot.commands import export_from_cli, train_from_cli

    _check_endpoint_free(bind)  # before minutes of training, not after
    train_sets = ([f"train.stop_return={stop_return:g}"] if stop_return is not None else []) + list(sets or [])
    checkpoint = out / "checkpoints" / "latest.pt"
    print(f"[demo] 1/3 training {config} into {out}" + (" (resuming)" if checkpoint.is_file() else ""))
    if checkpoint.is_file():
        rc = train_from_cli(config=None, resume=out, seed=None, steps=steps, out=None, device=None, sets=train_sets)
    else:
        rc = train_from_cli(config=config, resume=None, seed=None, steps=steps, out=out, device=None, sets=train_sets)
    if rc:
        return rc
    artifacts = Path("artifacts") / out.name
    if export_is_current(out, artifacts):
        print(f"[demo] 2/3 {artifacts} already holds the export of {out}'s latest checkpoint; not exporting again")
    else:
        print(f"[demo] 2/3 exporting to {artifacts}")
        if rc := export_from_cli(run_dir=out, out=artifacts):
            return rc
    print(f"[demo] 3/3 sim + controller (CEM-MPC) over ZeroMQ on {bind}")
    return up_from_cli(artifacts=artifacts, config=config, bind=bind, episodes=episodes,
                       mode="realtime", planner="cem", sets=sets)
