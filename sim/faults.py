"""Fault injection for the robot link: a proxy that loses messages, for testing controllers and robot drivers.

`LossyProxy` sits between controllers and a robot (sim or driver): controllers connect to its
`endpoint`, it forwards every message to the robot and back, and drops each one with probability
`loss` in either direction, or only in one (`direction`; its own seeded RNG, so a run is
repeatable). Each controller is
forwarded on its own connection under its own routing id, so the robot still tells controllers
apart and episode ownership works through the proxy. Loopback only; it runs in a thread until
`stop()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zmq

_MAX_PEERS = 64  # a proxy for tests and benchmarks: a bounded number of controller connections


@dataclass
class LossCounters:
    forwarded: int = 0
    dropped: int = 0


class LossyProxy:
    """Forwards between controllers (connecting to `endpoint`) and the robot at `robot`, losing a share `loss`."""

    def __init__(self, robot: str, loss: float, *, seed: int = 0, bind: str = "tcp://127.0.0.1:*",
                 direction: Literal["both", "to_robot", "from_robot"] = "both",
                 context: zmq.Context | None = None) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        if direction not in ("both", "to_robot", "from_robot"):
            raise ValueError(f"direction must be both, to_robot or from_robot, got {direction!r}")
        self.robot, self.loss, self.direction = robot, loss, direction
        self.counters = LossCounters()
        self._rng = np.random.default_rng(seed)
        self._ctx = context or zmq.Context.instance()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        self._front.bind(bind)
        self.endpoint = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._backs: dict[bytes, zmq.Socket] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-proxy", daemon=True)

    def start(self) -> LossyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(5)  # the thread closes the sockets
        else:
            self._front.close(linger=0)

    def _lost(self, to_robot: bool) -> bool:
        if self.direction != "both" and (self.direction == "to_robot") != to_robot:
            return False
        return self.loss > 0 and self._rng.random() < self.loss

    def _back(self, peer: bytes, poller: zmq.Poller) -> zmq.Socket | None:
        sock = self._backs.get(peer)
        if sock is None and len(self._backs) < _MAX_PEERS:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, peer)
            sock.connect(self.robot)
            poller.register(sock, zmq.POLLIN)
            self._backs[peer] = sock
        return sock

    def _forward(self, frames: list[bytes], send: zmq.Socket, prefix: list[bytes]) -> None:
        if self._lost(to_robot=not prefix):
            self.counters.dropped += 1
            return
        self.counters.forwarded += 1
        try:
            send.send_multipart([*prefix, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters.dropped += 1

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                for sock, _ in poller.poll(20):
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                    if sock is self._front:
                        back = self._back(frames[0], poller)
                        if back is not None:
                            self._forward(frames[1:], back, [])
                    else:
                        peer = sock.getsockopt(zmq.ROUTING_ID)
                        self._forward(frames, self._front, [peer])
        finally:
            for sock in self._backs.values():
                sock.close(linger=0)
            self._front.close(linger=0)


@contextmanager
def lossy_proxy(robot: str, loss: float, *, seed: int = 0,
                direction: Literal["both", "to_robot", "from_robot"] = "both") -> Iterator[LossyProxy]:
    """A running `LossyProxy`, always stopped."""
    proxy = LossyProxy(robot, loss, seed=seed, direction=direction).start()
    try:
        yield proxy
    finally:
        proxy.stop()
