"""The `up` supervisor: both children stop when either ends, on SIGINT/SIGTERM, or when it is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from maac_robot.deploy import _check_endpoint_free, supervise
from maac_robot.runtime.errors import UserError

SLEEPER = [sys.executable, "-c", "import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)"]


def _sleeper_writing_pid(path) -> list[str]:
    return [sys.executable, "-c", f"import os, time; open({str(path)!r}, 'w').write(str(os.getpid())); time.sleep(600)"]


def _pid_from(path, timeout: float = 10.0) -> int:
    end = time.monotonic() + timeout
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < end, "sleeper never started"
        time.sleep(0.02)
    return int(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_waited_process_exit_stops_the_other(tmp_path):
    pid_file = tmp_path / "pid"
    controller = [sys.executable, "-c", f"import os, sys, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\nsys.exit(3)"]
    rc = supervise({"sim": _sleeper_writing_pid(pid_file), "controller": controller}, wait_for="controller")
    assert rc == 3
    assert _wait_dead(_pid_from(pid_file))


def test_other_process_dying_stops_the_waited_one(tmp_path, capsys):
    pid_file = tmp_path / "pid"
    sim = [sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\nraise SystemExit(1)"]
    rc = supervise({"sim": sim, "controller": _sleeper_writing_pid(pid_file)}, wait_for="controller")
    assert rc == 1
    assert _wait_dead(_pid_from(pid_file))
    assert "sim exited with code 1" in capsys.readouterr().err


@pytest.mark.parametrize("how, sigint_ignored_by_parent", [
    (signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGKILL, False),
    (signal.SIGINT, True),  # started with `&` from a script: SIGINT arrives inherited as ignored
])
def test_no_orphans_when_supervisor_is_signalled(how, sigint_ignored_by_parent):
    script = textwrap.dedent(f"""
        import sys
        from maac_robot.deploy import supervise
        sleeper = {SLEEPER!r}
        sys.exit(supervise({{"sim": sleeper, "controller": sleeper}}, wait_for="controller"))
    """)
    # Set the inherited disposition both ways: pytest itself may run under an ignored SIGINT.
    disposition = signal.SIG_IGN if sigint_ignored_by_parent else signal.SIG_DFL
    sup = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    pids = []
    while len(pids) < 2:
        line = sup.stdout.readline()
        assert line, "supervisor ended before starting both children"
        if "pid" in line:
            pids.append(int(line.split("pid")[1].split()[0]))
    sup.send_signal(how)
    sup.wait(timeout=15)
    for pid in pids:
        assert _wait_dead(pid), f"child {pid} outlived the supervisor after {how!r}"


def test_port_in_use_is_one_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} .* in use"):
            _check_endpoint_free(f"tcp://127.0.0.1:{port}")
    _check_endpoint_free("ipc:///tmp/whatever")  # ipc endpoints are not probed
