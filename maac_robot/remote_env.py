"""A robot (or the sim) behind the wire protocol as a Gymnasium env: what `maac-robot train --connect` collects
its real data from, instead of an in-process env.

The learner never speaks the protocol (an import-linter contract): the CLI opens this env and hands the
Trainer a factory that returns it (`Trainer(cfg, run_dir, env_factory=...)`). Everything robot-specific stays
here and on the robot's side: the robot keeps its own safety (clipping, rejecting, its watchdog and safe
action); this env only reports what the robot did.

Connecting. The link opens like `maac-robot control`'s (`maac_robot.runtime.link`): the same CURVE options
(`--client-key` / `--server-public`, or `controller.client_key` / `controller.server_public`), timeouts
(`controller.timeout_periods`, `controller.retry_s`) and reconnect window (`controller.reconnect_s`). At
connect time the robot's hello must match the run: env id, state and action dims, action bounds and control
period of the run's `env.id` as this side builds it; otherwise one error names both sides.

Episodes. `reset(seed)` resets the robot with that seed (a lockstep sim then serves exactly the episode the
in-process env would); the run's `env.max_episode_steps` is applied here (a `TimeLimit`) on top of the robot's
own limit.

What a step returns, by mode:
* lockstep: each action advances the robot one control period and is answered by its observation: every step
  is one exact transition (the action the robot applied, after its clipping);
* realtime: the robot ticks on its own clock and applies the freshest action it has. The env sends the action
  and returns the next observation. The transition from the state acted on to that observation is exact when it
  is the robot's very next tick and that tick applied an action this env sent (its own, or the previous one
  held because this one came late: `info["applied_action"]` then says which). Otherwise (the learner was busy
  for more than a period, so ticks went by; the watchdog applied the safe action; the action was rejected) the
  step is returned with `info["transition"] = False`: the trainer does not store or count it, and acts next
  from the newest state. `describe()` counts these steps (`inexact_steps`).

A dropped link (the robot killed, the sim restarted, a timeout, the episode taken over by another controller):
`step` returns `truncated=True` with `info["link_lost"]` saying why and no transition (nothing of that step
is known to have happened). The next `reset` reconnects: it handshakes again (and checks the robot again) until
the robot answers, for at most `controller.reconnect_s` from the loss, then starts the next episode; when the
window closes it raises `LinkLost` (0 s, or `--no-reconnect`: at once).

Evaluation does not come here: the trainer evaluates in-process on the run's `env.id`, which it needs locally
anyway (dims, reward and termination), so evaluations repeat on the curve's reset seeds and never cut a training
episode or spend the robot's time; the metrics name both envs (`data_env` is `describe()`, `eval_env` in-process).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from maac_robot.envs import EnvInfo, env_info
from maac_robot.runtime import link
from maac_robot.runtime.config import ControllerConfig
from maac_robot.runtime.errors import UserError
from maac_robot.runtime.protocol import Observation, ProtocolError, RobotInfo, RobotTimeout

log = logging.getLogger("maac_robot.remote_env")

INTERRUPTING_ERRORS = ("no_episode", "episode_over", "busy", "internal")
"""Error replies to an action that mean this env's episode is gone on the robot's side (taken over after a
silence longer than the robot's owner timeout, ended by a robot-side failure): handled like a dropped link."""
RESEND_EVERY_PERIODS = 0.25
"""Realtime: while the next observation has not come, the action goes out again (same seq, applied at most
once) every quarter period, so one lost message does not cost the tick."""
MAX_INEXACT_IN_A_ROW = 100
"""Realtime: this many steps in a row that were not one robot tick each mean the learner cannot keep up with the
robot's period at all (every step takes longer than dt): an error saying so, instead of a run that never advances."""
_SENT_KEPT = 16  # realtime: recent actions by seq, to name the one a tick applied


class LinkLost(UserError):
    """The robot did not come back within the reconnect window (or reconnecting is off)."""


class RobotLinkEnv(gym.Env):
    """The robot at `endpoint`, checked against `expected` (the run's env), as a Gymnasium env."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, endpoint: str, expected: EnvInfo, cfg: ControllerConfig, *, reconnect: bool = True,
                 client_key: Path | None = None, server_public: Path | None = None, name: str = "trainer",
                 logger: logging.Logger | None = None) -> None:
        self.log = logger or log  # where reconnects are told (the CLI passes one that reaches train.log)
        self.expected = expected
        self.endpoint = endpoint
        self.reconnect_s = cfg.reconnect_s if reconnect else 0.0
        self.client = link.open_client(endpoint, cfg, expected.dt, name=name, client_key=client_key,
                                       server_public=server_public)
        try:
            self.robot: RobotInfo = link.handshake(self.client)
            link.check_robot(self.robot, expected, against="the run's config")
        except BaseException:
            self.client.close()
            raise
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (expected.state_dim,), np.float64)
        self.action_space = gym.spaces.Box(expected.act_low.astype(np.float32), expected.act_high.astype(np.float32),
                                           dtype=np.float32)
        self._low, self._high = self.robot.act_low, self.robot.act_high
        self._obs: Observation | None = None
        self._sent: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lost: str | None = None  # why the link dropped, until a reset reconnects
        self._lost_at = 0.0
        self._inexact_in_a_row = 0
        self.stats = {"steps": 0, "inexact_steps": 0, "interruptions": 0, "reconnects": 0, "episodes": 0}

    @property
    def realtime(self) -> bool:
        return self.robot.mode == "realtime"

    def describe(self) -> dict[str, Any]:
        """Where the data comes from, for the run's metrics and sessions (counts are this process's)."""
        return {"kind": "robot link", "endpoint": self.endpoint, "env_id": self.robot.env_id,
                "mode": self.robot.mode, "dt": self.robot.dt, "robot_session": self.robot.session,
                "robot_metadata": dict(self.robot.metadata), **self.stats}

    # ---- Gymnasium API -------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        while True:
            if self._lost is not None:
                self._reconnect()
            try:
                obs = link.reset_owned(self.client, seed, self.robot.owner_timeout_s + 1.0,
                                       notify=lambda what: self.log.warning("%s: %s", self.endpoint, what))
            except RobotTimeout as err:
                self._lose(f"reset: {err}")
                continue
            except ProtocolError as err:
                if err.code not in INTERRUPTING_ERRORS:
                    raise
                self._lose(f"reset: {err}")
                continue
            self._obs = obs
            self._sent.clear()
            self.stats["episodes"] += 1
            return np.array(obs.state), {"robot_episode": obs.episode, "robot_session": obs.session}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs = self._obs
        if obs is None or self._lost is not None:
            raise UserError("RobotLinkEnv.step before reset (or after the link dropped): call reset()")
        sent = np.minimum(np.maximum(np.asarray(action, dtype=np.float64).reshape(self._low.shape), self._low),
                          self._high)  # what the robot applies after its own clipping
        try:
            nxt, applied = self._step_realtime(obs, sent) if self.realtime else self._step_lockstep(sent)
        except RobotTimeout as err:
            return self._interrupted(str(err))
        except ProtocolError as err:
            if err.code not in INTERRUPTING_ERRORS:
                raise
            return self._interrupted(str(err))
        if nxt.session != obs.session:
            return self._interrupted(f"the robot at {self.endpoint} restarted (a new session)")
        self._obs = nxt
        self.stats["steps"] += 1
        info: dict[str, Any] = {"robot_episode": nxt.episode, "robot_step": nxt.step}
        why = self._inexact(obs, nxt, applied)
        if why is not None:
            self.stats["inexact_steps"] += 1
            self._inexact_in_a_row += 1
            if self._inexact_in_a_row >= MAX_INEXACT_IN_A_ROW:
                raise UserError(f"{self._inexact_in_a_row} steps in a row from the real-time robot at {self.endpoint} "
                                f"were not one tick each (last: {why}): the learner takes longer than the robot's "
                                f"period ({self.robot.dt * 1e3:.1f} ms) between actions. Train against a lockstep "
                                f"sim, or make the steps cheaper (agent.updates_per_step, a smaller model)")
            info.update(transition=False, inexact=why)
        else:
            self._inexact_in_a_row = 0
            if applied is not sent:
                info["applied_action"] = applied.astype(np.float32)
        return np.array(nxt.state), float(nxt.reward), bool(nxt.terminated), bool(nxt.truncated), info

    def close(self) -> None:
        self.client.close()

    # ---- one step, by mode ----------------------------------------------------------------------

    def _step_lockstep(self, sent: np.ndarray) -> tuple[Observation, np.ndarray | None]:
        nxt = self.client.step(sent)
        return nxt, (None if nxt.info.get("rejected") else sent)

    def _step_realtime(self, obs: Observation, sent: np.ndarray) -> tuple[Observation, np.ndarray | None]:
        seq = self.client.send_action(sent, obs_seq=obs.seq)
        self._sent[seq] = sent
        while len(self._sent) > _SENT_KEPT:
            self._sent.popitem(last=False)
        dt = self.robot.dt
        deadline = time.monotonic() + self.client.timeout_s
        while True:
            nxt = self.client.latest_observation(max(0.0, min(RESEND_EVERY_PERIODS * dt, deadline - time.monotonic())))
            if nxt is not None:
                break
            if time.monotonic() >= deadline:
                raise link.RobotLost(f"no observation from {self.endpoint} for {self.client.timeout_s:.3g} s")
            self.client.resend_action()
        flagged = nxt.info.get("watchdog") or nxt.info.get("rejected")
        return nxt, (None if flagged or nxt.action_seq is None else self._sent.get(nxt.action_seq))

    @staticmethod
    def _inexact(obs: Observation, nxt: Observation, applied: np.ndarray | None) -> str | None:
        """Why (obs.state, applied, nxt) is not one robot transition, or None when it is."""
        if nxt.step != obs.step + 1:
            return f"robot step {obs.step} -> {nxt.step}: ticks went by while the learner was busy"
        if applied is None:
            return "the robot applied an action this env did not send (watchdog, safe or rejected action)"
        return None

    # ---- losing and finding the robot --------------------------------------------------------------

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost, self._lost_at = why, time.monotonic()
            self.stats["interruptions"] += 1

    def _interrupted(self, why: str) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """The step that dropped: no transition, the episode truncated; the next reset reconnects."""
        assert self._obs is not None
        self._lose(why)
        state = np.array(self._obs.state)
        self._obs = None
        return state, 0.0, False, True, {"link_lost": why}

    def _reconnect(self) -> None:
        """Handshake until the robot answers (and still matches the run), within `reconnect_s` of the loss."""
        why = self._lost
        if self.reconnect_s <= 0:
            raise LinkLost(f"lost the robot at {self.endpoint} ({why}); not reconnecting (controller.reconnect_s "
                           f"is 0 or --no-reconnect)")
        remaining = self.reconnect_s - (time.monotonic() - self._lost_at)
        self.log.warning("lost the robot at %s (%s); reconnecting for up to %.1f s more (controller.reconnect_s)",
                         self.endpoint, why, max(0.0, remaining))
        try:
            if remaining <= 0:
                raise link.RobotLost("the reconnect window has closed")
            self.robot = link.reconnect(self.client, self.expected, remaining, against="the run's config")
        except link.RobotLost:
            raise LinkLost(f"lost the robot at {self.endpoint} ({why}); it did not come back within "
                           f"{self.reconnect_s:g} s (controller.reconnect_s)") from None
        self._low, self._high = self.robot.act_low, self.robot.act_high
        self._lost = None
        self.stats["reconnects"] += 1
        self.log.warning("reconnected to %s after %.1f s: %s (%s), robot session %s", self.endpoint,
                         time.monotonic() - self._lost_at, self.robot.env_id, self.robot.mode, self.robot.session)


def connect(endpoint: str, env_id: str, max_episode_steps: int | None, cfg: ControllerConfig, *,
            reconnect: bool = True, client_key: Path | None = None, server_public: Path | None = None,
            logger: logging.Logger | None = None) -> gym.Env:
    """The robot at `endpoint` as the run's env: checked against `env_id` (as `envs.env_info` builds it), with the
    run's time limit. Raises at once (RobotTimeout, UserError) when the robot does not answer or disagrees."""
    env: gym.Env = RobotLinkEnv(endpoint, env_info(env_id), cfg, reconnect=reconnect, client_key=client_key,
                                server_public=server_public, logger=logger)
    if max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps)
    return env
