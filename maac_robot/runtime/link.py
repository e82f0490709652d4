"""Opening a link to a robot (or the sim): shared by the controller (`maac-robot control`) and the training env
(`maac-robot train --connect`, `maac_robot.remote_env`), so both connect, authenticate, check and reconnect alike.

* `open_client`: a `RobotClient` with the CURVE keys of the command line or the config's `controller` section
  (both or neither) and its timeouts (`controller.timeout_periods` control periods, at least 1 s; resends after
  `controller.retry_s`);
* `handshake`: `hello`, with a hint about keys when a CURVE link stays silent;
* `check_robot`: refuse a robot whose env id, spaces, bounds or period differ from what this side expects
  (the artifacts' manifest, or the env of a run's config), naming both;
* `reset_owned`: a reset that waits while another controller still owns the robot's episode;
* `reconnect`: handshake again (and check) until the robot answers or the reconnect window closes.

Torch-free and Gymnasium-free: a robot computer imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from maac_robot.runtime.auth import client_curve
from maac_robot.runtime.config import ControllerConfig
from maac_robot.runtime.errors import UserError
from maac_robot.runtime.protocol import Observation, ProtocolError, RobotClient, RobotInfo, RobotTimeout


class RobotLost(RobotTimeout):
    """The robot stopped publishing, or restarted (a new session), in the middle of an episode."""


def open_client(endpoint: str, cfg: ControllerConfig, dt: float, *, name: str, client_key: Path | None = None,
                server_public: Path | None = None) -> RobotClient:
    """A client for `endpoint`: CURVE keys from the flags, else from `cfg` (both or neither); a reply is awaited
    for `cfg.timeout_periods` periods of `dt` (at least 1 s), an unanswered request resent every `cfg.retry_s`."""
    curve = client_curve(client_key or cfg.client_key, server_public or cfg.server_public)
    return RobotClient(endpoint, timeout_s=max(1.0, cfg.timeout_periods * dt), name=name, retry_s=cfg.retry_s,
                       curve=curve)


def handshake(client: RobotClient) -> RobotInfo:
    """`client.hello()`; a silent robot over CURVE is also said to be a possible key mismatch."""
    try:
        return client.hello()
    except RobotTimeout as err:
        if client.curve is None:
            raise
        raise RobotTimeout(f"{err}; with CURVE keys a silent robot may also mean this client's key (--client-key) "
                           f"is not in the robot's authorized directory, or --server-public is not the robot's key") \
            from None


def check_robot(info: RobotInfo, expected: Any, against: str = "artifacts") -> None:
    """Refuse a robot whose env, spaces, bounds or period disagree with `expected` (anything with env_id,
    state_dim, act_dim, act_low, act_high and dt: a manifest, an `EnvInfo`), in one line naming both sides."""
    problems = []
    if info.env_id != expected.env_id:
        problems.append(f"env {info.env_id!r} vs {against} {expected.env_id!r}")
    if (info.state_dim, info.act_dim) != (expected.state_dim, expected.act_dim):
        problems.append(f"state/action dims {info.state_dim}/{info.act_dim} vs {expected.state_dim}/{expected.act_dim}")
    elif not (np.allclose(info.act_low, expected.act_low) and np.allclose(info.act_high, expected.act_high)):
        problems.append(f"action bounds {info.act_low}..{info.act_high} vs {expected.act_low}..{expected.act_high}")
    if not np.isclose(info.dt, expected.dt):
        problems.append(f"dt {info.dt} vs {expected.dt}")
    if problems:
        raise UserError(f"robot and {against} disagree: " + "; ".join(problems))


def reset_owned(client: RobotClient, seed: int | None, wait_s: float,
                notify: Callable[[str], None] | None = None) -> Observation:
    """`client.reset(seed)`, waiting up to `wait_s` while another controller still owns the robot's episode
    (`notify` is told once that it waits)."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return client.reset(seed)
        except ProtocolError as err:
            if err.code != "busy" or time.monotonic() > deadline:
                raise
            if not told and notify is not None:
                notify(f"robot busy ({err}); waiting up to {wait_s:.1f} s")
            told = True
            time.sleep(0.1)


def reconnect(client: RobotClient, expected: Any, within_s: float, against: str = "artifacts",
              setting: str = "controller.reconnect_s") -> RobotInfo:
    """Handshake again until the robot answers (a restarted sim, a healed link) or `within_s` passes
    (RobotLost); a robot that answers but disagrees with `expected` is refused at once (UserError)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            info = client.hello()
            check_robot(info, expected, against)
            return info
        except RobotTimeout:
            if time.monotonic() > deadline:
                raise RobotLost(f"the robot at {client.endpoint} did not come back within {within_s:g} s "
                                f"({setting})") from None
