"""The sim served over the robot protocol: determinism, safety, robustness, recording. Loopback only."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from maac_robot.envs import make_env
from maac_robot.runtime.protocol import (
    PROTOCOL_VERSION,
    Action,
    ErrorMsg,
    Hello,
    ObservationMsg,
    ProtocolError,
    RobotClient,
    Reset,
    RobotTimeout,
    decode,
    encode,
)
from maac_robot.runtime.recording import EpisodeRecorder, RecordingError, load_episode, load_episodes
from sim.server import ActionGate, SimError, SimServer
from sim_helpers import running_sim

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def raw_socket(endpoint: str) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)


def replies(sock: zmq.Socket, first_timeout_s: float = 2.0) -> list:
    """Every message the sim sent back: wait for the first, then collect whatever follows right behind it."""
    assert sock.poll(int(first_timeout_s * 1000)), "sim did not reply"
    out = [decode(sock.recv_multipart())[0]]
    while sock.poll(20):
        out.append(decode(sock.recv_multipart())[0])
    return out


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Hopper-v5"])
def test_lockstep_returns_equal_in_process_gymnasium_bit_for_bit(env_id):
    with running_sim(env_id, max_episode_steps=300) as server, RobotClient(server.endpoint, 2.0) as client:
        info = client.hello()
        env = make_env(env_id, max_episode_steps=300)
        assert (info.env_id, info.mode, info.state_dim, info.act_dim) == (
            env_id, "lockstep", env.observation_space.shape[0], env.action_space.shape[0])
        np.testing.assert_array_equal(info.act_low, env.action_space.low)
        rng = np.random.default_rng(0)
        for seed in (1, 2):
            obs = client.reset(seed=seed)
            state, _ = env.reset(seed=seed)
            assert obs.state.tobytes() == state.tobytes()
            protocol_return = gym_return = 0.0
            done = False
            while not done:
                action = rng.uniform(info.act_low, info.act_high)
                obs = client.step(action)
                state, reward, terminated, truncated, _ = env.step(action)
                assert obs.state.tobytes() == state.tobytes()
                assert (obs.reward, obs.terminated, obs.truncated) == (reward, terminated, truncated)
                assert not (obs.info["clipped"] or obs.info["rejected"] or obs.info["watchdog"])
                protocol_return += obs.reward
                gym_return += reward
                done = terminated or truncated
            assert protocol_return == gym_return == pytest.approx(obs.info["episode_return"], rel=1e-12)
        assert client.stats.dropped_observations == 0 and client.stats.errors == 0


def test_out_of_bounds_actions_are_clipped_and_reported():
    with running_sim() as server, RobotClient(server.endpoint, 2.0) as client:
        env = make_env("HalfCheetah-v5")
        client.reset(seed=0)
        env.reset(seed=0)
        action = np.array([3.0, -7.0, 0.5, 0.0, 1.0, -1.0])
        obs = client.step(action)
        expected, *_ = env.step(np.clip(action, -1, 1))
        assert obs.info["clipped"] and obs.info["clipped_actions"] == 1
        assert obs.state.tobytes() == expected.tobytes()
        assert not client.step(np.zeros(6)).info["clipped"]


@pytest.mark.parametrize("bad", [[np.nan] * 6, [np.inf, 0, 0, 0, 0, 0], [0.1] * 5, [[0.1] * 6] * 2],
                         ids=["nan", "inf", "short", "2d"])
def test_invalid_actions_get_an_error_reply_and_the_safe_action(bad):
    with running_sim() as server, RobotClient(server.endpoint, 2.0) as client:
        env = make_env("HalfCheetah-v5")
        client.reset(seed=0)
        env.reset(seed=0)
        obs = client.step(np.array(bad))
        expected, *_ = env.step(np.zeros(6))  # zero torque
        assert obs.info["rejected"] and obs.info["rejected_actions"] == 1
        assert client.stats.last_error.startswith("[bad_action]")
        assert obs.state.tobytes() == expected.tobytes()
        obs = client.step(np.full(6, 0.2))  # the episode goes on
        assert obs.info["rejected"] is None and obs.step == 2


def test_action_gate_safe_action_is_zero_moved_into_the_bounds():
    gate = ActionGate(np.array([0.5, -1.0]), np.array([1.0, 1.0]))
    np.testing.assert_array_equal(gate.safe_action, [0.5, 0.0])
    action, rejected, clipped = gate.check(np.array([2.0, 0.0], dtype=np.float32))
    assert rejected is None and clipped and action.dtype == np.float64
    np.testing.assert_array_equal(action, [1.0, 0.0])


def test_actions_outside_an_owned_episode_are_refused_with_a_code():
    with running_sim(max_episode_steps=2) as server, RobotClient(server.endpoint, 2.0) as client, \
            RobotClient(server.endpoint, 2.0) as intruder:
        with pytest.raises(ProtocolError) as err:
            client.step(np.zeros(6))
        assert err.value.code == "no_episode"
        client.reset(seed=0)
        with pytest.raises(ProtocolError) as err:
            intruder.step(np.zeros(6))
        assert err.value.code == "no_episode"
        client.step(np.zeros(6))
        assert client.step(np.zeros(6)).truncated
        with pytest.raises(ProtocolError) as err:
            client.step(np.zeros(6))
        assert err.value.code == "episode_over"


def test_a_failing_env_step_ends_the_episode_with_an_error_and_the_sim_keeps_serving(monkeypatch):
    with running_sim() as server, RobotClient(server.endpoint, 2.0) as client:
        client.reset(seed=0)
        real_step = server.env.step

        def broken(action):
            raise RuntimeError("simulated MuJoCo instability")

        monkeypatch.setattr(server.env, "step", broken)
        with pytest.raises(ProtocolError, match="MuJoCo instability") as err:
            client.step(np.zeros(6))
        assert err.value.code == "internal" and server.counters.internal_errors == 1
        monkeypatch.setattr(server.env, "step", real_step)
        with pytest.raises(ProtocolError) as err:
            client.step(np.zeros(6))
        assert err.value.code == "episode_over"
        client.reset(seed=0)
        assert client.step(np.zeros(6)).step == 1


def test_malformed_messages_get_error_replies_and_the_sim_keeps_serving():
    with running_sim(max_message_bytes=4096) as server, raw_socket(server.endpoint) as raw:
        header = json.loads(encode(Hello(seq=41, t=1.0))[0])
        action = encode(Action(seq=42, t=1.0), [np.zeros(6)])
        cases = {
            "garbage": ([b"\xde\xad\xbe\xef"], "malformed", None),
            "truncated array": ([action[0], action[1][:-3]], "malformed", 42),
            "missing array": ([action[0]], "malformed", 42),
            "unknown type": ([json.dumps({**header, "type": "teleport"}).encode()], "unknown_type", 41),
            "wrong version": ([json.dumps({**header, "v": 99}).encode()], "version", 41),
            "oversized": ([action[0], b"\x00" * 5000], "too_large", None),
            "robot-side type": (encode(ObservationMsg(seq=43, t=1.0, session="x", episode=0, step=0),
                                       [np.zeros(18)]), "unexpected", 43),
        }
        for name, (frames, code, ack) in cases.items():
            raw.send_multipart(frames)
            (reply,) = replies(raw)
            assert isinstance(reply, ErrorMsg) and reply.code == code, name
            assert reply.ack == ack, name
        raw.send_multipart([b"\x00" * 20_000])  # above the hard cap (4 x 4096): ZeroMQ drops the connection
        assert not raw.poll(300), "a message above ZMQ_MAXMSGSIZE must not be buffered and answered"
        with RobotClient(server.endpoint, 2.0) as client:
            assert client.hello().protocol_version == PROTOCOL_VERSION
            client.reset(seed=0)
            assert client.step(np.zeros(6)).step == 1
        assert server.counters.bad_messages == len(cases)


header_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.lists(
    st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)


def test_fuzzed_frames_at_a_live_server_then_a_normal_episode_runs():
    """Random bytes and corrupted real headers over loopback: every message is answered, nothing breaks."""
    valid = [encode(Hello(seq=1, t=1.0)), encode(Action(seq=2, t=1.0, obs_seq=1), [np.zeros(6)])]
    with running_sim() as server, raw_socket(server.endpoint) as raw:

        @settings(max_examples=150, deadline=None, database=None)
        @given(data=st.data())
        def throw(data):
            if data.draw(st.booleans()):
                frames = data.draw(st.lists(st.binary(max_size=200), min_size=1, max_size=10))
            else:
                frames = list(data.draw(st.sampled_from(valid)))
                header = json.loads(frames[0])
                for key in data.draw(st.lists(st.sampled_from([*header, "type", "extra"]), min_size=1, max_size=3)):
                    header[key] = data.draw(header_values | st.sampled_from(["reset", "action", "observation"]))
                frames[0] = json.dumps(header).encode()
                frames = frames[: data.draw(st.integers(1, len(frames)))]
            raw.send_multipart(frames)
            assert replies(raw)

        throw()
        with RobotClient(server.endpoint, 2.0) as client:
            client.hello()
            obs = client.reset(seed=0)
            for _ in range(20):
                obs = client.step(np.full(6, 0.3))
            assert obs.step == 20 and client.stats.errors == 0
        assert server.counters.bad_messages > 0 and server.counters.internal_errors == 0


@pytest.mark.parametrize("mode", ["lockstep", "realtime"])
def test_sim_survives_a_client_that_vanishes_mid_episode(mode):
    with running_sim(mode=mode, max_episode_steps=10, owner_timeout_s=0.3) as server:
        with RobotClient(server.endpoint, 2.0) as gone:
            gone.reset(seed=0)
            for _ in range(3):
                gone.step(np.zeros(6))
            gone.send_action(np.zeros(6))  # in flight when the client disappears
        with raw_socket(server.endpoint) as flaky:  # asks for a reset and leaves before the reply
            flaky.send_multipart(encode(Reset(seq=1, t=1.0, seed=5)))
        time.sleep(0.4)  # if the flaky reset arrived, its episode passes on after the owner timeout
        with RobotClient(server.endpoint, 2.0) as client:
            assert client.heartbeat() < 1.0
            obs = client.reset(seed=1)
            assert obs.step == 0
            while not obs.done:
                obs = client.step(np.full(6, 0.1))
            assert obs.truncated and obs.step == 10


def test_client_reconnects_after_the_sim_restarts():
    with running_sim() as first:
        endpoint = first.endpoint
        client = RobotClient(endpoint, timeout_s=0.3)
        client.reset(seed=0)
        client.step(np.zeros(6))
    try:
        with pytest.raises(RobotTimeout):
            client.step(np.zeros(6))
        assert client.stats.reconnects == 1
        with running_sim(bind=endpoint) as second:
            obs = client.reset(seed=0)
            assert obs.session == second.session != first.session
            assert client.step(np.zeros(6)).step == 1
    finally:
        client.close()


def test_realtime_watchdog_holds_then_applies_the_safe_action_until_commands_resume():
    # HalfCheetah: dt = 50 ms, watchdog 3 dt = 150 ms, never terminates
    with running_sim(mode="realtime") as server, RobotClient(server.endpoint, 2.0) as client:
        assert client.hello().mode == "realtime"
        client.reset(seed=0)
        first = client.step(np.full(6, 0.5))  # applied at the next tick
        assert not (first.info["held"] or first.info["watchdog"])
        time.sleep(0.4)  # ~8 ticks without commands: held, then safe
        obs = client.latest_observation(timeout_s=0.2)
        assert obs.info["watchdog"] and obs.action_seq is None
        assert obs.info["watchdog_ticks"] >= 1 and obs.info["missed_ticks"] > obs.info["watchdog_ticks"]
        assert client.stats.dropped_observations > 0  # the stale ticks were skipped, not queued
        resumed = client.step(np.full(6, -0.5))
        assert not (resumed.info["watchdog"] or resumed.info["held"])
        assert resumed.step > obs.step


def test_realtime_applies_only_the_freshest_action_and_counts_superseded_and_late():
    with running_sim(mode="realtime") as server, RobotClient(server.endpoint, 2.0) as client:
        old = client.reset(seed=0)
        tick = client.latest_observation(timeout_s=1.0)  # just after a tick: ~50 ms until the next
        client.send_action(np.full(6, 0.1))
        client.send_action(np.full(6, 0.2))
        newest = client.send_action(np.full(6, 0.3), obs_seq=old.seq)  # computed from a stale observation
        obs = client.latest_observation(timeout_s=1.0)
        assert obs.step == tick.step + 1 and obs.action_seq == newest
        assert obs.info["dropped_actions"] == 2 and obs.info["late"] and obs.info["late_actions"] == 1


def test_recorded_episodes_load_back_as_the_transitions_that_happened(tmp_path):
    with running_sim(max_episode_steps=15, record_dir=tmp_path) as server, \
            RobotClient(server.endpoint, 2.0) as client:
        observed = [client.reset(seed=0)]
        for t in range(15):
            observed.append(client.step(np.full(6, 2.0 if t == 3 else 0.25)))
        client.reset(seed=1)
        for _ in range(4):
            client.step(np.zeros(6))
        client.reset(seed=2)  # cuts episode 2 short
    full, cut = load_episodes(tmp_path)
    assert len(full) == 15 and len(cut) == 4
    np.testing.assert_array_equal(full.states, np.stack([o.state for o in observed[:-1]]))
    np.testing.assert_array_equal(full.next_states, np.stack([o.state for o in observed[1:]]))
    np.testing.assert_array_equal(full.rewards, [o.reward for o in observed[1:]])
    np.testing.assert_array_equal(full.actions[3], np.ones(6))  # the clipped action that was applied
    assert full.flags["clipped"].tolist() == [t == 3 for t in range(15)]
    assert full.truncated.tolist() == [False] * 14 + [True] and not full.terminated.any()
    assert full.meta["complete"] and full.meta["env_id"] == "HalfCheetah-v5" and full.meta["dt"] == 0.05
    np.testing.assert_array_equal(cut.states[1:], cut.next_states[:-1])
    assert cut.truncated[-1] and not cut.meta["complete"]


def test_broken_recordings_are_refused_with_the_file_and_the_problem(tmp_path):
    with pytest.raises(RecordingError, match="not found"):
        load_episode(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(RecordingError, match="junk.npz: not a readable"):
        load_episode(tmp_path / "junk.npz")
    good = dict(states=np.zeros((3, 2)), actions=np.zeros((3, 1)), rewards=np.zeros(3), next_states=np.zeros((3, 2)),
                terminated=np.zeros(3, bool), truncated=np.ones(3, bool), meta=np.array("{}"))
    np.savez(tmp_path / "no_rewards.npz", **{k: v for k, v in good.items() if k != "rewards"})
    with pytest.raises(RecordingError, match=r"missing arrays \['rewards'\]"):
        load_episode(tmp_path / "no_rewards.npz")
    np.savez(tmp_path / "ragged.npz", **{**good, "actions": np.zeros((2, 1))})
    with pytest.raises(RecordingError, match="actions has shape"):
        load_episode(tmp_path / "ragged.npz")
    with pytest.raises(RecordingError, match="not a directory"):
        EpisodeRecorder(tmp_path / "junk.npz", {})
    recorder = EpisodeRecorder(tmp_path / "rec", {})
    recorder.add(np.zeros(2), np.zeros(1), 0.0, np.zeros(2), False, False, {"clipped": False})
    with pytest.raises(RecordingError, match="flag names changed"):
        recorder.add(np.zeros(2), np.zeros(1), 0.0, np.zeros(2), False, False, {"held": True})


def test_ipc_socket_file_left_by_a_dead_sim_is_replaced_but_a_live_one_is_not(tmp_path):
    endpoint = f"ipc://{tmp_path}/sim.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "sim.sock"))  # a socket file whose listener is gone
    stale.close()
    with running_sim(bind=endpoint) as server:
        assert server.endpoint == endpoint
        with pytest.raises(SimError, match="already serving"):
            SimServer("HalfCheetah-v5", bind=endpoint)


def test_an_ipc_bind_never_deletes_a_file_that_is_not_a_socket(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(SimError, match="not a socket"):
        SimServer("HalfCheetah-v5", bind=f"ipc://{precious}")
    assert precious.read_text() == "keep me"


def test_bad_bind_and_missing_video_backend_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(SimError, match="must start with"):
        SimServer("HalfCheetah-v5", bind="localhost:5555")
    with running_sim() as server, pytest.raises(SimError, match="cannot bind"):
        SimServer("HalfCheetah-v5", bind=server.endpoint)
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))  # the check sets it; undone after the test
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(SimError, match="imageio-ffmpeg"):
        SimServer("HalfCheetah-v5", bind=f"ipc://{tmp_path}/s.sock", render_path=tmp_path / "v.mp4")


def _start_cli_sim(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    config = tmp_path / "pendulum.yaml"
    config.write_text("env:\n  id: InvertedPendulum-v5\nsim:\n  mode: lockstep\n")
    proc = subprocess.Popen([sys.executable, "-m", "maac_robot.cli", "sim", "--config", str(config),
                             "--bind", f"ipc://{tmp_path}/cli.sock", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    timer = threading.Timer(30, proc.kill)  # never wait forever for the banner
    timer.start()
    banner = proc.stdout.readline()
    timer.cancel()
    assert banner.startswith("sim: serving InvertedPendulum-v5 (lockstep"), proc.stderr.read() if not banner else banner
    return proc, banner.rsplit(" on ", 1)[1].strip()


def test_cli_sim_health_probe_and_sigterm(tmp_path):
    proc, endpoint = _start_cli_sim(tmp_path, "--record", str(tmp_path / "rec"))
    try:
        probe = subprocess.run([sys.executable, "-m", "sim.health", endpoint, "--timeout", "2"],
                               capture_output=True, text=True, timeout=30, cwd=REPO)
        assert probe.returncode == 0 and "healthy" in probe.stdout, probe.stderr
        with RobotClient(endpoint, 2.0) as client:
            client.reset(seed=0)
            for _ in range(5):
                client.step(np.zeros(1))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    (episode,) = load_episodes(tmp_path / "rec")  # the interrupted episode was saved as truncated
    assert len(episode) == 5 and episode.truncated[-1] and not episode.meta["complete"]
    dead = subprocess.run([sys.executable, "-m", "sim.health", endpoint, "--timeout", "0.3"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert dead.returncode == 1 and "unhealthy" in dead.stderr


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None, reason="needs maac-robot[render]")
def test_render_writes_an_mp4_of_the_served_steps(tmp_path):
    video = tmp_path / "episode.mp4"
    proc, endpoint = _start_cli_sim(tmp_path, "--render", str(video))
    try:
        with RobotClient(endpoint, 10.0) as client:
            client.reset(seed=0)
            for _ in range(3):
                client.step(np.zeros(1))
        proc.send_signal(signal.SIGTERM)  # shutdown over the wire needs the admin key; a signal stops it cleanly
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
    import imageio.v2 as imageio

    with imageio.get_reader(video, format="FFMPEG") as reader:
        frames = list(reader.iter_data())  # list(reader) would pre-size by len(reader), which is inf
    assert len(frames) == 3 and frames[0].ndim == 3 and frames[0].std() > 0
