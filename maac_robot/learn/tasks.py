"""Closed-form reward and termination of the built-in tasks, as differentiable torch functions.

MAAC's pathwise policy gradient flows through r(s, a, s') and the done mask, so for the tasks whose
rules we know we write Gymnasium v5's own reward and termination (same weights, healthy ranges,
control and contact costs) as functions of (state, action, next_state) under the state convention
of `envs.py`: state[..., 0] is root x, so forward velocity is (x' - x) / dt exactly as the env computes
it. Only tensor ops, and Python branches on configuration only, so the functions export to ONNX.

Known, measured deviations (tests/test_envs_tasks.py):
- Ant-v5 takes x-velocity from the torso's `xpos`, which MuJoCo computes *before* the last physics
  substep of a control step; the state holds the final qpos. Our (x' - x)/dt is the displacement over
  the true control interval; it differs from the env's by the substep lag (mean ~5e-3, max ~0.1 per step).
  All other Ant terms (ctrl, contact from the clipped cfrc_ext in the state, healthy) are exact.
- Hopper-v5's healthy check also bounds unclipped joint velocities by 100; the state holds velocities
  clipped to ±10, so that (physically implausible) case cannot be seen from the state.
Other envs (your own, `yourpkg.module:EnvId`): the reward and termination registered with
`maac_robot.register_task` (closed form, exact); what is not registered is learned by the ensemble: the
reward (`reward_fn` None) and the termination, through its termination head (`LearnedTermination`), unless the
env is declared never to terminate (`register_task(..., terminates=False)` or the config's `env.terminates:
false`). Either way the functions have the closed-form ones' signature, so the one `rollout.model_rollout`
(actor loss, STEVE targets, D_model rollouts, diagnostics, the exported plan graph) uses them alike.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from maac_robot.envs import EnvInfo, TransitionRef, env_info, registered_task
from maac_robot.runtime.errors import UserError

if TYPE_CHECKING:
    from maac_robot.learn.ensemble import GaussianEnsemble

RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
TerminationFn = Callable[[Tensor, Tensor, Tensor], Tensor]
HealthyFn = Callable[[Tensor], Tensor]


def never_terminates(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    """All-False done mask shaped like the batch (HalfCheetah, envs declared never to terminate)."""
    return torch.zeros_like(next_state[..., 0], dtype=torch.bool)


class TaskError(UserError):
    """A task registration or `env.terminates` setting that cannot be used."""


class LearnedTermination:
    """The termination function of a task whose rule nobody wrote down: the ensemble's termination head.

    `model` is set by `trainer.build_components` once the ensemble exists (it is built after the agent, whose
    initialisation order every run keeps); the agent and the exported plan graph call this object like any
    closed-form `termination_fn(state, action, next_state)`, and it asks `model.terminated(next_state)`.
    """

    def __init__(self) -> None:
        self.model: GaussianEnsemble | None = None

    def __call__(self, state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("the learned termination has no ensemble yet (trainer.build_components binds it)")
        return self.model.terminated(next_state)


@dataclass(frozen=True, eq=False)
class Task:
    """What the learner knows about an env beyond its dims: reward (None: learned) and termination."""

    info: EnvInfo
    reward_fn: RewardFn | None
    termination_fn: TerminationFn = never_terminates

    @property
    def termination(self) -> str:
        """'closed_form', 'learned' (the ensemble's termination head) or 'never' (the manifest's `termination`)."""
        if isinstance(self.termination_fn, LearnedTermination):
            return "learned"
        return "closed_form" if self.info.terminates else "never"

    def describe(self) -> dict[str, str]:
        """Which reward and termination a run uses (its train.log and sessions.jsonl say so at every start)."""
        out = {"reward": "closed_form" if self.reward_fn is not None else "learned", "termination": self.termination}
        if self.reward_fn is not None:
            out["reward_fn"] = _name(self.reward_fn)
        if self.termination == "closed_form":
            out["termination_fn"] = _name(self.termination_fn)
        return out


@dataclass(frozen=True)
class _Locomotion:
    """Gymnasium v5 locomotion reward: forward velocity + healthy bonus - ctrl cost - contact cost.

    `healthy(next_state) -> bool` is None for tasks that are always healthy and never terminate.
    """

    dt: float
    ctrl_cost_weight: float
    healthy: HealthyFn | None = None
    healthy_reward: float = 1.0
    contact_dims: slice | None = None
    contact_cost_weight: float = 0.0

    def reward(self, state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
        reward = (next_state[..., 0] - state[..., 0]) / self.dt - self.ctrl_cost_weight * action.square().sum(-1)
        if self.healthy is not None:
            reward = reward + self.healthy_reward * self.healthy(next_state).to(reward.dtype)
        if self.contact_dims is not None:
            reward = reward - self.contact_cost_weight * next_state[..., self.contact_dims].square().sum(-1)
        return reward

    def termination(self, state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
        if self.healthy is None:
            return never_terminates(state, action, next_state)
        return ~self.healthy(next_state)


def _between(x: Tensor, low: float, high: float) -> Tensor:
    return (x > low) & (x < high)


def _hopper_healthy(s: Tensor) -> Tensor:
    # state = qpos[x, z, angle, 3 joints] + clipped qvel[6]; gym bounds state_vector()[2:] in (-100, 100)
    healthy_state = _between(s[..., 2:], -100.0, 100.0).all(-1)
    return healthy_state & _between(s[..., 1], 0.7, float("inf")) & _between(s[..., 2], -0.2, 0.2)


def _walker_healthy(s: Tensor) -> Tensor:
    return _between(s[..., 1], 0.8, 2.0) & _between(s[..., 2], -1.0, 1.0)


_ANT_QPOS_QVEL = 15 + 14  # qpos (x, y, z, quaternion, 8 joints) + qvel; cfrc_ext of 13 bodies x 6 follows


def _ant_healthy(s: Tensor) -> Tensor:
    z = s[..., 2]
    return torch.isfinite(s[..., :_ANT_QPOS_QVEL]).all(-1) & (z >= 0.2) & (z <= 1.0)


def _pendulum_termination(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    return ~torch.isfinite(next_state).all(-1) | (next_state[..., 1].abs() > 0.2)


def _pendulum_reward(state: Tensor, action: Tensor, next_state: Tensor) -> Tensor:
    """InvertedPendulum-v5 pays 1 for every step that does not terminate."""
    return (~_pendulum_termination(state, action, next_state)).to(next_state.dtype)


def _locomotion(dt: float) -> dict[str, _Locomotion]:
    return {
        "Hopper-v5": _Locomotion(dt, ctrl_cost_weight=1e-3, healthy=_hopper_healthy),
        "HalfCheetah-v5": _Locomotion(dt, ctrl_cost_weight=0.1),
        "Walker2d-v5": _Locomotion(dt, ctrl_cost_weight=1e-3, healthy=_walker_healthy),
        "Ant-v5": _Locomotion(dt, ctrl_cost_weight=0.5, healthy=_ant_healthy,
                              contact_dims=slice(_ANT_QPOS_QVEL, None), contact_cost_weight=5e-4),
    }


def _builtin_task(info: EnvInfo) -> Task | None:
    """The closed-form task of a built-in env, None for any other."""
    if info.env_id == "InvertedPendulum-v5":
        return Task(info, _pendulum_reward, _pendulum_termination)
    spec = _locomotion(info.dt).get(info.env_id)
    return None if spec is None else Task(info, spec.reward, spec.termination)


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _resolve(env_id: str, what: str, ref: TransitionRef | None) -> Callable[..., Tensor] | None:
    """A registered function, importing a "module:function" string; a failure is one line naming it."""
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise TaskError(f"{env_id}: the registered {what} {ref!r} cannot be loaded: {type(err).__name__}: {err}") \
            from None
    if not callable(fn):
        raise TaskError(f"{env_id}: the registered {what} {ref!r} is not a function")
    return fn


def get_task(env_id: str, terminates: bool | None = None) -> Task:
    """The task of `env_id`: closed-form reward/termination for built-ins and registered tasks, learned otherwise.

    `terminates` is the config's `env.terminates`: None takes the task's own rule (closed form if there is one,
    else learned); False declares that the env never terminates (no termination head), True that it does. A
    value contradicting what the task itself says (Hopper with False, a registered termination_fn with False)
    is refused rather than silently obeyed or ignored.
    """
    info = env_info(env_id)
    builtin = _builtin_task(info)
    if builtin is not None:  # exactly as before any of this existed
        _agree(env_id, info.terminates, terminates, "by its closed-form rule")
        return builtin
    spec = registered_task(env_id)
    reward_fn = termination_fn = declared = None
    if spec is not None:
        reward_fn = _resolve(env_id, "reward_fn", spec.reward_fn)
        termination_fn = _resolve(env_id, "termination_fn", spec.termination_fn)
        declared = True if termination_fn is not None else spec.terminates
        _agree(env_id, declared, terminates, "by its register_task call")
    rule = next((x for x in (declared, terminates) if x is not None), True)
    if rule and termination_fn is None:
        termination_fn = LearnedTermination()
    return Task(dataclasses.replace(info, terminates=rule), reward_fn, termination_fn or never_terminates)


def _agree(env_id: str, rule: bool | None, terminates: bool | None, source: str) -> None:
    if rule is not None and terminates is not None and terminates != rule:
        raise TaskError(f"{env_id} {'terminates' if rule else 'never terminates'} {source}; env.terminates: "
                        f"{str(terminates).lower()} contradicts it (leave env.terminates unset)")
