"""`maac-robot train --connect`: training on real data collected over the wire protocol from the sim, on loopback.

Lockstep: D_env holds exactly the transitions the sim served (its own recording), and the same as an in-process
run of the same seed. A sim killed mid-episode and restarted: training pauses, the episode is cut as a truncation
(no half transition), and the counts stay consistent. A robot for another env is refused, naming both. A robot
that does not come back ends training with an error after a checkpoint, and `--resume --connect` finishes the
run. Real time: every transition stored is one tick the sim recorded, with the action it applied.

Every sim runs on 127.0.0.1, every wait is bounded (sim banners, the reconnect window, the training step budget).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml
from maac_robot.cli import main
from maac_robot.learn.config import config_from_dict
from maac_robot.learn.trainer import RunPaths, load_run, read_metrics, train
from maac_robot.runtime.recording import load_episodes
from sim_helpers import running_sim
from tiny_configs import tiny

PENDULUM = "InvertedPendulum-v5"
# the in-thread sim watches its process's resident memory, which here is the trainer's too
SIM_MEMORY = {"memory_headroom_mb": 4096}


def _config(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(tiny(**sections)))
    return path


def _d_env(run: Path) -> dict[str, np.ndarray]:
    """D_env of the run's checkpoint, rows in the order they were added (the buffer never wrapped here)."""
    buffer = load_run(run).d_env
    assert buffer is not None and buffer.total_added == len(buffer)
    return buffer.arrays()


def _served(directory: Path) -> dict[str, np.ndarray]:
    """A sim recording's transitions, episode after episode, as D_env stores them (float32)."""
    episodes = load_episodes(directory)
    cat = {key: np.concatenate([getattr(ep, attr) for ep in episodes]) for key, attr in
           (("state", "states"), ("action", "actions"), ("reward", "rewards"), ("next_state", "next_states"),
            ("terminated", "terminated"))}
    return {k: v.astype(np.float32) if v.dtype != bool else v for k, v in cat.items()}


def _assert_rows_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert len(got["reward"]) == len(want["reward"])
    for key in ("state", "action", "reward", "next_state", "terminated"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


class _SimProcess:
    """`maac-robot sim` as its own process (what a kill really kills), its log in a file, never waited on forever."""

    def __init__(self, tmp_path: Path, name: str, bind: str = "tcp://127.0.0.1:*", mode: str = "lockstep",
                 record: Path | None = None) -> None:
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"env": {"id": PENDULUM}, "sim": {"mode": mode}}))
        self.log = tmp_path / f"{name}.log"
        extra = ["--record", str(record)] if record is not None else []
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "maac_robot.cli", "sim", "--config", str(config),
                                          "--bind", bind, *extra], stdout=subprocess.PIPE, stderr=err, text=True,
                                         cwd=tmp_path)
        timer = threading.Timer(90, self.proc.kill)
        timer.start()
        banner = self.proc.stdout.readline()
        timer.cancel()
        if not banner.startswith("sim: serving"):
            self.proc.kill()
            raise AssertionError(f"sim {name} did not start: {banner!r} {self.log.read_text()[-2000:]}")
        self.endpoint = banner.rsplit(" on ", 1)[1].strip()

    def stop(self) -> None:
        """SIGTERM: the sim finishes its recording and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_lockstep_d_env_holds_exactly_what_the_sim_served(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = _config(tmp_path, train={"total_steps": 300, "eval_every": 150, "checkpoint_every": 100})
    run = tmp_path / "run"
    with running_sim(PENDULUM, mode="lockstep", record_dir=tmp_path / "served", **SIM_MEMORY) as server:
        rc = main(["train", "--config", str(config), "--out", str(run), "--connect", server.endpoint])
        session = server.session
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"real data from {PENDULUM} at {server.endpoint} (lockstep, dt 40.0 ms); evaluation in-process" in err

    d_env = _d_env(run)
    assert len(d_env["reward"]) == 300 and load_run(run).env_step == 300
    _assert_rows_equal(d_env, _served(tmp_path / "served"))

    rows = read_metrics(RunPaths(run).metrics)
    assert [r["env_step"] for r in rows] == [150, 300]
    link = rows[-1]["data_env"]
    assert link["kind"] == "robot link" and link["mode"] == "lockstep" and link["robot_session"] == session
    assert link["steps"] == 300 and link["inexact_steps"] == 0 and link["interruptions"] == 0
    assert all(r["eval_env"] == {"kind": "in-process", "env_id": PENDULUM} for r in rows)
    sessions = [json.loads(line) for line in RunPaths(run).sessions.read_text().splitlines()]
    assert sessions[0]["data_env"]["endpoint"] == server.endpoint

    # the lockstep sim served the episodes the in-process env gives for the same reset seeds: the same run
    local = train(config_from_dict(yaml.safe_load(config.read_text())), tmp_path / "local", progress=False)
    assert read_metrics(RunPaths(tmp_path / "local").metrics)[-1]["data_env"] == {"kind": "in-process",
                                                                                  "env_id": PENDULUM}
    _assert_rows_equal(d_env, local.d_env.arrays())


class _KillMidEpisode(gym.Wrapper):
    """Kills the sim process just before the first step at or after `at` that is past an episode's second step,
    and starts `restart` in a thread: the step then finds the robot gone."""

    def __init__(self, env: gym.Env, at: int, sim: _SimProcess, restart) -> None:
        super().__init__(env)
        self.at, self.sim, self.restart = at, sim, restart
        self.calls = self.episode_steps = 0
        self.killed: dict[str, int] = {}
        self.thread: threading.Thread | None = None

    def reset(self, **kwargs):
        self.episode_steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        if not self.killed and self.calls >= self.at and self.episode_steps >= 2:
            self.sim.kill()
            self.killed = {"calls": self.calls, "episode_steps": self.episode_steps}
            self.thread = threading.Thread(target=self.restart, daemon=True)
            self.thread.start()
        self.calls += 1
        out = self.env.step(action)
        self.episode_steps += 1
        return out


def test_a_killed_and_restarted_sim_pauses_training_and_cuts_the_episode_as_a_truncation(tmp_path: Path):
    from maac_robot.remote_env import connect

    first = _SimProcess(tmp_path, "first", record=tmp_path / "first")
    endpoint = first.endpoint
    second: list[_SimProcess] = []

    def restart() -> None:
        time.sleep(0.5)  # the trainer finds the robot gone and is reconnecting
        second.append(_SimProcess(tmp_path, "second", bind=endpoint, record=tmp_path / "second"))

    cfg = config_from_dict(tiny(train={"total_steps": 240, "eval_every": 120, "checkpoint_every": 120},
                                controller={"reconnect_s": 90.0}))
    wrapped: list[_KillMidEpisode] = []

    def factory(cfg):
        link = connect(endpoint, cfg.env.id, cfg.env.max_episode_steps, cfg.controller,
                       logger=logging.getLogger("maac_robot.learn.trainer.link"))  # into train.log, as the CLI does
        wrapped.append(_KillMidEpisode(link, at=150, sim=first, restart=restart))
        return wrapped[0]

    run = tmp_path / "run"
    try:
        trainer = train(cfg, run, progress=False, env_factory=factory)
        trainer.env.close()
        (env,) = wrapped
        env.thread.join(60)
        second[0].stop()  # its last episode is written when it stops
    finally:
        first.kill()
        for sim in second:
            sim.kill()

    cut = env.killed
    assert cut and cut["calls"] >= 150
    assert trainer.env_step == 240
    log = RunPaths(run).log.read_text()
    assert "the link to the robot dropped" in log and "ends here as a truncation" in log, log
    assert "reconnecting" in log and "link back after" in log, log
    link = read_metrics(RunPaths(run).metrics)[-1]["data_env"]
    assert link["interruptions"] == 1 and link["reconnects"] == 1 and link["inexact_steps"] == 0

    d_env = _d_env(run)
    before, after = _served(tmp_path / "first"), _served(tmp_path / "second")
    n_before, n_after = len(before["reward"]), len(after["reward"])
    n_cut = cut["episode_steps"]  # the killed sim never wrote the episode it was in: D_env kept its steps
    assert n_before + n_cut + n_after == 240 == len(d_env["reward"])
    _assert_rows_equal({k: v[:n_before] for k, v in d_env.items()}, before)
    _assert_rows_equal({k: v[n_before + n_cut:] for k, v in d_env.items()}, after)
    episode = {k: v[n_before:n_before + n_cut] for k, v in d_env.items()}
    # the cut episode: whole transitions chained step to step, none terminal (a truncation), then a fresh reset
    np.testing.assert_array_equal(episode["next_state"][:-1], episode["state"][1:])
    assert not episode["terminated"].any()
    assert not np.array_equal(episode["next_state"][-1], after["state"][0])


def test_a_robot_for_another_env_is_refused_naming_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = _config(tmp_path)
    run = tmp_path / "run"
    with running_sim("Hopper-v5", mode="lockstep") as server:
        rc = main(["train", "--config", str(config), "--out", str(run), "--connect", server.endpoint])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"robot and the run's config disagree: env 'Hopper-v5' vs the run's config '{PENDULUM}'" in err, err
    assert "state/action dims 12/3 vs 4/1" in err
    assert not run.exists()  # refused before anything was written

    assert main(["train", "--config", str(config), "--out", str(run), "--client-key", "x.key_secret"]) == 2
    assert "are for --connect" in capsys.readouterr().err


def test_a_robot_that_does_not_come_back_stops_after_a_checkpoint_and_the_run_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = _config(tmp_path, train={"total_steps": 300, "eval_every": 100, "checkpoint_every": 100},
                     controller={"reconnect_s": 1.0})
    run = tmp_path / "run"
    with running_sim(PENDULUM, mode="lockstep", **SIM_MEMORY) as server:
        first = server.endpoint

        def pull_the_plug() -> None:
            deadline = time.monotonic() + 120
            while server._episode < 14 and time.monotonic() < deadline:
                time.sleep(0.005)
            server.stop()

        unplug = threading.Thread(target=pull_the_plug, daemon=True)
        unplug.start()
        rc = main(["train", "--config", str(config), "--out", str(run), "--connect", first])
        unplug.join(10)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"lost the robot at {first}" in err and "did not come back within 1 s" in err, err
    assert "train: " in err and "reconnecting" in err  # the pause is said on the console too
    stopped = load_run(run)
    assert 0 < stopped.env_step < 300 and len(stopped.d_env) == stopped.env_step
    assert f"the checkpoint is at env step {stopped.env_step}; continue with: maac-robot train --resume {run} " \
           f"--connect {first}" in err
    assert "checkpoint saved to" in RunPaths(run).log.read_text()

    with running_sim(PENDULUM, mode="lockstep", record_dir=tmp_path / "served", **SIM_MEMORY) as server:
        rc = main(["train", "--resume", str(run), "--connect", server.endpoint])
        second = server.endpoint
    assert rc == 0, capsys.readouterr().err
    resumed = load_run(run)
    assert resumed.env_step == 300
    d_env = _d_env(run)
    assert len(d_env["reward"]) == 300
    _assert_rows_equal({k: v[stopped.env_step:] for k, v in d_env.items()}, _served(tmp_path / "served"))
    assert [r["env_step"] for r in read_metrics(RunPaths(run).metrics)] == [100, 200, 300]
    sessions = [json.loads(line) for line in RunPaths(run).sessions.read_text().splitlines()]
    assert [s["data_env"]["endpoint"] for s in sessions] == [first, second]
    assert sessions[1]["env_step"] == stopped.env_step


def test_realtime_stores_only_ticks_the_robot_made_with_the_action_it_applied(tmp_path: Path):
    from maac_robot.remote_env import connect

    sim = _SimProcess(tmp_path, "realtime", mode="realtime", record=tmp_path / "served")
    cfg = config_from_dict(tiny(train={"total_steps": 160, "eval_every": 160, "checkpoint_every": 160}))
    try:
        trainer = train(cfg, tmp_path / "run", progress=False, env_factory=lambda cfg: connect(
            sim.endpoint, cfg.env.id, cfg.env.max_episode_steps, cfg.controller))
        trainer.env.close()
        sim.stop()
    finally:
        sim.kill()
    link = read_metrics(RunPaths(tmp_path / "run").metrics)[-1]["data_env"]
    assert link["mode"] == "realtime" and link["interruptions"] == 0
    assert link["steps"] == 160 + link["inexact_steps"]
    d_env = _d_env(tmp_path / "run")
    served = _served(tmp_path / "served")
    ticks = {(s.tobytes(), n.tobytes()): i for i, (s, n) in enumerate(zip(served["state"], served["next_state"]))}
    found = [ticks.get((s.tobytes(), n.tobytes())) for s, n in zip(d_env["state"], d_env["next_state"])]
    assert None not in found, f"{found.count(None)} of 160 stored transitions were no tick of the sim"
    assert found == sorted(found)  # in the order the robot made them
    for key in ("action", "reward", "terminated"):
        np.testing.assert_array_equal(d_env[key], served[key][found], err_msg=key)


def test_train_connects_with_controls_curve_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from maac_robot.runtime.auth import create_keys

    create_keys(tmp_path / "keys", "server")
    create_keys(tmp_path / "keys" / "clients", "trainer")
    create_keys(tmp_path / "keys" / "other", "stranger")
    config = _config(tmp_path, train={"total_steps": 30, "eval_every": 30, "checkpoint_every": 30})
    keys = tmp_path / "keys"
    with running_sim(PENDULUM, mode="lockstep", server_key=keys / "server.key_secret",
                     authorized=keys / "clients", **SIM_MEMORY) as server:
        rc = main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--connect", server.endpoint,
                   "--client-key", str(keys / "clients" / "trainer.key_secret"),
                   "--server-public", str(keys / "server.key")])
        assert rc == 0, capsys.readouterr().err
        assert load_run(tmp_path / "run").env_step == 30
        rc = main(["train", "--config", str(config), "--out", str(tmp_path / "stranger"), "--connect",
                   server.endpoint, "--client-key", str(keys / "other" / "stranger.key_secret"),
                   "--server-public", str(keys / "server.key")])
    err = capsys.readouterr().err
    assert rc == 2 and "(--client-key) is not in the robot's authorized directory" in err, err
    assert not (tmp_path / "stranger").exists()
