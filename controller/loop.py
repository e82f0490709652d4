"""The control loop: owns timing, fallback and telemetry around the pure planner.

Every step: (1) the deterministic policy action is computed first (tens of µs) and is the
fallback; (2) with the CEM planner, planning runs on one worker thread while this thread waits
until the planning deadline (`budget_frac`·dt after the observation arrived). The planner starts
another pass only while the time left exceeds the slowest recent pass (`keep_going`), so it
normally returns early; if a pass overruns anyway (a slow or stalled scorer, an OS hiccup), the
deadline wins: this thread sends the policy action, tells the worker to stop, and counts a
fallback. onnxruntime releases the GIL while it computes, so the wait costs nothing.
A planning exception or a non-finite result is likewise replaced by the policy action and
counted — a non-finite action is never sent; every action sent is clipped to the bounds.
Without a deadline (lockstep evaluation) planning runs all iterations inline, reproducibly.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from maac_robot.config import ControllerConfig
from maac_robot.errors import UserError

from controller.planner import NonFiniteError, Plan, cem_plan, policy_prior, shift

FALLBACKS = ("budget", "late", "busy", "nonfinite", "error")
"""Why a step used the policy action instead of a plan: no CEM pass fitted in the time left; the
deadline passed mid-pass; the worker was still finishing an overrun pass from an earlier step;
NaN/inf from the model; any other exception (the latest is kept in `Controller.last_error`)."""
PASS_WINDOW_S = 1.0
PASS_QUANTILE = 90
"""The per-pass cost estimate is the 90th percentile of the passes of the last second (their max while
fewer than 10). On a shared 2-core machine a few % of passes take 10x the median; planning around
the max would rarely start a pass, while a rare overrun only costs one policy-action step (the
deadline still wins). Old passes expire, so a slow spell does not disable planning for good."""


class ControllerError(UserError):
    """The controller cannot produce a safe action (e.g. the policy graph itself returns NaN)."""


@dataclass
class StepRecord:
    """Telemetry of one control step."""

    latency: float  # seconds from observation receipt to action ready
    iterations: int  # CEM refits completed (0 for the policy planner or a fallback)
    fallback: str | None = None  # one of FALLBACKS, or None
    score: float = np.nan  # ensemble-mean predicted return of the executed sequence
    policy_score: float = np.nan  # same, of the policy's own sequence
    missed: bool = False  # action sent later than one control period after the observation


@dataclass
class Telemetry:
    """Per-step records plus robot-side counters; `summary()` is what `control` prints."""

    records: list[StepRecord] = field(default_factory=list)
    held_ticks: int = 0  # realtime robot ticks that found no fresh action (robot-side deadline misses)
    dropped_observations: int = 0

    def summary(self) -> dict[str, Any]:
        lat = np.array([r.latency for r in self.records]) * 1e3
        its = np.array([r.iterations for r in self.records])
        out: dict[str, Any] = {
            "steps": len(self.records),
            "latency_ms_median": float(np.median(lat)) if len(lat) else np.nan,
            "latency_ms_p99": float(np.percentile(lat, 99)) if len(lat) else np.nan,
            "latency_ms_max": float(lat.max()) if len(lat) else np.nan,
            "iterations_mean": float(its.mean()) if len(its) else np.nan,
            "iterations_min": int(its.min()) if len(its) else 0,
            "deadline_misses": sum(r.missed for r in self.records),
            "held_ticks": self.held_ticks,
            "dropped_observations": self.dropped_observations,
        }
        out.update({f"fallback_{k}": sum(r.fallback == k for r in self.records) for k in FALLBACKS})
        return out

    def format(self) -> str:
        s = self.summary()
        falls = ", ".join(f"{k} {s[f'fallback_{k}']}" for k in FALLBACKS)
        return (f"{s['steps']} steps | planning latency median {s['latency_ms_median']:.2f} ms, "
                f"p99 {s['latency_ms_p99']:.2f} ms, max {s['latency_ms_max']:.2f} ms | CEM iterations mean "
                f"{s['iterations_mean']:.2f}, min {s['iterations_min']} | deadline misses {s['deadline_misses']}, "
                f"robot held ticks {s['held_ticks']}, dropped observations {s['dropped_observations']} | "
                f"fallbacks: {falls}")


class Controller:
    """Policy or CEM-MPC action selection with a deadline, over an `Artifacts`-shaped object.

    `artifacts` needs `.manifest` (act_low, act_high, act_dim, plan_horizon, num_elites, elites),
    `.policy(state, noise)`, `.ensemble(state, action)` and `.plan(state, actions)`.
    """

    def __init__(self, artifacts: Any, cfg: ControllerConfig, planner: Literal["cem", "policy"],
                 rng: np.random.Generator, clock: Callable[[], float] = time.perf_counter) -> None:
        m = artifacts.manifest
        if cfg.horizon is not None and cfg.horizon != m.plan_horizon:
            raise UserError(f"controller.horizon={cfg.horizon} but the artifacts' plan graph has a fixed horizon "
                            f"of {m.plan_horizon}; leave controller.horizon unset or re-export with plan_horizon "
                            f"{cfg.horizon}")
        self.artifacts, self.cfg, self.planner, self.rng, self.clock = artifacts, cfg, planner, rng, clock
        self.low = np.asarray(m.act_low, np.float64)
        self.high = np.asarray(m.act_high, np.float64)
        self.horizon, self.num_elites = m.plan_horizon, m.num_elites
        self.num_policy_samples = round(cfg.policy_frac * cfg.population)
        room = -(-cfg.population // m.num_elites) * m.num_elites - 2 * m.num_elites - self.num_policy_samples
        if planner == "cem" and room < 1:
            raise UserError(f"controller.population={cfg.population} leaves no room for Gaussian samples next to "
                            f"2 anchors x {m.num_elites} elites and {self.num_policy_samples} policy samples "
                            f"(policy_frac={cfg.policy_frac}); raise population")
        self._elites = np.asarray(m.elites)
        self._zero_noise = np.zeros((1, m.act_dim), np.float32)
        self._pass_times: deque[tuple[float, float]] = deque(maxlen=4096)  # (end time, duration) of CEM passes
        self.last_error: str | None = None
        self._previous: np.ndarray | None = None  # last executed plan (pre-tanh), for the shifted warm start
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cem")
        self._running: concurrent.futures.Future[Plan] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def reset(self) -> None:
        """Forget the previous plan (a new episode starts from an unrelated state)."""
        self._previous = None

    def _model_step(self, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        return self.artifacts.ensemble(state, action)["next_state_mean"][self._elites].mean(axis=0)

    def _plan(self, state: np.ndarray, keep_going: Callable[[], bool]) -> Plan:
        prior = policy_prior(self.artifacts.policy, self._model_step, state, len(self.low), self.horizon,
                             self.num_policy_samples, self.rng)
        warm = shift(self._previous, prior) if self._previous is not None else None
        plan = cem_plan(self.artifacts.plan, state, prior, warm, self.cfg, self.num_elites, self.low, self.high,
                        self.rng, keep_going, self.clock)
        now = self.clock()  # recorded here, on the worker, so passes of an abandoned (late) plan count too
        self._pass_times.extend((now, t) for t in plan.iteration_seconds)
        return plan

    def warm_up(self, state: np.ndarray, steps: int = 3) -> None:
        """Plan a few times without a deadline to measure the per-pass cost before real time starts."""
        if self.planner == "cem":
            for i in range(steps + 1):
                self._plan(np.asarray(state, np.float32), lambda: True)
                if i == 0:
                    self._pass_times.clear()  # the first plan pays one-off allocation costs: not a sample
        self.reset()

    def pass_estimate(self) -> float:
        """Predicted duration of the next CEM pass, from the passes of the last PASS_WINDOW_S seconds."""
        since = self.clock() - PASS_WINDOW_S
        recent = [t for end, t in list(self._pass_times) if end >= since]
        if len(recent) < 10:
            return max(recent, default=0.0)
        return float(np.percentile(recent, PASS_QUANTILE))

    def act(self, state: np.ndarray, deadline: float | None = None,
            received: float | None = None) -> tuple[np.ndarray, StepRecord]:
        """The action for `state`, ready before `deadline` (a `clock` time; None: no deadline, all iterations).

        `received` is when the observation arrived (`clock` time; default now), the start of the latency.
        """
        start = self.clock() if received is None else received
        state = np.asarray(state, np.float32)
        fallback = self._policy_action(state)
        if self.planner == "policy":
            return fallback, StepRecord(latency=self.clock() - start, iterations=0)
        plan, why = self._try_plan(state, deadline)
        if plan is not None and not np.isfinite(plan.action).all():
            plan, why = None, "nonfinite"
        if plan is not None and plan.iterations == 0:
            plan, why = None, "budget"
        if plan is None:
            self._previous = None
            return fallback, StepRecord(latency=self.clock() - start, iterations=0, fallback=why)
        self._previous = plan.sequence
        action = np.clip(plan.action, self.low, self.high)
        return action, StepRecord(latency=self.clock() - start, iterations=plan.iterations, score=plan.score,
                                  policy_score=plan.policy_score)

    def _policy_action(self, state: np.ndarray) -> np.ndarray:
        action = np.asarray(self.artifacts.policy(state[None], self._zero_noise)[2][0], np.float64)
        if not np.isfinite(action).all():
            raise ControllerError(f"the policy graph returned a non-finite action {action} for state {state}; "
                                  f"the artifacts are broken or the state is far outside the training data")
        return np.clip(action, self.low, self.high)

    def _try_plan(self, state: np.ndarray, deadline: float | None) -> tuple[Plan | None, str | None]:
        try:
            if deadline is None:
                return self._plan(state, lambda: True), None
            if self._running is not None and not self._running.done():
                return None, "busy"
            stop = threading.Event()

            def keep_going() -> bool:
                return not stop.is_set() and deadline - self.clock() > self.pass_estimate()

            self._running = self._pool.submit(self._plan, state, keep_going)
            try:
                return self._running.result(timeout=max(0.0, deadline - self.clock())), None
            except concurrent.futures.TimeoutError:
                stop.set()
                return None, "late"
        except NonFiniteError as err:
            self.last_error = f"NonFiniteError: {err}"
            return None, "nonfinite"
        except Exception as err:  # noqa: BLE001 - any planning failure must fall back to the policy, not stop the robot
            self.last_error = f"{type(err).__name__}: {err}"
            return None, "error"
