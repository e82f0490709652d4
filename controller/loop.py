"""The control loop: owns timing, fallback and telemetry around the pure planner.

Every step: (1) the deterministic policy action is computed first (tens of µs) and is the
fallback; (2) with the CEM planner, planning runs on one worker thread while this thread waits
until the planning deadline (`budget_frac`·dt after the observation arrived). The planner starts
another pass only while the time left exceeds the slowest recent pass (`keep_going`), so it
normally returns early; if a pass overruns anyway (a slow or stalled scorer, an OS hiccup), the
deadline wins: this thread sends the policy action, tells the worker to stop, and counts a
fallback. onnxruntime releases the GIL while it computes, so the wait costs nothing.
A planning exception, a non-finite result or a graph output of the wrong shape is likewise
replaced by the policy action and counted — a non-finite or wrong-length action is never sent;
every action sent is clipped to the bounds. The policy action itself has no fallback: a policy
graph returning NaN or the wrong shape stops the controller with a ControllerError.
Without a deadline (lockstep evaluation) planning runs all iterations inline, reproducibly.

Uncertainty guard (`controller.guard`, the manifest's `guard`): once the action is chosen, one
`ensemble.onnx` call measures the elites' disagreement about the next state of (state, action)
(`maac_robot.runtime.guard.disagreement`; with `guard_steps` k > 1 also along the plan's next k-1
actions, the max). Above the calibrated threshold the step sends the policy action ('policy') or the
safe action ('safe': zero clipped into the bounds, what the robot applies to a bad action) and is
counted as guarded: the model is outside the data it was fitted on, so its plan is not to be trusted.
In 'policy' mode a step that already sends the policy action (the policy planner, a planning fallback)
is counted but sends the same action. A non-finite or failing ensemble call counts as above.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from maac_robot.runtime.config import ControllerConfig
from maac_robot.runtime.errors import UserError
from maac_robot.runtime.guard import DEFINITION, disagreement

from controller.planner import NonFiniteError, Plan, ShapeError, cem_plan, policy_prior, shift, squash

FALLBACKS = ("budget", "late", "busy", "nonfinite", "shape", "error")
"""Why a step used the policy action instead of a plan: no CEM pass fitted in the time left; the
deadline passed mid-pass; the worker was still finishing an overrun pass from an earlier step;
NaN/inf from the model; a graph output (policy rollout, ensemble, plan) or the planned action of
the wrong shape; any other exception. The latest failure is kept in `Controller.last_error`."""
PASS_WINDOW_S = 1.0
PASS_QUANTILE = 90
"""The per-pass cost estimate is the 90th percentile of the passes of the last second (their max while
fewer than 10). On a shared 2-core machine a few % of passes take 10x the median; planning around
the max would rarely start a pass, while a rare overrun only costs one policy-action step (the
deadline still wins). Old passes expire, so a slow spell does not disable planning for good."""


class ControllerError(UserError):
    """The controller cannot produce a safe action (the policy graph itself returns NaN or the wrong shape)."""


@dataclass
class StepRecord:
    """Telemetry of one control step."""

    latency: float  # seconds from observation receipt to action ready
    iterations: int  # CEM refits completed (0 for the policy planner or a fallback)
    fallback: str | None = None  # one of FALLBACKS, or None
    score: float = np.nan  # ensemble-mean predicted return of the executed sequence
    policy_score: float = np.nan  # same, of the policy's own sequence
    missed: bool = False  # action sent later than one control period after the observation
    disagreement: float = np.nan  # the guard's measure of the chosen action (nan: guard off or unavailable)
    guarded: bool = False  # disagreement above the guard threshold: the guard's fallback was sent


@dataclass
class Telemetry:
    """Per-step records plus robot-side counters; `summary()` is what `control` prints."""

    records: list[StepRecord] = field(default_factory=list)
    held_ticks: int = 0  # realtime robot ticks that found no fresh action (robot-side deadline misses)
    dropped_observations: int = 0
    missing_observations: int = 0  # realtime periods without a new observation (lost): the action was resent

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
            "missing_observations": self.missing_observations,
            "dropped_observations": self.dropped_observations,
        }
        out.update({f"fallback_{k}": sum(r.fallback == k for r in self.records) for k in FALLBACKS})
        guarded = sum(r.guarded for r in self.records)
        dis = np.array([r.disagreement for r in self.records])
        dis = dis[np.isfinite(dis)]
        out.update({
            "guarded": guarded,
            "guarded_share": guarded / len(self.records) if self.records else np.nan,
            "disagreement_mean": float(dis.mean()) if len(dis) else np.nan,
            "disagreement_p99": float(np.percentile(dis, 99)) if len(dis) else np.nan,
            "disagreement_max": float(dis.max()) if len(dis) else np.nan,
        })
        return out

    def format(self) -> str:
        s = self.summary()
        falls = ", ".join(f"{k} {s[f'fallback_{k}']}" for k in FALLBACKS)
        return (f"{s['steps']} steps | planning latency median {s['latency_ms_median']:.2f} ms, "
                f"p99 {s['latency_ms_p99']:.2f} ms, max {s['latency_ms_max']:.2f} ms | CEM iterations mean "
                f"{s['iterations_mean']:.2f}, min {s['iterations_min']} | deadline misses {s['deadline_misses']}, "
                f"robot held ticks {s['held_ticks']}, dropped observations {s['dropped_observations']}, "
                f"missing observations {s['missing_observations']} | "
                f"fallbacks: {falls} | guarded {s['guarded']} ({100 * s['guarded_share']:.1f} %), disagreement "
                f"mean {s['disagreement_mean']:.4g}, p99 {s['disagreement_p99']:.4g}, max {s['disagreement_max']:.4g}")


def guard_threshold(manifest: Any, cfg: ControllerConfig) -> tuple[float | None, str]:
    """The disagreement above which the guard overrides (None: no guard) and a line saying why."""
    spec = getattr(manifest, "guard", None)
    if cfg.guard == "off":
        return None, "guard off (controller.guard)"
    if spec is None:
        return None, ("guard disabled: the artifacts have no guard threshold (exported before the guard, or with "
                      "fewer than 2 elites); re-export the run to calibrate one")
    if spec.definition != DEFINITION:
        return None, (f"guard disabled: the artifacts' threshold bounds {spec.definition!r}, this controller "
                      f"measures {DEFINITION!r}; re-export the run with this version")
    threshold = spec.threshold * cfg.guard_scale
    return threshold, (f"guard {cfg.guard}: disagreement threshold {threshold:.4g} (p{spec.percentile:g} of "
                       f"{spec.samples} training pairs x margin {spec.margin:g} x guard_scale {cfg.guard_scale:g}), "
                       f"{cfg.guard_steps} step(s) checked")


GRAPHS = ("policy", "ensemble", "plan")  # the artifact graphs a Controller calls (q.onnx is the learner's)


class Controller:
    """Policy or CEM-MPC action selection with a deadline, over an `Artifacts`-shaped object.

    `artifacts` needs `.manifest` (act_low, act_high, act_dim, plan_horizon, num_elites, elites),
    `.policy(state, noise)`, `.ensemble(state, action)` and `.plan(state, actions)`.
    """

    def __init__(self, artifacts: Any, cfg: ControllerConfig, planner: Literal["cem", "policy"],
                 rng: np.random.Generator, clock: Callable[[], float] = time.perf_counter) -> None:
        m = artifacts.manifest
        self.artifacts, self.cfg, self.planner, self.rng, self.clock = artifacts, cfg, planner, rng, clock
        self.low = np.asarray(m.act_low, np.float64)
        self.high = np.asarray(m.act_high, np.float64)
        self.horizon, self.num_elites = m.plan_horizon, m.num_elites
        self.state_dim, self.act_dim, self.num_models = m.state_dim, m.act_dim, m.num_models
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
        # plans that failed during `warm_up`, by FALLBACKS reason: warm-up must not stop the controller
        # (run time falls back per step), but a model that fails already there is worth reporting
        self.warm_up_fallbacks: Counter[str] = Counter()
        self._previous: np.ndarray | None = None  # last executed plan (pre-tanh), for the shifted warm start
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cem")
        self._running: concurrent.futures.Future[Plan] | None = None
        self.guard_threshold, self.guard_note = guard_threshold(m, cfg)
        spec = getattr(m, "guard", None)
        self._guard_scale = None if self.guard_threshold is None else np.asarray(spec.scale, np.float64)
        self.safe_action = np.clip(np.zeros(self.act_dim), self.low, self.high)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def reset(self) -> None:
        """Forget the previous plan (a new episode starts from an unrelated state)."""
        self._previous = None

    def _policy_batch(self, state: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The policy graph for the planner's rollout, its outputs checked to be [B, act_dim] each."""
        outputs = self.artifacts.policy(state, noise)
        expected = (len(state), self.act_dim)
        for name, value in zip(("mean", "log_std", "action"), outputs, strict=True):
            if np.shape(value) != expected:
                raise ShapeError(f"policy graph returned {name} of shape {np.shape(value)} for {len(state)} "
                                 f"states, expected {expected} [batch, act_dim]")
        return outputs

    def _model_step(self, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The elite members' mean next state [B, S], the ensemble output checked to be [M, B, S] and finite."""
        mean = np.asarray(self.artifacts.ensemble(state, action)["next_state_mean"])
        expected = (self.num_models, len(state), self.state_dim)
        if mean.shape != expected:
            raise ShapeError(f"ensemble graph returned next_state_mean of shape {mean.shape}, expected {expected} "
                             f"[num_models, batch, state_dim]")
        if not np.isfinite(mean).all():
            raise NonFiniteError(f"ensemble graph returned non-finite next_state_mean for "
                                 f"{int((~np.isfinite(mean)).any(axis=(0, 2)).sum())} of {len(state)} states")
        return mean[self._elites].mean(axis=0)

    def predict(self, state: np.ndarray, action: np.ndarray) -> np.ndarray | None:
        """The next state the model expects (elite mean), standing in for a lost observation.

        None when the ensemble's output is unusable (wrong shape, NaN/inf): then the caller acts on
        the newest real observation instead.
        """
        try:
            batch = self._model_step(np.asarray(state, np.float32)[None], np.asarray(action, np.float32)[None])
        except (NonFiniteError, ShapeError, ValueError) as err:
            self.last_error = f"{type(err).__name__}: {err}"
            return None
        return batch[0]

    def _plan(self, state: np.ndarray, keep_going: Callable[[], bool]) -> Plan:
        prior = policy_prior(self._policy_batch, self._model_step, state, self.act_dim, self.horizon,
                             self.num_policy_samples, self.rng)
        warm = shift(self._previous, prior) if self._previous is not None else None
        plan = cem_plan(self.artifacts.plan, state, prior, warm, self.cfg, self.num_elites, self.low, self.high,
                        self.rng, keep_going, self.clock)
        now = self.clock()  # recorded here, on the worker, so passes of an abandoned (late) plan count too
        self._pass_times.extend((now, t) for t in plan.iteration_seconds)
        return plan

    def warm_up(self, state: np.ndarray, steps: int = 3) -> None:
        """Plan a few times without a deadline to measure the per-pass cost before real time starts.

        The policy action is checked first, so a broken policy graph stops the controller (ControllerError)
        before the robot moves. A failing plan does not: it is counted in `warm_up_fallbacks` (and kept
        in `last_error`) and every step at run time falls back to the policy action while planning fails.
        """
        state = np.asarray(state, np.float32)
        self._policy_action(state)
        if self.planner == "cem":
            for i in range(steps + 1):
                _, why = self._checked_plan(state, None)
                if why is not None:
                    self.warm_up_fallbacks[why] += 1
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
        plan, why = (None, None) if self.planner == "policy" else self._checked_plan(state, deadline)
        if plan is None:
            if self.planner == "cem":
                self._previous = None
            action, record = fallback, StepRecord(latency=0.0, iterations=0, fallback=why)
            plan_tail = None
        else:
            self._previous = plan.sequence
            action = np.clip(plan.action, self.low, self.high)
            record = StepRecord(latency=0.0, iterations=plan.iterations, score=plan.score,
                                policy_score=plan.policy_score)
            plan_tail = plan.sequence[1:self.cfg.guard_steps]
        if self.guard_threshold is not None:
            # the action to send, then (guard_steps > 1) the plan's next actions, as the robot would get them
            sequence = action[None] if plan_tail is None or not len(plan_tail) else np.concatenate(
                [action[None], np.clip(squash(plan_tail, self.low, self.high), self.low, self.high)])
            record.disagreement = self.disagreement(state, sequence)
            if not record.disagreement <= self.guard_threshold:  # nan (a failing model) counts as above
                record.guarded = True
                action = fallback if self.cfg.guard == "policy" else self.safe_action
        record.latency = self.clock() - start
        return action, record

    def disagreement(self, state: np.ndarray, actions: np.ndarray) -> float:
        """The guard's measure for `actions` [k, A] from `state`: the max over the steps of the elites'
        disagreement (`runtime.guard.disagreement`), each step from the elites' mean prediction of the previous
        one; nan when the ensemble output is unusable (its error kept in `last_error`). Needs a manifest guard."""
        s = np.asarray(state, np.float32)[None]
        worst = 0.0
        try:
            actions = np.asarray(actions, np.float32)
            for t, a in enumerate(actions):
                mean = np.asarray(self.artifacts.ensemble(s, a[None])["next_state_mean"])
                if mean.shape != (self.num_models, 1, self.state_dim):
                    raise ShapeError(f"ensemble graph returned next_state_mean of shape {mean.shape}, expected "
                                     f"{(self.num_models, 1, self.state_dim)}")
                elite = mean[self._elites]
                d = float(disagreement(elite, self._guard_scale)[0])
                if not np.isfinite(d):
                    raise NonFiniteError(f"ensemble graph returned non-finite next_state_mean for state {s[0]}")
                worst = max(worst, d)
                if t + 1 < len(actions):
                    s = elite.mean(axis=0).astype(np.float32)
        except (NonFiniteError, ShapeError, ValueError) as err:
            self.last_error = f"guard: {type(err).__name__}: {err}"
            return np.nan
        return worst

    def _policy_action(self, state: np.ndarray) -> np.ndarray:
        """The deterministic policy action, refused unless it is [act_dim] and finite: it is always sendable."""
        action = np.asarray(self.artifacts.policy(state[None], self._zero_noise)[2], np.float64)
        if action.shape != (1, self.act_dim):
            raise ControllerError(f"the policy graph returned an action of shape {action.shape} for one state, "
                                  f"expected (1, {self.act_dim}) [batch, act_dim]; no action is sent: the "
                                  f"artifacts disagree with their manifest (check them with `maac-robot inspect`, "
                                  f"or re-export the run)")
        action = action[0]
        if not np.isfinite(action).all():
            raise ControllerError(f"the policy graph returned a non-finite action {action} for state {state}; "
                                  f"the artifacts are broken or the state is far outside the training data")
        return np.clip(action, self.low, self.high)

    def _checked_plan(self, state: np.ndarray, deadline: float | None) -> tuple[Plan | None, str | None]:
        """A plan whose action is sendable ([act_dim], finite, from at least one refit), or (None, reason)."""
        plan, why = self._try_plan(state, deadline)
        if plan is None:
            return None, why
        if np.shape(plan.action) != (self.act_dim,):
            self.last_error = f"planned action has shape {np.shape(plan.action)}, expected ({self.act_dim},)"
            return None, "shape"
        if not np.isfinite(plan.action).all():
            self.last_error = f"planned action {plan.action} is not finite"
            return None, "nonfinite"
        if plan.iterations == 0:
            return None, "budget"
        return plan, None

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
        except ShapeError as err:
            self.last_error = f"ShapeError: {err}"
            return None, "shape"
        except Exception as err:  # noqa: BLE001 - any planning failure must fall back to the policy, not stop the robot
            self.last_error = f"{type(err).__name__}: {err}"
            return None, "error"
