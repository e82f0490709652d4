"""The robot protocol: the only contract between the controller and a robot (or the sim).

Light on purpose (numpy, pyzmq, pydantic; no torch, no gymnasium): a robot computer imports it.

Design decisions, and why
-------------------------
Sockets. The robot side (sim or a real driver) *binds* a ZeroMQ ROUTER socket; a controller
*connects* a DEALER. Neither is REQ/REP, whose strict send/recv alternation wedges forever when
one message is lost. ROUTER knows each peer by routing id and silently drops replies to peers that
vanished, so a dead controller never blocks the robot; the DEALER can send and receive in any
order, so the client can drain stale observations. Every receive on both sides goes through a
poller with a timeout (never a busy-poll: on 2 shared cores spinning raises p99 tenfold).

Routing ids. libzmq numbers peers that bring no routing id from a counter seeded by libc's
``rand()``, identical in every process, and aborts the whole process when a generated id is
already held by a peer that chose it. So the client always sends its own random 16-byte id
(first byte non-zero: ids starting with a zero byte are libzmq's), a peer repeating an id that is
taken is ignored by libzmq (no handover), and the robot side seeds ``rand()`` from the OS before it
creates its socket (``seed_routing_ids``) so the ids it generates for id-less peers cannot be guessed.

Frames. A message is a multipart frame list ``[header, array_0, array_1, ...]``. The header is
the JSON of a pydantic model: protocol version ``v``, ``type``, the sender's sequence number
``seq``, the sender's wall clock ``t`` (``time.time()`` at send), ``ack`` (the ``seq`` of the
message it answers, if any) and ``arrays``, the dtype and shape of each following frame. Arrays
travel as raw little-endian float32/float64 bytes (no JSON lists, no pickle): decoding is a
``np.frombuffer`` view, and the dtype/shape/byte count in the header are checked against the
frame, so a truncated frame is an error, never a misread.

Messages. Controller -> robot: ``hello`` (handshake), ``reset`` (optional seed and the client's
``token``), ``action``, ``heartbeat``, ``goodbye`` (the client gives up its episode; no reply),
``shutdown``. Robot -> controller: ``hello_reply`` (env id, state/action dims, action bounds as
arrays, dt, mode, watchdog, ownership timeout, limits, session, and an optional ``metadata`` object:
a perturbed sim puts its ``perturbation`` there), ``observation``, ``error`` (``code``
from ``ERROR_CODES``, ``ack`` = the offending message's seq when it could be read),
``heartbeat_reply`` (status), ``shutdown`` (ack).

Episode ownership. The peer whose ``reset`` started the episode owns it: only it may act, reset or
end it. Another peer's ``reset`` is refused with ``busy`` while the owner is alive; ownership passes
when the owner says ``goodbye`` or has sent nothing for ``owner_timeout_s`` (announced in
``hello_reply``; by then the real-time watchdog has long been applying the safe action). A client
that reopened its socket (a new routing id) proves it is the same owner with the random ``token``
it sent with its first reset, which the robot never shows anyone. ``shutdown`` over the wire is
refused (``forbidden``) unless the robot was started with an admin key and the peer proved it.

Limits. A message (all frames) may carry at most ``max_message_bytes`` (default 64 KiB; an Ant
state is 840 B) and at most ``MAX_FRAMES`` frames; larger ones get a ``too_large`` error reply.
Both sides read frame by frame (``MessageReader``), keep nothing of a message past the limit and
never copy it. The robot additionally sets ZMQ_MAXMSGSIZE to 4x the limit, where ZeroMQ drops the
connection instead of buffering the frame. ZeroMQ holds a multipart message until its last frame
arrives, out of the application's sight; the sim therefore watches its own resident memory and,
past a cap, drops every connection (controllers reconnect by themselves).

Lost messages. Requests (hello, reset, heartbeat, lockstep actions) are resent with the *same*
seq every ``retry_s`` until ``timeout_s``; the robot answers a repeated reset or lockstep action
from its owner with the reply it already sent, so a retry never steps the robot twice. In real
time nothing is retried: the controller sends each action several times within its period (same
seq, applied once; ``resend_action``) so a lost copy rarely costs a tick, and when an observation
does not come it plans from the ensemble's prediction of the state instead of stalling.

Versions. Every header carries ``v``; a message from another protocol version is answered with a
``version`` error naming both versions (the client sees it at ``hello()``), never half-parsed.
``hello_reply``'s ``metadata`` came later within version 2: it is left out when empty, so a peer that
predates it still reads every robot with nothing to add (only a perturbed sim's reply is new to it).

Sequence numbers and timestamps, both ways. Each side numbers its own messages. Replies carry
``ack``; an observation also carries ``action_seq`` (the action message it is the result of), the
robot's ``session`` (random per robot process) and ``episode``/``step``. With them the client
matches lockstep replies, drops observations older than one it has already returned (counting
them), and notices a robot restart (new session). An action carries ``obs_seq``, the observation
it was computed from, so the robot can count late actions (computed from a stale observation).

Freshness over completeness. Control wants the newest observation and the newest action, never a
queue. ZMQ_CONFLATE does not work with multipart messages, so both sides drain instead: the client
(``latest_observation``) reads everything pending and keeps the newest observation; the real-time
robot reads everything pending before a tick and applies only the newest valid action. What is
skipped is counted (``ClientStats.dropped_observations``, observation ``info["dropped_actions"]``).

Modes. ``lockstep``: each action advances exactly one control period and is answered with one
observation; deterministic given the reset seed (for evaluation and tests). Sim time does not pass
between actions, so the watchdog cannot fire in lockstep. ``realtime``: after a reset the robot
ticks on the wall clock every ``dt``; before each tick it applies the freshest valid action that
arrived since the previous tick, otherwise it holds the previous action (``info["held"]``,
``missed_ticks`` counted), and once no valid action has arrived for ``watchdog_s`` it applies the
safe action until commands resume (``info["watchdog"]``). Every tick publishes an observation.

Safety (both modes). Out-of-bounds actions are clipped (``info["clipped"]``); NaN/inf or
wrong-length actions get a ``bad_action`` error reply and the safe action (zero torque, clipped
into the bounds) is applied instead (``info["rejected"]`` names why). Malformed input of any kind
gets an error reply (codes in ``ERROR_CODES``) and the robot keeps serving.

Observation ``info`` (what the robot chooses to share; the sim shares):
``clipped`` (bool), ``rejected`` (None or why), ``watchdog`` (safe action applied because commands
stopped), ``held`` (previous action re-applied, real-time), ``late`` (the applied action was computed
from an older observation); cumulative counters ``clipped_actions``, ``rejected_actions``,
``late_actions``, ``dropped_actions``, ``missed_ticks``, ``watchdog_ticks``, ``overruns``,
``bad_messages``, ``internal_errors``; ``sim_step_s`` (the robot's own step time, so a client can
separate transport from physics); ``episode_return`` (robot-side sum of rewards, which stays right
when a real-time client skipped stale observations); ``env`` (the env's scalar info). A perturbed sim
(``sim.perturb``) adds ``perturbation`` to each episode's first observation (the values drawn for
that episode) and, when it pushes, ``pushed`` to every observation.

Heartbeat. ``heartbeat`` is answered at once in both modes, mid-episode too, with a small status;
``python -m sim.health tcp://host:port`` exits 0/1 on it (a docker health check).

Reconnects. Client sockets reconnect after 20 ms, backing off to 1 s. On a timeout the client closes its
socket and opens a fresh one (a new routing id, and none of the stale requests queued while the
robot was down are delivered later), then raises ``RobotTimeout``; after a robot restart the next
``reset()`` simply works, and after a transient outage the same client's ``reset`` reclaims its
episode with its token.

Authentication. With CURVE keys (``maac_robot.runtime.auth``) the robot admits only authorised client
keys; an unauthenticated peer fails the handshake inside libzmq and gets nothing.

Endpoints: ``tcp://127.0.0.1:5555`` (default, loopback only), ``ipc:///path`` or ``inproc://``.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from maac_robot.runtime.auth import ClientCurve
from maac_robot.runtime.errors import UserError

PROTOCOL_VERSION = 2
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 16
MAX_FRAMES = 8
MAX_ARRAY_DIMS = 4
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
# dtype strings allowed on the wire; always little-endian whatever the host
WIRE_DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8")}

# error codes a robot may reply with
ERROR_CODES = (
    "malformed",  # not a decodable message (bad JSON, schema, array frames)
    "version",  # another protocol version
    "too_large",  # more than max_message_bytes or MAX_FRAMES
    "unknown_type",  # a header type this protocol does not define
    "unexpected",  # a valid message the robot does not accept (e.g. an observation)
    "bad_action",  # NaN/inf or wrong length: the safe action was applied instead
    "no_episode",  # an action before reset (or from a peer that does not own the episode)
    "busy",  # a reset while another live controller owns the episode
    "forbidden",  # shutdown from a peer without the admin key
    "episode_over",  # an action after terminated/truncated: reset first
    "stale",  # an action whose seq is not newer than one already received
    "internal",  # a robot-side failure; the episode was ended, the robot keeps serving
)
# sequence numbers fit a signed 64-bit integer on every platform; times are wall-clock seconds
Seq = Annotated[int, Field(ge=0, lt=2**63)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class ProtocolError(UserError):
    """A message that violates the protocol, or an error reply from the robot; `code` says which."""

    def __init__(self, message: str, code: str = "malformed", seq: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        # seq of the offending message when it could still be read, so an error reply can ack it
        self.seq = seq


class RobotTimeout(UserError, TimeoutError):
    """No reply within the timeout: the robot is down, unreachable, or not running this protocol."""


class ArraySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dtype: Literal["<f4", "<f8"]
    shape: tuple[Annotated[int, Field(ge=0, le=1 << 24)], ...] = Field(max_length=MAX_ARRAY_DIMS)


class _Message(BaseModel):
    """Header fields common to every message; subclasses add a `type` literal and their fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")
    # number of array frames that must follow the header
    NUM_ARRAYS: ClassVar[int] = 0

    v: Literal[PROTOCOL_VERSION] = PROTOCOL_VERSION  # type: ignore[valid-type]  # a constant, on purpose
    seq: Seq
    t: Seconds
    ack: Seq | None = None
    arrays: tuple[ArraySpec, ...] = Field(default=(), max_length=MAX_FRAMES - 1)


# ---- controller -> robot ----
class Hello(_Message):
    type: Literal["hello"] = "hello"
    client: str = Field(default="", max_length=200)


class Reset(_Message):
    """`token`: the client's secret, so the same client can reclaim its episode from a new socket."""

    type: Literal["reset"] = "reset"
    seed: Seq | None = None
    token: str | None = Field(default=None, min_length=16, max_length=64)


class Action(_Message):
    """Array 0: the action vector. `obs_seq`: the observation it was computed from."""

    NUM_ARRAYS: ClassVar[int] = 1
    type: Literal["action"] = "action"
    obs_seq: Seq | None = None


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"


class Goodbye(_Message):
    """The client gives up the episode it owns (no reply): another controller may reset at once.

    `token`: as in `Reset`, so a client that reopened its socket can still release its episode."""

    type: Literal["goodbye"] = "goodbye"
    token: str | None = Field(default=None, min_length=16, max_length=64)


class Shutdown(_Message):
    """Ask the robot process to stop serving; the robot answers with a Shutdown whose ack is set."""

    type: Literal["shutdown"] = "shutdown"


# ---- robot -> controller ----
class HelloReply(_Message):
    """The robot describes itself. Arrays: act_low, act_high."""

    NUM_ARRAYS: ClassVar[int] = 2
    type: Literal["hello_reply"] = "hello_reply"
    env_id: str = Field(max_length=200)
    state_dim: int = Field(gt=0)
    act_dim: int = Field(gt=0)
    dt: float = Field(gt=0, allow_inf_nan=False)
    mode: Literal["lockstep", "realtime"]
    watchdog_s: float = Field(gt=0, allow_inf_nan=False)
    owner_timeout_s: float = Field(gt=0, allow_inf_nan=False)
    max_message_bytes: int = Field(gt=0)
    session: str = Field(max_length=64)
    # what else the robot states about itself (a perturbed sim: `perturbation`); left out of the JSON when
    # empty, so a robot with nothing to add sends exactly what version-2 peers from before this field read
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=32, exclude_if=lambda value: not value)


class ObservationMsg(_Message):
    """Array 0: the state. `info` holds the safety flags and counters, and the env's scalar info."""

    NUM_ARRAYS: ClassVar[int] = 1
    type: Literal["observation"] = "observation"
    session: str = Field(max_length=64)
    episode: int = Field(ge=0)
    step: int = Field(ge=0)
    action_seq: Seq | None = None
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = Field(default_factory=dict)


class ErrorMsg(_Message):
    type: Literal["error"] = "error"
    code: str = Field(max_length=40)
    message: str = Field(max_length=2000)


class HeartbeatReply(_Message):
    type: Literal["heartbeat_reply"] = "heartbeat_reply"
    session: str = Field(max_length=64)
    mode: Literal["lockstep", "realtime"]
    env_id: str = Field(max_length=200)
    episode: int = Field(ge=0)
    step: int = Field(ge=0)
    running: bool
    uptime_s: Seconds
    counters: dict[str, int] = Field(default_factory=dict, max_length=64)  # the robot's safety counters


Message = Annotated[
    Hello | Reset | Action | Heartbeat | Goodbye | Shutdown | HelloReply | ObservationMsg | ErrorMsg | HeartbeatReply,
    Field(discriminator="type"),
]
_MESSAGE = TypeAdapter(Message)
MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (Hello, Reset, Action, Heartbeat, Goodbye, Shutdown, HelloReply, ObservationMsg, ErrorMsg, HeartbeatReply)
}


def encode(msg: _Message, arrays: Sequence[np.ndarray] = ()) -> list[bytes]:
    """Frames for `msg` followed by `arrays` (float32/float64, sent as little-endian raw bytes).

    The header's `arrays` field is written from the arrays themselves (whatever `msg.arrays` says),
    so a header can never disagree with its frames.
    """
    if len(arrays) != msg.NUM_ARRAYS:
        raise ProtocolError(f"{msg.type} carries {msg.NUM_ARRAYS} array(s), got {len(arrays)}")
    specs = []
    payload = []
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
            raise ProtocolError(f"arrays must be float32 or float64, got {a.dtype}")
        if a.ndim > MAX_ARRAY_DIMS:
            raise ProtocolError(f"arrays may have at most {MAX_ARRAY_DIMS} dims, got shape {a.shape}")
        wire = a.dtype.newbyteorder("<")
        specs.append(f'{{"dtype":"{wire.str}","shape":[{",".join(map(str, a.shape))}]}}')
        payload.append(np.ascontiguousarray(a, dtype=wire).tobytes())
    # splicing the array specs into the serialised header costs a fraction of a pydantic model_copy
    body = msg.model_dump_json(exclude=_ARRAYS_FIELD).encode()
    return [b'{"arrays":[' + ",".join(specs).encode() + b"]," + body[1:], *payload]


_ARRAYS_FIELD = {"arrays"}


def _explain(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<header>"
    return f"invalid header field {where}: {first['msg']}"


def decode(frames: Sequence[Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[_Message, list[np.ndarray]]:
    """Parse and check a multipart message; anything wrong raises `ProtocolError`, never another error.

    Arrays are read-only views of the frames (zero copy).
    """
    try:
        views = [memoryview(f) for f in frames]
    except TypeError:
        raise ProtocolError("frames must be bytes-like") from None
    if not views:
        raise ProtocolError("empty message")
    if len(views) > MAX_FRAMES:
        raise ProtocolError(f"{len(views)} frames exceed the limit of {MAX_FRAMES}", "too_large")
    size = sum(v.nbytes for v in views)
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {max_bytes}", "too_large")
    raw = views[0].tobytes()
    try:
        msg = _MESSAGE.validate_json(raw)
    except ValidationError as err:
        raise _header_error(raw, err) from None
    if len(msg.arrays) != msg.NUM_ARRAYS or len(views) - 1 != msg.NUM_ARRAYS:
        raise ProtocolError(f"{msg.type} must carry {msg.NUM_ARRAYS} array(s); header declares "
                            f"{len(msg.arrays)}, {len(views) - 1} array frame(s) present", seq=msg.seq)
    arrays = []
    for i, (spec, view) in enumerate(zip(msg.arrays, views[1:])):
        dtype = WIRE_DTYPES[spec.dtype]
        count = math.prod(spec.shape)  # Python ints: a hostile shape cannot overflow into a match
        if count * dtype.itemsize != view.nbytes:
            raise ProtocolError(f"array {i}: header says {spec.dtype}{list(spec.shape)} "
                                f"({count * dtype.itemsize} bytes), frame has {view.nbytes} bytes", seq=msg.seq)
        arrays.append(np.frombuffer(view, dtype=dtype).reshape(spec.shape))
    return msg, arrays


def _header_error(raw: bytes, err: ValidationError) -> ProtocolError:
    """Turn a failed header validation into the most useful error code (version, type, or schema)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return ProtocolError("header is not valid UTF-8 JSON")
    if not isinstance(data, dict):
        return ProtocolError("header must be a JSON object")
    seq = data.get("seq")
    seq = seq if type(seq) is int and 0 <= seq < 2**63 else None
    version = data.get("v")
    if version != PROTOCOL_VERSION:
        return ProtocolError(f"protocol version mismatch: this side speaks {PROTOCOL_VERSION}, "
                             f"message has {ascii(version)[:40]}", "version", seq)
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        return ProtocolError(f"unknown message type {str(kind)[:40]!r}", "unknown_type", seq)
    return ProtocolError(f"{kind}: {_explain(err)}", seq=seq)


# ---- reading and routing ids ----
READ_FRAMES_PER_CALL = 4096
"""Frames one `MessageReader.read` call consumes at most (~8 ms of discarding): a flood is served in slices."""


@dataclass(frozen=True)
class Incoming:
    """One message as read: `frames` is empty when it was refused, and `refused` says why."""

    peer: bytes | None
    frames: list[zmq.Frame]
    refused: str | None = None


class MessageReader:
    """Reads multipart messages frame by frame and stops keeping one as soon as it breaks the limits.

    `recv_multipart` would copy a message of any size into this process before a size check could
    run (a 1 GiB message of 256 KiB frames: 2.1 GB peak, 5 s). Here frames are taken without
    copying, at most `max_bytes` and MAX_FRAMES of one message are kept, the rest is dropped as it
    is read, and one call reads at most READ_FRAMES_PER_CALL frames: a call never takes long, and a
    message that is cut by that budget is continued by the next call. `routed` (a ROUTER socket):
    the first frame is the peer's routing id and does not count.
    """

    def __init__(self, sock: zmq.Socket, max_bytes: int, *, routed: bool) -> None:
        self.sock, self.max_bytes, self.routed = sock, int(max_bytes), routed
        self._reset()

    def _reset(self) -> None:
        self._peer: bytes | None = None
        self._frames: list[zmq.Frame] = []
        self._count = 0
        self._size = 0
        self._refused: str | None = None

    def read(self) -> Incoming | None:
        """The next complete message, or None when none is complete yet (call again once the socket is readable)."""
        for _ in range(READ_FRAMES_PER_CALL):
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            self._count += 1
            if self.routed and self._count == 1:
                self._peer = frame.bytes[:256]
            elif self._refused is None:
                self._size += len(frame)
                if len(self._frames) >= MAX_FRAMES:
                    self._refused = f"more than {MAX_FRAMES} frames"
                elif self._size > self.max_bytes:
                    self._refused = f"more than {self.max_bytes} bytes"
                if self._refused is None:
                    self._frames.append(frame)
                else:
                    self._frames = []
            if frame.more:
                continue
            out = Incoming(self._peer, self._frames, self._refused)
            self._reset()
            return out
        return None


def seed_routing_ids() -> None:
    """Seed libc's `rand()`, which libzmq uses to number id-less peers, from the OS before a ROUTER socket exists.

    Unseeded, every process hands out the same ids (0x006b8b4567, ...), so a local peer that claims
    them first makes libzmq abort the robot process on the next id-less connection.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.srand(ctypes.c_uint(secrets.randbits(32)))
    except (OSError, AttributeError):  # not glibc/musl: libzmq there has its own rand(); nothing to seed
        pass


def new_routing_id() -> bytes:
    """A random 16-byte routing id whose first byte is not zero (zero-led ids are libzmq's own)."""
    return bytes([1 + secrets.randbelow(255)]) + secrets.token_bytes(15)


# ---- client side ----
@dataclass(frozen=True, eq=False)
class RobotInfo:
    """What the robot said about itself in the handshake."""

    env_id: str
    state_dim: int
    act_dim: int
    act_low: np.ndarray
    act_high: np.ndarray
    dt: float
    mode: str
    protocol_version: int
    watchdog_s: float
    owner_timeout_s: float
    max_message_bytes: int
    session: str
    metadata: dict[str, Any] = field(default_factory=dict)  # hello_reply's metadata (a perturbed sim's settings)


@dataclass(frozen=True, eq=False)
class Observation:
    """One published robot state. `state` is a read-only view of the received bytes.

    `t_robot` is the robot's wall clock at send, `t_received` the client's at decode.
    `info` carries the safety flags and counters (keys listed in the module docstring).
    """

    seq: int
    t_robot: float
    state: np.ndarray
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]
    session: str
    episode: int
    step: int
    action_seq: int | None
    t_received: float

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


@dataclass
class ClientStats:
    """What the client skipped or survived; freshness is measurable, not assumed."""

    sent: int = 0
    received: int = 0
    dropped_observations: int = 0  # newer one arrived before this one was returned, or already-seen seq
    unmatched_replies: int = 0  # replies to requests this client had given up on
    malformed: int = 0  # frames from the robot that did not decode
    errors: int = 0  # error replies
    timeouts: int = 0
    retries: int = 0  # requests resent with the same seq because no reply came within retry_s
    reconnects: int = 0
    last_error: str | None = None
    recent_errors: list[str] = field(default_factory=list)

    def note_error(self, msg: ErrorMsg) -> None:
        self.errors += 1
        self.last_error = f"[{msg.code}] {msg.message}"
        self.recent_errors = [*self.recent_errors[-9:], self.last_error]


def check_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(ENDPOINT_SCHEMES):
        raise ProtocolError(f"endpoint {endpoint!r} must start with one of {', '.join(ENDPOINT_SCHEMES)}",
                            "endpoint")
    return endpoint


DEFAULT_RETRY_S = 0.1
"""Resend an unanswered request after this long. A loopback round trip is ~0.15 ms and a sim step
well under 10 ms, so 0.1 s is far past a slow reply yet costs a lost message only 0.1 s."""
RECONNECT_IVL_MS = 20
"""First reconnect attempt after a dropped connection (doubling up to 1 s while the robot stays away):
when the robot drops every connection at its memory cap, the owner is back within a period."""
GOODBYE_LINGER_MS = 100
"""How long `close()` lets the goodbye of an episode owner reach the robot before dropping it."""


class RobotClient:
    """Controller-side connection to a robot (or the sim). Not thread-safe; never blocks past its timeout.

    Typical lockstep use: ``info = c.hello(); obs = c.reset(seed=0); obs = c.step(action)``.
    Real-time use: ``c.reset()``, then every period ``obs = c.latest_observation(dt)`` and
    ``c.send_action(action)``. Requests are resent with the same seq every `retry_s` until
    `timeout_s`; `curve` (``maac_robot.runtime.auth.ClientCurve``) connects with CURVE keys.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 1.0, *, name: str = "",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, context: zmq.Context | None = None,
                 retry_s: float = DEFAULT_RETRY_S, curve: ClientCurve | None = None) -> None:
        if not timeout_s > 0:
            raise ProtocolError(f"timeout_s must be positive, got {timeout_s}", "config")
        if not retry_s > 0:
            raise ProtocolError(f"retry_s must be positive, got {retry_s}", "config")
        self.endpoint = check_endpoint(endpoint)
        self.timeout_s = float(timeout_s)
        self.retry_s = float(retry_s)
        self.name = name
        self.max_message_bytes = max_message_bytes
        self.curve = curve
        self.info: RobotInfo | None = None
        self.stats = ClientStats()
        self.token = secrets.token_hex(16)  # proves this client owns its episode, whatever socket it uses
        self._owns = False  # a reset succeeded: say goodbye on close
        self._ctx = context or zmq.Context.instance()
        self._seq = 0
        self._last_obs: tuple[str, int] | None = None  # (session, seq) of the newest observation returned
        self._pending_obs: Observation | None = None  # newest observation seen while waiting for a reply
        self._last_action: list[bytes] | None = None  # frames of the latest action, for `resend_action`
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._open()

    # -- socket lifecycle --
    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, new_routing_id())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SNDHWM, 64)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_message_bytes)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.endpoint)
        self._sock = sock
        self._reader = MessageReader(sock, self.max_message_bytes, routed=False)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def _reopen(self) -> None:
        """Fresh socket: stale queued requests die with the old one, a restarted robot is reached anew."""
        self._close_socket()
        self._pending_obs = None
        self._open()
        self.stats.reconnects += 1

    def _close_socket(self, linger_ms: int = 0) -> None:
        if self._sock is not None:
            self._poller.unregister(self._sock)
            self._sock.close(linger=linger_ms)
            self._sock = None

    def goodbye(self) -> None:
        """Give up the episode this client owns, so another controller may reset at once (no reply)."""
        if self._sock is None or not self._owns:
            return
        self._owns = False
        try:
            self._sock.send_multipart(encode(Goodbye(seq=self._next_seq(), t=time.time(), token=self.token)),
                                      flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # robot unreachable: it hands the episode on after its owner timeout instead

    def close(self) -> None:
        """Say goodbye if this client owns an episode, then close the socket."""
        owned = self._owns
        self.goodbye()
        self._close_socket(GOODBYE_LINGER_MS if owned else 0)

    def __enter__(self) -> RobotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level --
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send_frames(self, frames: list[bytes]) -> None:
        """Send now or raise RobotTimeout: for messages nobody waits a reply to (real-time actions)."""
        if not self._try_send(frames):
            self._timeout(f"cannot send to {self.endpoint}: send queue full (robot not reading or not running)")

    def _try_send(self, frames: list[bytes]) -> bool:
        """Send without blocking; False when ZeroMQ cannot take the message now (no connection yet, queue full)."""
        if self._sock is None:
            raise ProtocolError("client is closed", "closed")
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.stats.sent += 1
        return True

    def _timeout(self, why: str) -> None:
        self.stats.timeouts += 1
        self._reopen()
        raise RobotTimeout(why)

    def _recv(self, deadline: float) -> tuple[_Message, list[np.ndarray]] | None:
        """Next decodable message before `deadline` (monotonic), or None. Malformed or oversized ones are counted and skipped."""
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1000
            # whole milliseconds, rounded down: never wait past the deadline
            if not self._poller.poll(max(0, int(remaining_ms))):
                if remaining_ms < 1:
                    return None
                continue
            got = self._reader.read()
            if got is None:
                continue
            if got.refused is not None:
                self.stats.malformed += 1
                continue
            try:
                msg, arrays = decode(got.frames, self.max_message_bytes)
            except ProtocolError:
                self.stats.malformed += 1
                continue
            self.stats.received += 1
            return msg, arrays

    def _observation(self, msg: ObservationMsg, arrays: list[np.ndarray]) -> Observation:
        return Observation(seq=msg.seq, t_robot=msg.t, state=arrays[0], reward=msg.reward,
                           terminated=msg.terminated, truncated=msg.truncated, info=msg.info,
                           session=msg.session, episode=msg.episode, step=msg.step,
                           action_seq=msg.action_seq, t_received=time.time())

    def _is_new(self, obs: Observation) -> bool:
        last = self._last_obs
        return last is None or obs.session != last[0] or obs.seq > last[1]

    def _offer(self, obs: Observation) -> None:
        """Keep `obs` as the pending newest observation if it is newer than what we hold."""
        if not self._is_new(obs):
            self.stats.dropped_observations += 1
            return
        if self._pending_obs is not None:
            self.stats.dropped_observations += 1
            if self._pending_obs.session == obs.session and self._pending_obs.seq > obs.seq:
                return
        self._pending_obs = obs

    def _take(self, obs: Observation) -> Observation:
        self._last_obs = (obs.session, obs.seq)
        return obs

    def _exchange(self, frames: list[bytes], seq: int, is_reply: Callable[[_Message], bool], *, what: str,
                  tolerate: tuple[str, ...] = ()) -> tuple[_Message, list[np.ndarray]]:
        """Wait for the reply to the request in `frames` (already sent once), resending it unchanged every
        `retry_s` until `timeout_s`. Error replies to it raise unless their code is in `tolerate`;
        observations meanwhile are kept as the newest pending one, anything else is counted."""
        start = time.monotonic()
        deadline = start + self.timeout_s
        retry_at = start + self._retry_interval()
        while True:
            got = self._recv(min(deadline, retry_at))
            if got is None:
                if time.monotonic() >= deadline:
                    self._timeout(f"no {what} reply from {self.endpoint} within {self.timeout_s:g} s "
                                  f"(is the robot/sim running?)")
                self._try_send(frames)  # not taken now: the next retry tries again, until the deadline
                self.stats.retries += 1
                retry_at = time.monotonic() + self._retry_interval()
                continue
            msg, arrays = got
            if isinstance(msg, ErrorMsg):
                self.stats.note_error(msg)
                if msg.ack == seq and msg.code not in tolerate:
                    raise ProtocolError(f"robot refused {what}: {msg.message}", msg.code)
                continue
            if is_reply(msg):
                return msg, arrays
            if isinstance(msg, ObservationMsg):
                self._offer(self._observation(msg, arrays))
            else:
                self.stats.unmatched_replies += 1

    def _retry_interval(self) -> float:
        """`retry_s`, or 1.5 control periods once the robot's dt is known if that is shorter: in real time
        a reply lost for longer than that is a stale reply."""
        return self.retry_s if self.info is None else min(self.retry_s, 1.5 * self.info.dt)

    def _request(self, msg: _Message, want: type[_Message], *, what: str) -> tuple[_Message, list[np.ndarray]]:
        frames = encode(msg)
        self._try_send(frames)
        return self._exchange(frames, msg.seq, lambda m: isinstance(m, want) and m.ack == msg.seq, what=what)

    # -- API --
    def hello(self) -> RobotInfo:
        """Handshake: check the protocol version and learn the robot's spaces, dt and mode."""
        msg, (low, high) = self._request(Hello(seq=self._next_seq(), t=time.time(), client=self.name), HelloReply,
                                         what="hello")
        if low.shape != (msg.act_dim,) or high.shape != (msg.act_dim,):
            raise ProtocolError(f"robot sent action bounds of shape {low.shape}/{high.shape} for act_dim {msg.act_dim}")
        self.info = RobotInfo(env_id=msg.env_id, state_dim=msg.state_dim, act_dim=msg.act_dim,
                              act_low=low.astype(np.float64), act_high=high.astype(np.float64), dt=msg.dt,
                              mode=msg.mode, protocol_version=msg.v, watchdog_s=msg.watchdog_s,
                              owner_timeout_s=msg.owner_timeout_s, max_message_bytes=msg.max_message_bytes,
                              session=msg.session, metadata=dict(msg.metadata))
        return self.info

    def reset(self, seed: int | None = None) -> Observation:
        """Start a new episode (this client owns it) and return its first observation.

        Refused with code ``busy`` while another live controller owns the robot's episode.
        """
        msg, arrays = self._request(Reset(seq=self._next_seq(), t=time.time(), seed=seed, token=self.token),
                                    ObservationMsg, what="reset")
        self._owns = True
        self._pending_obs = None
        return self._take(self._observation(msg, arrays))

    def send_action(self, action: Any, obs_seq: int | None = None) -> int:
        """Send an action without waiting; returns its seq. `obs_seq` defaults to the newest observation returned."""
        seq, frames = self._action_frames(action, obs_seq)
        self._send_frames(frames)
        return seq

    def _action_frames(self, action: Any, obs_seq: int | None) -> tuple[int, list[bytes]]:
        seq = self._next_seq()
        if obs_seq is None and self._last_obs is not None:
            obs_seq = self._last_obs[1]
        arr = np.asarray(action, dtype=np.float64)
        # model_construct: these fields come from this client, validation would only cost time on the hot path
        frames = encode(Action.model_construct(seq=seq, t=time.time(), obs_seq=obs_seq),
                        [arr.reshape(-1) if arr.ndim == 0 else arr])
        self._last_action = frames
        return seq, frames

    def resend_action(self) -> None:
        """Send the last action again, same seq: a retransmission the robot applies at most once."""
        if self._last_action is not None:
            self._try_send(self._last_action)

    def step(self, action: Any) -> Observation:
        """Send an action and wait for the observation that results from it (lockstep, or the next tick in realtime).

        A lost action or observation is recovered by resending the action with the same seq: the
        robot answers a repeat with the observation it already sent and never steps twice.
        A rejected action (NaN/inf, wrong length) is not an exception: the robot applied the safe
        action, the observation says so in ``info["rejected"]``, and ``stats.last_error`` has the reply.
        """
        seq, frames = self._action_frames(action, None)
        self._try_send(frames)
        msg, arrays = self._exchange(frames, seq, lambda m: isinstance(m, ObservationMsg) and m.action_seq == seq,
                                     what=f"action {seq}", tolerate=("bad_action",))
        if self._pending_obs is not None:
            self.stats.dropped_observations += 1
            self._pending_obs = None
        return self._take(self._observation(msg, arrays))

    def latest_observation(self, timeout_s: float | None = None) -> Observation | None:
        """The newest observation not returned before, waiting up to `timeout_s`; None if none came.

        Everything already queued is drained first and only the newest kept (older ones are counted
        in ``stats.dropped_observations``): a controller acts on the present, not on a backlog.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        got = self._recv(time.monotonic())  # drain what is already there without waiting
        while True:
            while got is not None:
                msg, arrays = got
                if isinstance(msg, ObservationMsg):
                    self._offer(self._observation(msg, arrays))
                elif isinstance(msg, ErrorMsg):
                    self.stats.note_error(msg)
                else:
                    self.stats.unmatched_replies += 1
                got = self._recv(time.monotonic())
            if self._pending_obs is not None:
                obs, self._pending_obs = self._pending_obs, None
                return self._take(obs)
            got = self._recv(deadline)
            if got is None:
                return None

    def heartbeat(self) -> float:
        """Round trip of a heartbeat in seconds (raises RobotTimeout if the robot does not answer)."""
        start = time.perf_counter()
        self.status()
        return time.perf_counter() - start

    def status(self) -> HeartbeatReply:
        """The robot's heartbeat status (mode, episode, step, running, uptime)."""
        msg, _ = self._request(Heartbeat(seq=self._next_seq(), t=time.time()), HeartbeatReply, what="heartbeat")
        return msg

    def shutdown(self) -> None:
        """Ask the robot process to stop serving, and wait for its acknowledgement.

        Robots refuse it (``forbidden``) unless started with an admin key and this client connected with it.
        """
        self._request(Shutdown(seq=self._next_seq(), t=time.time()), Shutdown, what="shutdown")
