"""The `up` supervisor: both children stop when either ends, on SIGINT/SIGTERM, or when it is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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


def test_demo_checks_its_port_before_training(tmp_path, monkeypatch, capsys):
    from maac_robot import cli

    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["demo", "--out", str(tmp_path / "run"), "--bind", f"tcp://127.0.0.1:{port}"]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err  # and the --bind it suggests exists:
    assert cli.build_parser().parse_args(["demo", "--bind", "tcp://127.0.0.1:6000"]).bind == "tcp://127.0.0.1:6000"
    assert not (tmp_path / "run").exists(), "demo trained before finding its port taken"


def test_demo_from_another_directory_reuses_an_up_to_date_export(tmp_path, monkeypatch, capsys):
    """`--config inverted_pendulum` resolves outside the repository; a rerun with nothing new does not re-export,
    one that trained further does; --bind reaches `up`."""
    import json

    from maac_robot import cli, commands, deploy
    from maac_robot.learn.trainer import load_checkpoint

    monkeypatch.chdir(tmp_path)
    exports, ups = [], []

    def fake_export(run_dir, out, plan_horizon=None):  # the real one is tests/test_export.py's; this one is fast
        step = int(load_checkpoint(run_dir / "checkpoints" / "latest.pt")["env_step"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"env_id": "InvertedPendulum-v5", "train_steps": step}))
        exports.append(step)
        return 0

    monkeypatch.setattr(commands, "export_from_cli", fake_export)
    monkeypatch.setattr(deploy, "up_from_cli", lambda **kw: ups.append(kw) or 0)
    small = [f"--set={s}" for s in ("train.initial_random_steps=40", "train.eval_every=50", "train.eval_episodes=1",
                                    "model.max_epochs=1", "agent.updates_per_step=1", "rollout.batch_size=50",
                                    "train.num_threads=1")]
    argv = ["demo", "--config", "inverted_pendulum", "--out", "runs/demo", "--bind", "tcp://127.0.0.1:0", *small]
    assert cli.main([*argv, "--steps", "50"]) == 0
    assert cli.main([*argv, "--steps", "50"]) == 0  # nothing new: the export is reused
    assert "already holds the export" in capsys.readouterr().out
    assert cli.main([*argv, "--steps", "60"]) == 0  # trained further: exported again
    assert exports == [50, 60] and len(ups) == 3
    assert {kw["bind"] for kw in ups} == {"tcp://127.0.0.1:0"} and ups[0]["artifacts"] == Path("artifacts/demo")
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "latest.pt").is_file()

    # the stop rule: once two evaluations in a row held --stop-return, training ends; a rerun writes nothing new
    exports.clear()
    held = ["demo", "--config", "inverted_pendulum", "--out", "runs/held", "--bind", "tcp://127.0.0.1:0", *small,
            "--steps", "400", "--stop-return", "1"]
    assert cli.main(held) == 0 and cli.main(held) == 0
    assert exports == [100], "stopped at the second evaluation (50, 100), and the rerun reused its export"
    assert "already holds the export" in capsys.readouterr().out
