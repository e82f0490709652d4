"""Codec and client behaviour of maac_robot.runtime.protocol, without a sim (fake robots are raw ZeroMQ sockets)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from maac_robot.runtime.protocol import (
    MAX_FRAMES,
    PROTOCOL_VERSION,
    Action,
    ErrorMsg,
    Goodbye,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    ObservationMsg,
    ProtocolError,
    Reset,
    RobotClient,
    RobotTimeout,
    Shutdown,
    decode,
    encode,
)

seqs = st.integers(0, 2**63 - 1)
times = st.floats(0, 4e9, allow_nan=False)
acks = st.none() | seqs
text = st.text(max_size=30)
vectors = hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.dtype(">f8"), np.dtype(">f4")]),
                     shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=40))
json_scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False) | text

messages = st.one_of(
    st.builds(Hello, seq=seqs, t=times, ack=acks, client=text),
    st.builds(Reset, seq=seqs, t=times, seed=st.none() | seqs, token=st.none() | st.text(min_size=16, max_size=64)),
    st.builds(Goodbye, seq=seqs, t=times),
    st.builds(Action, seq=seqs, t=times, obs_seq=st.none() | seqs),
    st.builds(Heartbeat, seq=seqs, t=times),
    st.builds(Shutdown, seq=seqs, t=times, ack=acks),
    st.builds(HelloReply, seq=seqs, t=times, ack=acks, env_id=text, state_dim=st.integers(1, 200),
              act_dim=st.integers(1, 30), dt=st.floats(1e-4, 1), mode=st.sampled_from(["lockstep", "realtime"]),
              watchdog_s=st.floats(1e-4, 10), owner_timeout_s=st.floats(1e-4, 10), max_message_bytes=st.integers(1, 2**20), session=text),
    st.builds(ObservationMsg, seq=seqs, t=times, ack=acks, session=text, episode=st.integers(0, 10**6),
              step=st.integers(0, 10**6), action_seq=st.none() | seqs, reward=st.floats(),
              terminated=st.booleans(), truncated=st.booleans(),
              info=st.dictionaries(text, json_scalars | st.dictionaries(text, json_scalars, max_size=3), max_size=6)),
    st.builds(ErrorMsg, seq=seqs, t=times, ack=acks, code=st.text(max_size=40), message=st.text(max_size=200)),
    st.builds(HeartbeatReply, seq=seqs, t=times, ack=acks, session=text, mode=st.just("realtime"), env_id=text,
              episode=st.integers(0, 99), step=st.integers(0, 99), running=st.booleans(), uptime_s=times),
)


def _same(a: object, b: object) -> bool:
    """Equality that treats NaN as equal to NaN (a NaN reward must survive the round trip)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (np.isnan(a) and np.isnan(b))
    return a == b


@settings(max_examples=300, deadline=None)
@given(msg=messages, data=st.data())
def test_round_trip_preserves_every_field_and_array_bit(msg, data):
    arrays = [data.draw(vectors) for _ in range(msg.NUM_ARRAYS)]
    frames = encode(msg, arrays)
    assert all(isinstance(f, bytes) for f in frames)
    decoded, out = decode(frames, max_bytes=1 << 20)
    assert type(decoded) is type(msg)
    for name in type(msg).model_fields:
        if name != "arrays":
            assert _same(getattr(decoded, name), getattr(msg, name)), name
    assert len(out) == len(arrays)
    for sent, got in zip(arrays, out):
        assert got.dtype.str in ("<f4", "<f8") and got.shape == sent.shape
        assert got.astype(sent.dtype.newbyteorder("=")).tobytes() == sent.astype(sent.dtype.newbyteorder("=")).tobytes()


def _decode_never_raises_anything_but_protocol_error(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError as err:
        assert err.code in ("malformed", "version", "too_large", "unknown_type")


@settings(max_examples=400, deadline=None)
@given(frames=st.lists(st.binary(max_size=300), min_size=0, max_size=MAX_FRAMES + 2))
def test_garbage_bytes_raise_only_protocol_error(frames):
    _decode_never_raises_anything_but_protocol_error(frames)


header_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(text, inner, max_size=3), max_leaves=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages, data=st.data())
def test_mutated_valid_headers_raise_only_protocol_error(msg, data):
    """Start from a valid message and corrupt its header fields or array frames: only ProtocolError may escape."""
    arrays = [data.draw(vectors) for _ in range(msg.NUM_ARRAYS)]
    frames = encode(msg, arrays)
    header = json.loads(frames[0])
    for key in data.draw(st.lists(st.sampled_from([*header, "extra"]), max_size=3)):
        header[key] = data.draw(header_values)
    frames[0] = json.dumps(header).encode()
    cut = data.draw(st.integers(0, len(frames)))
    frames = frames[:cut] if cut else frames
    if len(frames) > 1 and data.draw(st.booleans()):
        frames[-1] = frames[-1][: data.draw(st.integers(0, len(frames[-1])))]
    _decode_never_raises_anything_but_protocol_error(frames)


def test_specific_malformations_get_specific_codes():
    good = encode(Action(seq=7, t=1.0), [np.zeros(3)])
    with pytest.raises(ProtocolError) as err:
        decode([good[0], good[1][:-8]])
    assert err.value.code == "malformed" and err.value.seq == 7 and "24 bytes" in str(err.value)
    with pytest.raises(ProtocolError) as err:
        decode([good[0]])  # array frame missing
    assert err.value.seq == 7
    header = json.loads(good[0])
    with pytest.raises(ProtocolError) as err:
        decode([json.dumps({**header, "v": PROTOCOL_VERSION + 1}).encode(), good[1]])
    assert err.value.code == "version" and err.value.seq == 7 and str(PROTOCOL_VERSION + 1) in str(err.value)
    with pytest.raises(ProtocolError) as err:
        decode([json.dumps({**header, "type": "teleport"}).encode(), good[1]])
    assert err.value.code == "unknown_type"
    with pytest.raises(ProtocolError) as err:
        decode(good, max_bytes=len(good[0]) + 10)
    assert err.value.code == "too_large"
    with pytest.raises(ProtocolError) as err:
        decode([good[0]] * (MAX_FRAMES + 1))
    assert err.value.code == "too_large"
    with pytest.raises(ProtocolError, match="bytes-like"):
        decode([object()])


def test_encode_refuses_what_the_wire_cannot_carry():
    with pytest.raises(ProtocolError, match="float32 or float64"):
        encode(Action(seq=1, t=0.0), [np.zeros(3, dtype=np.int64)])
    with pytest.raises(ProtocolError, match="carries 1 array"):
        encode(Action(seq=1, t=0.0), [])
    with pytest.raises(ProtocolError, match="dims"):
        encode(Action(seq=1, t=0.0), [np.zeros((1,) * 5)])


def test_arrays_are_little_endian_on_the_wire_whatever_the_input_byte_order():
    frames = encode(Action(seq=1, t=0.0), [np.array([1.5, -2.0], dtype=">f8")])
    assert frames[1] == np.array([1.5, -2.0], dtype="<f8").tobytes()
    assert json.loads(frames[0])["arrays"] == [{"dtype": "<f8", "shape": [2]}]


# ---- client against fake robots (raw ROUTER sockets) ----
@pytest.fixture
def fake_robot(tmp_path):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/robot.sock"
    sock.bind(endpoint)
    yield endpoint, sock
    sock.close(linger=0)


def _recv(sock: zmq.Socket, timeout_s: float = 2.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), "fake robot received nothing"
    return sock.recv_multipart()


def _obs(seq: int, session: str = "s1", action_seq: int | None = None) -> list[bytes]:
    return encode(ObservationMsg(seq=seq, t=time.time(), session=session, episode=1, step=seq,
                                 action_seq=action_seq), [np.full(4, float(seq))])


def test_latest_observation_drains_keeps_newest_and_counts_dropped(fake_robot):
    endpoint, robot = fake_robot
    with RobotClient(endpoint, timeout_s=1.0) as client:
        client.send_action(np.zeros(2))  # the robot learns the client's identity from its first message
        peer = _recv(robot)[0]
        for seq in range(1, 6):
            robot.send_multipart([peer, *_obs(seq)])
        time.sleep(0.05)
        obs = client.latest_observation(timeout_s=0.5)
        assert obs is not None and obs.seq == 5 and obs.state[0] == 5.0
        assert client.stats.dropped_observations == 4
        robot.send_multipart([peer, *_obs(3)])  # older than one already returned: never handed out
        assert client.latest_observation(timeout_s=0.1) is None
        assert client.stats.dropped_observations == 5
        robot.send_multipart([peer, *_obs(1, session="restarted")])  # a restarted robot numbers from scratch
        assert client.latest_observation(timeout_s=0.5).session == "restarted"


def test_client_skips_malformed_replies_and_matches_by_ack(fake_robot):
    endpoint, robot = fake_robot
    with RobotClient(endpoint, timeout_s=1.0) as client:
        sent = encode(Heartbeat(seq=client._next_seq(), t=time.time()))  # what heartbeat() sends first
        client._send_frames(sent)
        peer, *frames = _recv(robot)
        seq = decode(frames)[0].seq
        robot.send_multipart([peer, b"\x00garbage"])
        robot.send_multipart([peer, *encode(HeartbeatReply(seq=1, t=time.time(), ack=seq + 100, session="s",
                                                           mode="lockstep", env_id="E", episode=0, step=0,
                                                           running=False, uptime_s=1.0))])
        robot.send_multipart([peer, *encode(HeartbeatReply(seq=2, t=time.time(), ack=seq, session="s",
                                                           mode="lockstep", env_id="E", episode=0, step=0,
                                                           running=False, uptime_s=1.0))])
        reply, _ = client._exchange(sent, seq, lambda m: isinstance(m, HeartbeatReply) and m.ack == seq,
                                    what="heartbeat")
        assert reply.seq == 2
        assert client.stats.malformed == 1 and client.stats.unmatched_replies == 1


def test_error_reply_to_a_request_raises_with_the_robots_code(fake_robot):
    endpoint, robot = fake_robot
    with RobotClient(endpoint, timeout_s=1.0) as client:
        sent = encode(Hello(seq=client._next_seq(), t=time.time()))
        client._send_frames(sent)
        peer, *frames = _recv(robot)
        seq = decode(frames)[0].seq
        robot.send_multipart([peer, *encode(ErrorMsg(seq=1, t=time.time(), ack=seq,
                                                     code="version", message="robot speaks 9"))])
        with pytest.raises(ProtocolError, match="robot speaks 9") as err:
            client._exchange(sent, seq, lambda m: isinstance(m, HelloReply) and m.ack == seq, what="hello")
        assert err.value.code == "version"


def test_no_robot_means_timeout_and_a_fresh_socket_never_a_hang(tmp_path):
    with RobotClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.2) as client:
        start = time.monotonic()
        with pytest.raises(RobotTimeout, match="heartbeat"):
            client.heartbeat()
        with pytest.raises(RobotTimeout):
            client.reset(seed=0)
        assert time.monotonic() - start < 1.5
        assert client.stats.timeouts == 2 and client.stats.reconnects == 2
        assert client.latest_observation(timeout_s=0.05) is None


def test_bad_endpoint_and_timeout_are_user_errors():
    with pytest.raises(ProtocolError, match="must start with"):
        RobotClient("127.0.0.1:5555")
    with pytest.raises(ProtocolError, match="timeout_s"):
        RobotClient("tcp://127.0.0.1:5555", timeout_s=0)


def test_protocol_module_stays_light_to_import():
    """The controller imports it on a robot computer without torch or gymnasium."""
    code = ("import sys, maac_robot.runtime.protocol; "
            "print(sorted(m for m in ('torch', 'gymnasium', 'mujoco') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
