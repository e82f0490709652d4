"""The sim process: serves a Gymnasium MuJoCo env over the robot protocol, exactly as a robot driver would.

The controller cannot tell it from a robot: it speaks only `maac_robot.runtime.protocol` (ROUTER socket,
bound; see that module's docstring for the protocol decisions). What this file adds is the
robot side's behaviour:

* lockstep: an action advances exactly one control period and is answered with its observation
  (deterministic given the reset seed, so evaluations through the protocol equal in-process
  Gymnasium rollouts);
* realtime: ticks on the wall clock every dt, applying the freshest valid action received since
  the previous tick, holding the previous action when none came (counted as a missed tick),
  and the safe action once none has come for `watchdog_periods * dt`;
* safety in both modes (`ActionGate`): clip and report, reject NaN/inf and wrong-length actions
  with an error reply and apply the safe action;
* robustness: every malformed message gets an error reply and is counted; replies go out
  non-blocking (a vanished or slow client never stalls the sim); the poll always has a timeout;
* optionally, dynamics that differ from the nominal env on purpose (`sim.perturb`, `sim/perturb.py`):
  model scales, observation noise, an action delay and random pushes, drawn anew at each reset,
  reported in hello_reply's `metadata`, each episode's first observation, the recordings and the log;
* optional recording of every transition (`maac_robot.runtime.recording`) and an mp4 of the episodes
  (`pip install 'maac-robot[render]'`; headless EGL renders ~0.3 s per 480x480 frame on the 2-core
  dev machine, so render lockstep runs: in real time it would overrun every tick).

* trust no peer: one controller owns the episode (others get `busy` / `no_episode`) until it says
  goodbye or stays silent for `owner_timeout_s`; a repeated request from the owner is answered
  with the reply already sent (a retry never steps twice); `shutdown` needs the admin key; log
  lines a peer can trigger are rate-limited; each message is read frame by frame within a time
  slice, and past a resident-memory cap every connection is dropped (ZeroMQ buffers a multipart
  message whole before the application sees it) while the process keeps its listening socket, so
  no other process can take the port or path meanwhile;
* CURVE authentication (`maac_robot.runtime.auth`): with `server_key` + `authorized`, only authorised
  client keys get through the handshake. A bind off loopback without keys is refused unless
  `insecure`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import zmq
from pydantic import ValidationError

from maac_robot.runtime.auth import ServerAuth, check_bind_security
from maac_robot.runtime.config import PerturbConfig, format_errors
from maac_robot.runtime.errors import UserError
from maac_robot.runtime.protocol import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Action,
    ErrorMsg,
    Goodbye,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    Incoming,
    MessageReader,
    ObservationMsg,
    ProtocolError,
    Reset,
    Shutdown,
    _Message,
    check_endpoint,
    decode,
    encode,
    seed_routing_ids,
)
from maac_robot.runtime.recording import EpisodeRecorder
from maac_robot.video import VideoError, VideoWriter, check_video_support
from sim.perturb import Perturber

log = logging.getLogger("sim")

Mode = Literal["lockstep", "realtime"]
# ZeroMQ drops the connection of a peer sending a frame above this multiple of the message limit
_HARD_CAP_FACTOR = 4
# reading input never holds the loop longer than this when no tick is due (lockstep, idle)
_READ_SLICE_S = 0.05
# the loop wakes at least this often to check memory, also while ZeroMQ buffers a message it cannot yet hand over
_WAKE_S = 0.02
DEFAULT_OWNER_TIMEOUT_S = 2.0
DEFAULT_MEMORY_HEADROOM_MB = 256


class _RateLimitedLog:
    """At most `burst` lines per `window_s` per kind of event a peer can trigger; the rest are counted and summed up."""

    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, lines, suppressed)

    def __call__(self, kind: str, level: int, fmt: str, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        start, lines, suppressed = self._windows.get(kind, (now, 0, 0))
        if now - start > self.window_s:
            if suppressed:
                log.log(level, "%d more %r events in the last %.0f s were not logged", suppressed, kind,
                        self.window_s)
            start, lines, suppressed = now, 0, 0
        if lines < self.burst:
            log.log(level, fmt, *args, **kwargs)
            lines += 1
        else:
            suppressed += 1
        self._windows[kind] = (start, lines, suppressed)


class _Resident:
    """This process's resident memory, from a /proc/self/statm descriptor opened once.

    Opened at start-up so a peer that exhausts the process's file descriptors cannot blind the
    memory guard; a read that fails later counts as over any cap. Without /proc (not Linux) it
    reads 0 and the guard is off.
    """

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __call__(self) -> int:
        if self._fd is None:
            return 0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 1 << 62

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _release_freed_memory() -> None:
    """Hand memory freed by a dropped peer's buffers back to the OS (glibc keeps small freed blocks).

    Without it the resident size stays above the cap after the connections are gone, and the guard
    would drop every connection again at each wake-up.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _printable(text: str, limit: int = 2000) -> str:
    """`text` as valid UTF-8 within the error message limit: a peer's bytes can hold lone surrogates."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def _tag(peer: bytes | None) -> str:
    """A short, stable tag for a peer in logs: never the routing id itself."""
    import hashlib

    return "-" if peer is None else hashlib.blake2b(peer, digest_size=4).hexdigest()


class SimError(UserError):
    """The sim cannot start as asked (bad endpoint, address in use, missing video support)."""


@dataclass
class SafetyCounters:
    """Cumulative over the sim process; every observation carries them so the controller can see them."""

    clipped_actions: int = 0
    rejected_actions: int = 0
    late_actions: int = 0  # computed from an observation older than the newest published
    dropped_actions: int = 0  # superseded before a tick, or not newer than one already received
    missed_ticks: int = 0  # real-time ticks without a new action (held or safe action applied)
    watchdog_ticks: int = 0  # ticks that applied the safe action because the watchdog expired
    overruns: int = 0  # real-time periods skipped because the sim fell behind the wall clock
    bad_messages: int = 0  # malformed, oversized, wrong version, unknown or unexpected messages
    internal_errors: int = 0  # robot-side failures (env or bug): logged, answered, episode ended
    refused_resets: int = 0  # resets from a peer while another live controller owned the episode
    refused_shutdowns: int = 0  # shutdown from a peer without the admin key
    repeated_requests: int = 0  # retransmitted requests: answered with the reply already sent, never applied twice
    socket_resets: int = 0  # every connection dropped because resident memory passed the cap


class ActionGate:
    """Robot-side action checks: the last line of defence between a controller and the motors."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        # zero torque, moved into the bounds for an env whose box excludes zero
        self.safe_action = np.clip(np.zeros_like(self.low), self.low, self.high)
        self.safe_action.setflags(write=False)

    def check(self, action: np.ndarray) -> tuple[np.ndarray, str | None, bool]:
        """(action to apply, rejection reason or None, whether it was clipped)."""
        if action.shape != self.low.shape:
            return self.safe_action, f"wrong length: expected shape {self.low.shape}, got {action.shape}", False
        action = action.astype(np.float64)
        if not np.isfinite(action).all():
            return self.safe_action, "non-finite values (NaN/inf)", False
        clipped = np.minimum(np.maximum(action, self.low), self.high)  # np.clip costs 3x more per call
        return clipped, None, bool((clipped != action).any())


@dataclass
class _Pending:
    """The freshest action received in real-time mode, waiting for the next tick."""

    action: np.ndarray
    seq: int
    rejected: str | None
    clipped: bool
    late: bool
    t_received: float


class SimServer:
    """Serves `env_id` on `bind` until `stop()` is called (any thread) or an admin sends shutdown."""

    def __init__(self, env_id: str, *, bind: str = DEFAULT_ENDPOINT, mode: Mode = "lockstep", seed: int | None = 0,
                 watchdog_periods: float = 3.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_episode_steps: int | None = None, record_dir: str | Path | None = None,
                 render_path: str | Path | None = None, context: zmq.Context | None = None,
                 owner_timeout_s: float = DEFAULT_OWNER_TIMEOUT_S, server_key: str | Path | None = None,
                 authorized: str | Path | None = None, admin_key: str | Path | None = None, insecure: bool = False,
                 memory_headroom_mb: float = DEFAULT_MEMORY_HEADROOM_MB,
                 perturb: PerturbConfig | dict[str, Any] | None = None) -> None:
        from maac_robot.envs import control_period, make_env

        if mode not in ("lockstep", "realtime"):
            raise SimError(f"mode must be 'lockstep' or 'realtime', got {mode!r}")
        if not watchdog_periods > 0:
            raise SimError(f"watchdog_periods must be positive, got {watchdog_periods}")
        if not memory_headroom_mb > 0:
            raise SimError(f"memory_headroom_mb must be positive, got {memory_headroom_mb}")
        if (server_key is None) != (authorized is None):
            raise SimError("CURVE needs both --server-key (the sim's NAME.key_secret) and --authorized (a directory "
                           "of the controllers' NAME.key files)")
        if admin_key is not None and server_key is None:
            raise SimError("--admin-key needs --server-key and --authorized: an admin is known by the key it proves")
        try:
            check_endpoint(bind)
        except ProtocolError as err:
            raise SimError(str(err)) from None
        check_bind_security(bind, keyed=server_key is not None, insecure=insecure)
        self.env_id = env_id
        self.mode: Mode = mode
        self.max_message_bytes = int(max_message_bytes)
        self.session = secrets.token_hex(8)
        if render_path is not None:
            _check_video_support()
        self.env = make_env(env_id, seed=seed, max_episode_steps=max_episode_steps,
                            render_mode="rgb_array" if render_path else None)
        self.dt = control_period(self.env)  # MuJoCo's dt, or 1/render_fps for an env of your own without one
        self.state_dim = int(self.env.observation_space.shape[0])
        self.gate = ActionGate(self.env.action_space.low, self.env.action_space.high)
        # dynamics that differ from the nominal env on purpose (sim/perturb.py); None when nothing is perturbed
        self._perturb: Perturber | None = None
        if not isinstance(perturb, PerturbConfig):
            try:
                perturb = PerturbConfig.model_validate(perturb or {})
            except ValidationError as err:
                self.env.close()
                raise SimError(format_errors("perturb", err, prefix="sim.perturb.")) from None
        if not perturb.nominal:
            try:
                self._perturb = Perturber(perturb, self.env, seed=seed, safe_action=self.gate.safe_action)
            except BaseException:
                self.env.close()
                raise
            log.info("perturbed dynamics: %s (a new draw at every reset)", perturb.in_force())
        self.watchdog_s = watchdog_periods * self.dt
        if not owner_timeout_s >= self.watchdog_s:
            raise SimError(f"owner_timeout_s ({owner_timeout_s}) must be at least the watchdog period "
                           f"({self.watchdog_s:g} s): a silent owner's robot must be on the safe action first")
        self.owner_timeout_s = float(owner_timeout_s)
        self.counters = SafetyCounters()
        self._log = _RateLimitedLog()
        record_meta: dict[str, Any] = {"env_id": env_id, "source": "sim", "state_dim": self.state_dim,
                                       "act_dim": int(self.gate.low.shape[0]), "dt": self.dt, "mode": mode,
                                       "session": self.session, "protocol_version": PROTOCOL_VERSION}
        if perturb.obs_noise_std != 0:  # the recording holds what the controller saw
            record_meta["states"] = "as served: observation noise (sim.perturb.obs_noise_std) included"
        self._recorder = EpisodeRecorder(record_dir, record_meta) if record_dir is not None else None
        self._started = time.monotonic()
        self._seq = 0
        # episode state
        self._owner: bytes | None = None
        self._owner_token: str | None = None
        self._owner_seen = 0.0  # monotonic time of the owner's latest message
        self._displaced: dict[bytes, None] = {}  # recent owners whose episode passed on after their silence
        self._episode = 0  # number of resets served
        self._step = 0
        self._return = 0.0  # robot-side episode return: a controller that skips stale observations skips rewards
        self._running = False  # an episode is in progress (not yet terminated/truncated)
        self._state: np.ndarray | None = None
        self._last_action_seq = -1
        self._latest_obs_seq = -1
        # the owner's latest answered request: (peer, seq, reply frames), resent verbatim for a retry
        self._answered: tuple[bytes, int, list[list[bytes]]] | None = None
        self._capture: list[list[bytes]] | None = None
        self._final_frames: list[bytes] | None = None  # the last observation of an episode that ended
        # real-time state
        self._pending: _Pending | None = None
        self._applied = self.gate.safe_action
        self._applied_seq: int | None = None
        self._last_valid_t = 0.0
        self._next_tick = 0.0
        self._stopping = threading.Event()
        self._dropped_at = 0.0  # when the memory guard last dropped every connection

        self._resident = _Resident()
        self._headroom = int(memory_headroom_mb * 2**20)
        self._ctx = context or zmq.Context.instance()
        self._auth: ServerAuth | None = None
        self._video = None
        self._listener: socket.socket | None = None
        self._tmpdir: str | None = None  # made for an `ipc://*` bind, removed on close
        try:
            if server_key is not None:
                self._auth = ServerAuth(server_key, authorized, admin_key, self._ctx)  # type: ignore[arg-type]
            self._video = VideoWriter(render_path, fps=1.0 / self.dt) if render_path is not None else None
            self._listener, self._serve_at = self._listen(bind)
            self._sock = self._router()
        except BaseException:
            self._release()
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._reader = MessageReader(self._sock, self.max_message_bytes, routed=True)
        self._wake_endpoint = f"inproc://sim-wake-{self.session}"
        self._wake = self._ctx.socket(zmq.PULL)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(self._wake_endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake, zmq.POLLIN)
        self.memory_cap = self._resident() + self._headroom

    # ---- setup / teardown ----
    def _listen(self, bind: str) -> tuple[socket.socket | None, str]:
        """The OS listening socket this process holds for its whole life, and the endpoint it serves.

        Every ROUTER the sim makes (a new one after the memory guard drops all connections) binds a
        duplicate of this socket (ZMQ_USE_FD), so the port or ipc path is never free for another
        process to take while controllers reconnect. inproc needs none (nothing outside can bind
        it); a tcp host that is not an address or a resolvable name (an interface name) falls back
        to libzmq's own bind.
        """
        if bind.startswith("ipc://"):
            path = bind[len("ipc://"):]
            if path == "*":
                self._tmpdir = tempfile.mkdtemp(prefix="maac-sim-")
                path = os.path.join(self._tmpdir, "sim.sock")
            _remove_stale_ipc(f"ipc://{path}")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = path
        elif bind.startswith("tcp://"):
            url = urlparse(bind)
            host = url.hostname or ""
            try:
                port = 0 if bind.rsplit(":", 1)[1] == "*" else url.port
                family, _, _, _, address = socket.getaddrinfo(
                    None if host in ("*", "") else host, port, type=socket.SOCK_STREAM,
                    flags=socket.AI_PASSIVE)[0]
            except (socket.gaierror, ValueError, IndexError):
                return None, bind
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            return None, bind
        try:
            listener.bind(address)
            listener.listen(128)
        except OSError as err:
            listener.close()
            raise SimError(f"cannot bind {bind}: {err}") from None
        if listener.family == socket.AF_UNIX:
            return listener, f"ipc://{address}"
        host, port = listener.getsockname()[:2]
        return listener, f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"

    def _router(self) -> zmq.Socket:
        """A ROUTER serving the endpoint, with this sim's limits and authentication."""
        seed_routing_ids()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 64)  # a client that stops reading loses new observations, never blocks us
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, _HARD_CAP_FACTOR * self.max_message_bytes)
        # a connection that has not finished the ZMTP/CURVE handshake in 2 s is closed: idle connects cannot pile up
        sock.setsockopt(zmq.HANDSHAKE_IVL, 2000)
        if self._auth is not None:
            self._auth.apply(sock)
        if self._listener is not None:
            sock.setsockopt(zmq.USE_FD, os.dup(self._listener.fileno()))
        try:
            sock.bind(self._serve_at)
        except zmq.ZMQError as err:
            sock.close(linger=0)
            raise SimError(f"cannot bind {self._serve_at}: {err}") from None
        return sock

    def _drop_connections(self) -> None:
        """Drop every connection and what ZeroMQ buffered for them; the loop listens again (`_listen_again`).

        Controllers reconnect by themselves within their reconnect interval; their routing ids and
        the episode's owner are kept, so an owner just carries on.
        """
        self._poller.unregister(self._sock)
        self._sock.close(linger=0)
        self._sock = None
        self._dropped_at = time.monotonic()

    def _listen_again(self) -> None:
        """One attempt to bind the endpoint again, never waiting: ZeroMQ releases the port on its own
        threads (after freeing the dropped peers' buffers), and real-time ticks go on meanwhile."""
        try:
            sock = self._router()
        except (SimError, zmq.ZMQError, OSError) as err:  # e.g. out of file descriptors: try again next wake-up
            self._log("rebind", logging.ERROR, "cannot serve %s again yet (%s); retrying", self._serve_at, err)
            return
        self._sock = sock
        self._reader = MessageReader(sock, self.max_message_bytes, routed=True)
        self._poller.register(sock, zmq.POLLIN)
        _release_freed_memory()
        rss = self._resident()
        if rss > self.memory_cap:  # memory that did not come back: a new cap, or every wake-up would drop everyone
            self.memory_cap = rss + self._headroom // 4
            self._log("memory", logging.WARNING, "resident memory stays at %.0f MB after dropping every connection; "
                      "cap raised to %.0f MB", rss / 2**20, self.memory_cap / 2**20)

    def stop(self) -> None:
        """Ask `serve()` to return; safe from any thread and from a signal handler."""
        self._stopping.set()
        wake = self._ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        try:
            wake.connect(self._wake_endpoint)
            wake.send(b"", flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # already closed or the wake queue is full: the flag alone stops the loop at the next poll
        finally:
            wake.close(linger=0)

    def close(self) -> None:
        """Release the sockets, env and video (call after `serve()` returned)."""
        if self._sock is not None:
            self._sock.close(linger=0)
        if self.endpoint.startswith("ipc://"):  # ZeroMQ leaves the socket file behind
            path = Path(self.endpoint[len("ipc://"):])
            if is_stale_socket_file(path):
                path.unlink(missing_ok=True)
        self._wake.close(linger=0)
        self._release()

    def _release(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._resident.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self.env.close()
        if self._video is not None:
            self._video.close()
            self._video = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- main loop ----
    def serve(self) -> None:
        """Serve until stopped. Never busy-waits: one poll per wake-up, always with a timeout."""
        try:
            while not self._stopping.is_set():
                events = dict(self._poller.poll(self._poll_timeout_ms()))
                if self._wake in events:
                    self._wake.recv(zmq.NOBLOCK)
                    continue
                if self._sock is None:
                    self._listen_again()
                elif self._sock in events:
                    self._drain()
                self._guard_memory()
                if self.mode == "realtime" and self._running and time.monotonic() >= self._next_tick:
                    try:
                        self._tick()
                    except Exception as err:  # noqa: BLE001 - see _internal_error
                        self._internal_error(self._owner, None, err)
        finally:
            self._finish_recording()

    def _poll_timeout_ms(self) -> int:
        if self.mode != "realtime" or not self._running:
            return int(_WAKE_S * 1000)
        remaining = min(self._next_tick - time.monotonic(), _WAKE_S)
        if remaining < 1e-3:
            # poll has millisecond resolution: sleep the last fraction instead of spinning on poll(0)
            if remaining > 0:
                time.sleep(remaining)
            return 0
        return int(remaining * 1000)

    def _drain(self) -> None:
        """Handle what has arrived, but never past the next tick (realtime) or a short slice: input cannot stall the loop."""
        ticking = self.mode == "realtime" and self._running
        deadline = self._next_tick if ticking else time.monotonic() + _READ_SLICE_S
        while time.monotonic() < deadline:
            incoming = self._reader.read()
            if incoming is None:
                return
            self._handle(incoming)

    def _guard_memory(self) -> None:
        """Past the cap, drop every connection: ZeroMQ holds an incomplete multipart message where we cannot see it."""
        rss = self._resident()
        if rss > self.memory_cap and self._sock is not None:
            self.counters.socket_resets += 1
            self._log("memory", logging.WARNING, "resident memory %.0f MB passed the cap of %.0f MB: dropping every "
                      "connection (reset #%d)", rss / 2**20, self.memory_cap / 2**20, self.counters.socket_resets)
            self._drop_connections()

    def _handle(self, incoming: Incoming) -> None:
        """One message, start to finish: whatever it holds and whatever fails, the loop goes on."""
        peer = incoming.peer or b""
        seq = None
        try:
            if incoming.refused is not None:
                self._refuse(peer, "too_large", f"message refused: {incoming.refused}", None)
                return
            try:
                msg, arrays = decode(incoming.frames, self.max_message_bytes)
            except ProtocolError as err:
                self._refuse(peer, err.code, str(err), err.seq)
                return
            seq = msg.seq
            if peer == self._owner:
                self._owner_seen = time.monotonic()
            self._dispatch(peer, msg, arrays, incoming.frames[0])
        except Exception as err:  # noqa: BLE001 - a robot keeps serving; the failure is logged, counted, answered
            self._internal_error(peer, seq, err)

    def _internal_error(self, peer: bytes | None, ack: int | None, err: Exception) -> None:
        """A bug or an env failure: end the episode (its state is suspect), tell the peer, keep serving."""
        self.counters.internal_errors += 1
        self._log("internal", logging.ERROR, "internal error (episode %d ended): %s", self._episode, err,
                  exc_info=True)
        self._running = False
        if peer is not None:
            self._send(peer, ErrorMsg(seq=self._next_seq(), t=time.time(), ack=ack, code="internal",
                                      message=_printable(f"robot-side failure, episode ended: "
                                                         f"{type(err).__name__}: {err}")))

    def _dispatch(self, peer: bytes, msg: _Message, arrays: list[np.ndarray], header: zmq.Frame) -> None:
        if isinstance(msg, Action):
            self._on_action(peer, msg, arrays[0])
        elif isinstance(msg, Reset):
            self._on_reset(peer, msg)
        elif isinstance(msg, Heartbeat):
            self._send(peer, HeartbeatReply(seq=self._next_seq(), t=time.time(), ack=msg.seq, session=self.session,
                                            mode=self.mode, env_id=self.env_id, episode=self._episode,
                                            step=self._step, running=self._running,
                                            uptime_s=time.monotonic() - self._started,
                                            counters=vars(self.counters)))
        elif isinstance(msg, Hello):
            self._log("hello", logging.INFO, "hello from %r (peer %s)", msg.client[:40], _tag(peer))
            self._send(peer, HelloReply(seq=self._next_seq(), t=time.time(), ack=msg.seq, env_id=self.env_id,
                                        state_dim=self.state_dim, act_dim=int(self.gate.low.shape[0]), dt=self.dt,
                                        mode=self.mode, watchdog_s=self.watchdog_s,
                                        owner_timeout_s=self.owner_timeout_s,
                                        max_message_bytes=self.max_message_bytes, session=self.session,
                                        metadata=self.metadata()),
                       [self.gate.low, self.gate.high])
        elif isinstance(msg, Goodbye):
            if peer == self._owner or self._is_owner_token(msg.token):
                self._release_episode()
        elif isinstance(msg, Shutdown):
            if self._auth is None or not self._auth.is_admin(header):
                self.counters.refused_shutdowns += 1
                self._log("shutdown", logging.WARNING, "shutdown refused for peer %s (no admin key)", _tag(peer))
                self._refuse(peer, "forbidden", "shutdown over the wire needs the admin key (sim --admin-key); "
                             "stop the sim with a signal instead", msg.seq)
                return
            log.info("shutdown requested by admin peer %s", _tag(peer))
            self._send(peer, Shutdown(seq=self._next_seq(), t=time.time(), ack=msg.seq))
            self._stopping.set()
        else:
            self._refuse(peer, "unexpected", f"a robot does not accept {msg.type!r} messages", msg.seq)

    # ---- episode ownership ----
    def _owner_alive(self) -> bool:
        return self._owner is not None and time.monotonic() - self._owner_seen <= self.owner_timeout_s

    def _is_owner_token(self, token: str | None) -> bool:
        return token is not None and self._owner_token is not None and secrets.compare_digest(token,
                                                                                              self._owner_token)

    def _release_episode(self) -> None:
        """The owner said goodbye: end its episode (recorded as cut short); the robot is free."""
        self._finish_recording()
        self._owner, self._owner_token = None, None
        self._running = False
        self._pending = None

    def _was_answered(self, peer: bytes, seq: int) -> bool:
        """Whether `seq` from `peer` is the request answered last: a retry."""
        return self._answered is not None and self._answered[:2] == (peer, seq)

    def _repeat(self, peer: bytes, seq: int) -> None:
        """Resend the replies already sent to the owner's request `seq` (call when `_was_answered`)."""
        assert self._answered is not None
        self.counters.repeated_requests += 1
        for frames in self._answered[2]:
            self._send_frames(peer, frames)

    def _answer(self, peer: bytes, seq: int, handler: Any, *args: Any) -> None:
        """Run `handler`, keeping the replies it sends so a retry of request `seq` gets them again."""
        self._capture = []
        try:
            handler(*args)
        finally:
            captured, self._capture = self._capture, None
        self._answered = (peer, seq, captured)

    def _on_reset(self, peer: bytes, msg: Reset) -> None:
        if peer == self._owner and self._was_answered(peer, msg.seq):
            if self.mode == "realtime" and self._running:
                # the episode has ticked on since the reset: the retry gets the present, not the start
                self.counters.repeated_requests += 1
                self._publish(self._state, reward=0.0, terminated=False, truncated=False, ack=msg.seq,
                              action_seq=self._applied_seq, flags=_flags(held=True), env_info={}, step_s=0.0)
            else:
                self._repeat(peer, msg.seq)
            return
        same_client = peer == self._owner or self._is_owner_token(msg.token)
        if not same_client and self._owner_alive():
            self.counters.refused_resets += 1
            self._log("busy", logging.WARNING, "reset from peer %s refused: the episode is owned by peer %s",
                      _tag(peer), _tag(self._owner))
            self._refuse(peer, "busy", f"another controller owns the robot's episode; it passes on when that "
                         f"controller says goodbye or has been silent for {self.owner_timeout_s:g} s", msg.seq)
            return
        if not same_client and self._owner is not None:
            self._displaced[self._owner] = None
            while len(self._displaced) > 16:
                self._displaced.pop(next(iter(self._displaced)))
            self._log("takeover", logging.WARNING, "episode passes from silent peer %s to peer %s",
                      _tag(self._owner), _tag(peer))
        self._displaced.pop(peer, None)
        self._owner, self._owner_token, self._owner_seen = peer, msg.token, time.monotonic()
        self._answer(peer, msg.seq, self._reset, msg)

    def _reset(self, msg: Reset) -> None:
        self._finish_recording()
        extra: dict[str, Any] = {}
        if self._perturb is not None:
            extra["perturbation"] = self._perturb.new_episode(msg.seed, self._episode + 1)
            log.info("episode %d perturbation: %s", self._episode + 1, self._perturb.describe())
        state, _ = self.env.reset(seed=msg.seed)
        if self._perturb is not None:
            state = self._perturb.observe(state)
        self._episode += 1
        self._step = 0
        self._return = 0.0
        self._state = state
        self._running = True
        self._last_action_seq = -1
        self._pending = None
        self._applied, self._applied_seq = self.gate.safe_action, None
        now = time.monotonic()
        self._last_valid_t = now  # the controller gets one watchdog period for its first action
        self._next_tick = now + self.dt
        self._publish(state, reward=0.0, terminated=False, truncated=False, ack=msg.seq, action_seq=None,
                      flags=self._with_push(_flags(), False), env_info={}, step_s=0.0, extra=extra)

    def _on_action(self, peer: bytes, msg: Action, action: np.ndarray) -> None:
        if peer != self._owner:
            why = ("this controller's episode passed to another one after it was silent for more than "
                   f"{self.owner_timeout_s:g} s: reset to start a new episode" if peer in self._displaced else
                   "this controller owns no episode: send reset first")
            self._refuse(peer, "no_episode", why, msg.seq)
            return
        if msg.seq == self._last_action_seq:  # a retransmission: never a second step
            if self.mode == "lockstep":
                if self._was_answered(peer, msg.seq):
                    self._repeat(peer, msg.seq)
            else:
                self.counters.repeated_requests += 1
            return
        if not self._running:
            if self.mode == "realtime" and self._final_frames is not None:
                # the final observation may have been lost: the owner, still acting, gets it again
                self._send_frames(peer, self._final_frames)
            else:
                self._refuse(peer, "episode_over", "the episode has ended: send reset", msg.seq)
            return
        if msg.seq < self._last_action_seq:
            self.counters.dropped_actions += 1
            self._refuse(peer, "stale", f"action seq {msg.seq} is not newer than {self._last_action_seq}", msg.seq)
            return
        self._last_action_seq = msg.seq
        applied, rejected, clipped = self.gate.check(action)
        late = msg.obs_seq is not None and msg.obs_seq < self._latest_obs_seq
        if self.mode == "lockstep":
            self._answer(peer, msg.seq, self._lockstep_step, msg.seq, applied, rejected, clipped, late)
            return
        self._count_checked(peer, msg.seq, rejected, clipped, late)
        if self._pending is not None:
            self.counters.dropped_actions += 1
        self._pending = _Pending(applied, msg.seq, rejected, clipped, late, time.monotonic())

    def _count_checked(self, peer: bytes, seq: int, rejected: str | None, clipped: bool, late: bool) -> None:
        if rejected is not None:
            self.counters.rejected_actions += 1
            self._refuse(peer, "bad_action", f"action rejected ({rejected}); the safe action is applied", seq)
        self.counters.clipped_actions += clipped
        self.counters.late_actions += late

    def _lockstep_step(self, seq: int, applied: np.ndarray, rejected: str | None, clipped: bool, late: bool) -> None:
        self._count_checked(self._owner or b"", seq, rejected, clipped, late)
        self._advance(applied, action_seq=seq, ack=seq, flags=_flags(clipped=clipped, rejected=rejected, late=late))

    def _tick(self) -> None:
        """One real-time control period: choose the action (fresh, held or safe), step, publish, reschedule."""
        pending, self._pending = self._pending, None
        now = time.monotonic()
        if pending is not None:
            if pending.rejected is None:
                self._last_valid_t = pending.t_received
            action, action_seq = pending.action, pending.seq
            flags = _flags(clipped=pending.clipped, rejected=pending.rejected, late=pending.late)
        else:
            self.counters.missed_ticks += 1
            if now - self._last_valid_t > self.watchdog_s:
                self.counters.watchdog_ticks += 1
                action, action_seq = self.gate.safe_action, None
                flags = _flags(watchdog=True)
            else:
                action, action_seq = self._applied, self._applied_seq
                flags = _flags(held=True)
        self._applied, self._applied_seq = action, action_seq
        self._advance(action, action_seq=action_seq, ack=None, flags=flags)
        self._next_tick += self.dt
        behind = time.monotonic() - self._next_tick
        if behind > 0:  # whole periods were missed: skip them rather than burst to catch up
            skipped = int(behind // self.dt) + 1
            self.counters.overruns += skipped
            self._next_tick += skipped * self.dt

    def _advance(self, action: np.ndarray, *, action_seq: int | None, ack: int | None, flags: dict[str, Any]) -> None:
        start = time.perf_counter()
        if self._perturb is None:
            next_state, reward, terminated, truncated, env_info = self.env.step(action)
        else:  # the action from N ticks ago, maybe a push, and the observation as served
            action = self._perturb.action(action)
            flags = self._with_push(flags, self._perturb.push())
            try:
                next_state, reward, terminated, truncated, env_info = self.env.step(action)
            finally:
                self._perturb.end_push()
            next_state = self._perturb.observe(next_state)
        step_s = time.perf_counter() - start
        if self._recorder is not None:
            self._recorder.add(self._state, action, float(reward), next_state, terminated, truncated,
                               {k: bool(v) for k, v in flags.items()})
        if self._video is not None:
            self._video.add(self.env.render())
        self._step += 1
        self._return += float(reward)
        self._state = next_state
        if terminated or truncated:
            self._running = False
            self._finish_recording()
        self._publish(next_state, reward=float(reward), terminated=bool(terminated), truncated=bool(truncated),
                      ack=ack, action_seq=action_seq, flags=flags, env_info=env_info, step_s=step_s)

    def _publish(self, state: np.ndarray, *, reward: float, terminated: bool, truncated: bool, ack: int | None,
                 action_seq: int | None, flags: dict[str, Any], env_info: dict[str, Any], step_s: float,
                 extra: dict[str, Any] | None = None) -> None:
        scalars = {k: _scalar(v) for k, v in env_info.items()}
        info = {**flags, "sim_step_s": step_s, "episode_return": self._return, **vars(self.counters),
                "env": {k: v for k, v in scalars.items() if v is not None}, **(extra or {})}
        seq = self._next_seq()
        self._latest_obs_seq = seq
        # built from trusted values on the hot path: skip validation (the receiver validates anyway)
        frames = encode(ObservationMsg.model_construct(
            seq=seq, t=time.time(), ack=ack, session=self.session, episode=self._episode, step=self._step,
            action_seq=action_seq, reward=reward, terminated=terminated, truncated=truncated, info=info), [state])
        self._final_frames = frames if terminated or truncated else None
        if self._owner is not None:
            self._send_frames(self._owner, frames)

    def _with_push(self, flags: dict[str, Any], pushed: bool) -> dict[str, Any]:
        """`flags` with `pushed` when this sim pushes (so the flag names stay the same for the sim's life)."""
        return {**flags, "pushed": pushed} if self._perturb is not None and self._perturb.pushes_enabled else flags

    def metadata(self) -> dict[str, Any]:
        """What hello_reply's `metadata` carries: the perturbation in force and this episode's draws, if any."""
        return {"perturbation": self._perturb.report()} if self._perturb is not None else {}

    def _finish_recording(self) -> None:
        if self._recorder is not None:
            extra = {"episode": self._episode, **self.metadata()}
            path = self._recorder.finish(f"episode-{self.session}-{self._episode:05d}", extra)
            if path is not None:
                log.info("recorded %s", path)

    # ---- replies ----
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, peer: bytes, msg: _Message, arrays: list[np.ndarray] | tuple = ()) -> None:
        self._send_frames(peer, encode(msg, arrays))

    def _send_frames(self, peer: bytes, frames: list[bytes]) -> None:
        if self._capture is not None:
            self._capture.append(frames)
        if self._sock is None:  # listening again after the memory guard dropped every connection
            return
        try:
            self._sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as err:  # never block on a peer: a lost reply is what the client's timeout is for
            log.debug("reply to %s dropped: %s", _tag(peer), err)

    def _refuse(self, peer: bytes, code: str, message: str, ack: int | None) -> None:
        if code not in ("bad_action", "no_episode", "episode_over", "stale", "busy", "forbidden"):
            self.counters.bad_messages += 1
            self._log("bad_message", logging.WARNING, "bad message #%d from peer %s: [%s] %s",
                      self.counters.bad_messages, _tag(peer), code, message[:200])
        self._send(peer, ErrorMsg(seq=self._next_seq(), t=time.time(), ack=ack, code=code, message=_printable(message)))


def _flags(*, clipped: bool = False, rejected: str | None = None, watchdog: bool = False, held: bool = False,
           late: bool = False) -> dict[str, Any]:
    """The per-observation safety flags; `rejected` names why the action was refused."""
    return {"clipped": clipped, "rejected": rejected, "watchdog": watchdog, "held": held, "late": late}


def _scalar(value: Any) -> float | int | bool | None:
    """A JSON-safe scalar from an env info value, None for anything else (arrays stay on the robot)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return None


def is_stale_socket_file(path: Path) -> bool:
    """True only for a Unix socket file; anything else at an ipc path must never be deleted."""
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _remove_stale_ipc(bind: str) -> None:
    """ipc socket files outlive their process; remove one unless a live sim still answers on it."""
    path = Path(bind[len("ipc://"):])
    if not path.exists() and not path.is_symlink():
        return
    if not is_stale_socket_file(path):
        raise SimError(f"{path} exists and is not a socket: refusing to delete it for {bind}; "
                       f"choose another ipc path or remove the file yourself")
    # a plain connect tells a live listener from a dead one, whatever authentication the listener asks for
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        except OSError:
            pass
    raise SimError(f"another sim is already serving {bind}")


def _check_video_support() -> None:
    """Fail before serving, not after the first episode; rendering is headless (EGL) unless MUJOCO_GL says otherwise."""
    try:
        check_video_support("--render")
    except VideoError as err:
        raise SimError(str(err)) from None


def sim_from_cli(*, config: Path, bind: str | None, mode: str | None, render: Path | None, seed: int | None,
                 record: Path | None, server_key: Path | None = None, authorized: Path | None = None,
                 admin_key: Path | None = None, insecure: bool = False, sets: list[str] | None = None,
                 perturb: list[str] | None = None) -> int:
    """`maac-robot sim`: serve the config's env until SIGINT/SIGTERM or an admin's shutdown message.

    `perturb`: `--perturb KEY=VALUE` flags, merged over the config's `sim.perturb` (sim/perturb.py)."""
    from maac_robot.runtime.config import EnvConfig, SimConfig, load_section, merge_perturb, parse_set

    overrides, flags = parse_set(sets, {"env": EnvConfig, "sim": SimConfig})
    env = load_section(config, "env", EnvConfig, overrides, flags)
    sim = load_section(config, "sim", SimConfig, overrides, flags)
    sim.perturb = merge_perturb(sim.perturb, perturb)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # two I/O threads: one busy decoding a flooding peer leaves the other to carry the owner's traffic
    zmq.Context.instance(io_threads=2)
    server = SimServer(env.id, bind=bind or sim.bind, mode=mode or sim.mode,
                       seed=sim.seed if seed is None else seed, watchdog_periods=sim.watchdog_periods,
                       max_message_bytes=sim.max_message_bytes, max_episode_steps=env.max_episode_steps,
                       record_dir=record, render_path=render, owner_timeout_s=sim.owner_timeout_s,
                       server_key=server_key or sim.server_key, authorized=authorized or sim.authorized,
                       admin_key=admin_key or sim.admin_key, insecure=insecure or sim.insecure,
                       memory_headroom_mb=sim.memory_headroom_mb, perturb=sim.perturb)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    auth = "CURVE" if server._auth is not None else "no authentication"
    perturbed = f", perturbed: {sim.perturb.in_force()}" if not sim.perturb.nominal else ""
    print(f"sim: serving {server.env_id} ({server.mode}, dt={server.dt:g} s, {auth}{perturbed}) on "
          f"{server.endpoint}", flush=True)
    try:
        server.serve()
    finally:
        server.close()
    return 0
