"""A sim that differs from the nominal env on purpose: `sim.perturb` (`maac-robot sim --perturb KEY=VALUE`).

`Perturber` holds one `PerturbConfig` (schema and validation in `maac_robot.runtime.config`) and
applies it to a Gymnasium MuJoCo env:

* model scales (mass and inertia of all or named bodies, joint damping, geom friction, actuator
  force) are written into ``env.unwrapped.model`` at every reset, always from the nominal values
  copied once at start, so resampling a range never compounds; `mj_setConst` then recomputes the
  constants derived from them;
* observation noise is added to what the sim serves (and records), never to the physics state;
* an action delay of N ticks is a FIFO: each control period the robot applies the action received
  N periods earlier (the safe action during the episode's first N periods). The safety gate has
  already checked every action as received;
* a push is a horizontal force of random direction on one body (``data.xfrc_applied``) for one
  control period, drawn with probability `push_prob` each period.

Every value may be a range `[lo, hi]`; a new value is drawn from it at each reset. All randomness
comes from generators seeded by the sim seed and the reset seed (the episode number when the reset
has no seed), so lockstep with the same seeds repeats exactly; sampling, noise and pushes use
separate streams, so changing one setting never shifts the others' draws.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from maac_robot.runtime.config import PerturbConfig
from maac_robot.runtime.errors import UserError

_MODEL_KEYS = ("mass_scale", "body_mass_scale", "damping_scale", "friction_scale", "actuator_gain_scale")
# the entries of gainprm/biasprm that multiply into the force for fixed and affine gain/bias actuators
_FORCE_PARAMS = slice(0, 3)


class PerturbError(UserError):
    """A perturbation the served env cannot take (an unknown body name, no MuJoCo model, an actuator type)."""


def _sample(rng: np.random.Generator, value: Any) -> Any:
    """A draw from a range `(lo, hi)` (integers inclusive), or the value itself."""
    if not isinstance(value, tuple):
        return value
    lo, hi = value
    if isinstance(lo, int) and isinstance(hi, int):
        return int(rng.integers(lo, hi, endpoint=True))
    return float(rng.uniform(lo, hi))


class Perturber:
    """Applies `config` to `env` episode by episode; call `new_episode` at every reset, before `env.reset`."""

    def __init__(self, config: PerturbConfig, env: Any, *, seed: int | None, safe_action: np.ndarray) -> None:
        self.config = config
        self._seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self._safe = np.asarray(safe_action)
        self._env = env.unwrapped
        self.model = getattr(self._env, "model", None)
        self.data = getattr(self._env, "data", None)
        defaults = PerturbConfig()
        uses_model = [k for k in _MODEL_KEYS if getattr(config, k) != getattr(defaults, k)]
        if config.push_prob != 0:
            uses_model.append("push_prob")
        self._scales_model = bool(uses_model) and uses_model != ["push_prob"]
        if uses_model and (self.model is None or self.data is None):
            raise PerturbError(f"sim.perturb: {', '.join(uses_model)} need a MuJoCo env (env.unwrapped.model); "
                               f"{env.spec.id if env.spec else type(self._env).__name__} has none, so only "
                               f"obs_noise_std and action_delay_ticks apply to it")
        self.body_names: list[str] = []
        self._nominal: dict[str, np.ndarray] = {}
        self._push_body = 1
        if self.model is not None:
            self.body_names = [self.model.body(i).name for i in range(self.model.nbody)]
            self._check_bodies()
            if config.actuator_gain_scale != defaults.actuator_gain_scale:
                self._check_actuators()
            self._nominal = {name: getattr(self.model, name).copy() for name in (
                "body_mass", "body_inertia", "dof_damping", "geom_friction", "actuator_gainprm", "actuator_biasprm")}
            if config.push_body is not None:
                self._push_body = self.body_names.index(config.push_body)
        self.episode = 0
        self.sampled: dict[str, Any] | None = None
        self.pushes = 0  # this episode's
        self._delay: deque[np.ndarray] = deque()
        self._noise_rng = self._push_rng = np.random.default_rng(0)
        self._pushing = False

    def _check_bodies(self) -> None:
        named = [*self.config.body_mass_scale, *([self.config.push_body] if self.config.push_body else [])]
        unknown = [name for name in named if name not in self.body_names or name == "world"]
        if unknown:
            raise PerturbError(f"sim.perturb: no body {', '.join(map(repr, unknown))} in this model; its bodies are "
                               f"{', '.join(self.body_names[1:])}")
        if self.model.nbody < 2 and self.config.push_prob != 0:
            raise PerturbError("sim.perturb: pushes need a body other than the world, and this model has none")

    def _check_actuators(self) -> None:
        import mujoco

        gains = {int(mujoco.mjtGain.mjGAIN_FIXED), int(mujoco.mjtGain.mjGAIN_AFFINE)}
        biases = {int(mujoco.mjtBias.mjBIAS_NONE), int(mujoco.mjtBias.mjBIAS_AFFINE)}
        odd = [self.model.actuator(i).name or str(i) for i in range(self.model.nu)
               if int(self.model.actuator_gaintype[i]) not in gains or int(self.model.actuator_biastype[i]) not in biases]
        if odd:
            raise PerturbError(f"sim.perturb.actuator_gain_scale scales fixed or affine gain/bias actuators only; "
                               f"actuators {', '.join(odd)} are of another type (muscle or user)")

    # ---- per episode ----
    def new_episode(self, reset_seed: int | None, episode: int) -> dict[str, Any]:
        """Draw this episode's values and write them into the model; returns them (JSON-ready)."""
        entropy = [self._seed, 1, int(reset_seed)] if reset_seed is not None else [self._seed, 0, int(episode)]
        sample_seq, noise_seq, push_seq = np.random.SeedSequence(entropy).spawn(3)
        rng = np.random.default_rng(sample_seq)
        self._noise_rng, self._push_rng = np.random.default_rng(noise_seq), np.random.default_rng(push_seq)
        c = self.config
        sampled: dict[str, Any] = {}
        for key in PerturbConfig.model_fields:
            value = getattr(c, key)
            if key == "body_mass_scale":
                sampled[key] = {name: _sample(rng, v) for name, v in value.items()}
            elif key != "push_body":
                sampled[key] = _sample(rng, value)
        sampled["push_body"] = self.body_names[self._push_body] if self.model is not None else None
        self.episode, self.sampled, self.pushes = episode, sampled, 0
        self._delay = deque(self._safe.copy() for _ in range(sampled["action_delay_ticks"]))
        if self._scales_model:
            self._apply_model(sampled)
        return sampled

    def _apply_model(self, s: dict[str, Any]) -> None:
        import mujoco

        m, nominal = self.model, self._nominal
        body = np.full(m.nbody, float(s["mass_scale"]))
        for name, scale in s["body_mass_scale"].items():
            body[self.body_names.index(name)] *= scale
        m.body_mass[:] = nominal["body_mass"] * body
        m.body_inertia[:] = nominal["body_inertia"] * body[:, None]
        m.dof_damping[:] = nominal["dof_damping"] * s["damping_scale"]
        m.geom_friction[:] = nominal["geom_friction"] * s["friction_scale"]
        m.actuator_gainprm[:, _FORCE_PARAMS] = nominal["actuator_gainprm"][:, _FORCE_PARAMS] * s["actuator_gain_scale"]
        m.actuator_biasprm[:, _FORCE_PARAMS] = nominal["actuator_biasprm"][:, _FORCE_PARAMS] * s["actuator_gain_scale"]
        mujoco.mj_setConst(m, self.data)  # constants derived from masses and inertias (subtree mass, inverse weights)

    # ---- per control period ----
    @property
    def pushes_enabled(self) -> bool:
        """Whether pushes may happen (then every observation carries a `pushed` flag)."""
        value = self.config.push_prob
        return (value[1] if isinstance(value, tuple) else value) > 0

    def action(self, received: np.ndarray) -> np.ndarray:
        """The action to apply this period: `received`, or with a delay the one received that many periods earlier."""
        if not self._delay:
            return received
        self._delay.append(received)
        return self._delay.popleft()

    def push(self) -> bool:
        """Maybe start a push for this period (before `env.step`); call `end_push` after the step."""
        if not self.pushes_enabled or self.sampled is None:
            return False
        if self._push_rng.random() >= self.sampled["push_prob"]:
            return False
        angle = self._push_rng.uniform(0.0, 2.0 * math.pi)
        force = self.sampled["push_force"]
        self.data.xfrc_applied[self._push_body, :3] = (force * math.cos(angle), force * math.sin(angle), 0.0)
        self._pushing = True
        self.pushes += 1
        return True

    def end_push(self) -> None:
        if self._pushing:
            self.data.xfrc_applied[self._push_body, :] = 0.0
            self._pushing = False

    def observe(self, state: np.ndarray) -> np.ndarray:
        """What the sim serves for `state`: with this episode's observation noise (a new array), else `state`."""
        std = 0.0 if self.sampled is None else self.sampled["obs_noise_std"]
        if std == 0:
            return state
        return state + self._noise_rng.normal(0.0, std, size=np.shape(state))

    # ---- reporting ----
    def report(self) -> dict[str, Any]:
        """The perturbation in force: its settings (those off nominal) and, once an episode started, its draws."""
        return {"config": self.config.in_force(), "episode": self.episode, "sampled": self.sampled}

    def describe(self) -> str:
        """This episode's values in one log line (only those off nominal)."""
        if self.sampled is None:
            return "none drawn yet"
        nominal = PerturbConfig()
        parts = []
        for key, value in self.sampled.items():
            if key == "body_mass_scale":
                parts += [f"body_mass_scale.{name}={_fmt(v)}" for name, v in value.items()]
            elif key != "push_body" and value != getattr(nominal, key):
                parts.append(f"{key}={_fmt(value)}")
        if self.pushes_enabled:
            parts.append(f"push_body={self.sampled['push_body']}")
        return " ".join(parts) or "nominal values"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
