"""A sim server running in a thread, shared by the sim and end-to-end tests."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sim.server import SimServer


@contextmanager
def running_sim(env_id: str = "HalfCheetah-v5", bind: str = "tcp://127.0.0.1:*", **kwargs) -> Iterator[SimServer]:
    """A SimServer serving in a thread; always stopped and closed, even when the test fails."""
    server = SimServer(env_id, bind=bind, **kwargs)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(5)
        server.close()
        assert not thread.is_alive(), "sim did not stop"


@contextmanager
def cli_sim(tmp_path: Path, env_id: str = "InvertedPendulum-v5", *extra: str, mode: str = "lockstep",
            sim_section: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`maac-robot sim` as its own process on a free loopback port: what a crash or abort would really kill."""
    import yaml

    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump({"env": {"id": env_id}, "sim": {"mode": mode, **(sim_section or {})}}))
    proc = subprocess.Popen([sys.executable, "-m", "maac_robot.cli", "sim", "--config", str(config),
                             "--bind", "tcp://127.0.0.1:*", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    timer = threading.Timer(60, proc.kill)  # never wait forever for the banner
    timer.start()
    banner = proc.stdout.readline()
    timer.cancel()
    try:
        assert banner.startswith("sim: serving"), proc.stderr.read() if not banner else banner
        yield proc, banner.rsplit(" on ", 1)[1].strip()
    finally:
        proc.kill()
        proc.wait()


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
