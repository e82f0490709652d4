"""Gymnasium envs under the project's state convention (torch-free: the sim process imports this).

Gymnasium v5 locomotion rewards are x-velocity computed from root *positions* that the default
observation drops. We build the built-in envs with `exclude_current_positions_from_observation=False`,
so the robot's state carries root x (x, y for Ant) and the closed-form reward in `tasks.py` can be
evaluated from (state, action, next_state) alone. Networks must not see absolute position (it is
unbounded and irrelevant to the dynamics): `EnvInfo.net_obs_idx` lists the dims they may use.

Ant-v5's state also ends with 78 clipped contact forces (13 bodies x 6). The contact cost reads them, so
they stay in the state, but neither the networks see them nor the ensemble predicts them (imagined
transitions carry them over unchanged): mostly zero with rare spikes, they kept an ensemble that also had
to predict them from learning anything (held-out MSE 0.95 after 40 epochs against 0.39 without them,
`python benchmarks/model_fit.py --task ant`), and a run with them diverged (benchmarks/RESULTS.md). The networks see Ant's qpos[2:] and qvel,
the 27-dim observation of the MAAC and MBPO papers; `EnvInfo.modelled_idx` lists the dims the ensemble
predicts. The contact cost of imagined steps is therefore that of the start state (5e-4 per unit force^2,
~0.003 per step on real data).

`state_layout(env_id)` writes the convention down for the manifest: the gym.make kwargs that give the
state, where Gymnasium's default observation (`gym.make(env_id)`) sits in it, the network dims, and the
dims' names, so a policy runs from a plain Gymnasium observation and a third party can rebuild the state.

Any other Gymnasium env with a 1-D Box observation and a Box action space works too: its state is
the default observation and networks see all of it. An env your own package registers is named
`yourpkg.module:EnvId` (Gymnasium's own syntax): the module is imported first, so its `gymnasium.register`
calls run, and the full id travels everywhere (config, checkpoint, manifest, recordings) so every process
that rebuilds the env (train, evaluate, export, sim) imports the same module. Its reward and termination
are whatever `register_task` registered (closed-form torch functions); without them the ensemble learns
the reward and a termination head (`learn/tasks.py`), unless the config declares `env.terminates: false`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gymnasium as gym
import numpy as np

from maac_robot.runtime.artifacts import StateLayout
from maac_robot.runtime.errors import UserError


class EnvError(UserError, ValueError):
    """An env id that does not exist or that this project cannot control (non-Box spaces, no dt)."""


_KEEP_POSITIONS = {"exclude_current_positions_from_observation": False}

# env id -> (gym.make kwargs, leading root-position dims hidden from networks, trailing sensor dims hidden from
# networks and the ensemble (read by the reward), env has early termination)
_BUILTIN: dict[str, tuple[dict, int, int, bool]] = {
    "InvertedPendulum-v5": ({}, 0, 0, True),  # cart position is part of the default observation and matters
    "Hopper-v5": (_KEEP_POSITIONS, 1, 0, True),
    "HalfCheetah-v5": (_KEEP_POSITIONS, 1, 0, False),
    "Walker2d-v5": (_KEEP_POSITIONS, 1, 0, True),
    "Ant-v5": (_KEEP_POSITIONS, 2, 78, True),  # 78 = cfrc_ext of 13 bodies x 6
}

ENV_KWARGS: dict[str, dict] = {env_id: dict(spec[0]) for env_id, spec in _BUILTIN.items()}


@dataclass(frozen=True, eq=False)
class EnvInfo:
    """Static facts about an env that the learner, exporter, sim and controller agree on."""

    env_id: str
    state_dim: int
    act_dim: int
    act_low: np.ndarray
    act_high: np.ndarray
    dt: float
    net_obs_idx: tuple[int, ...]
    terminates: bool
    modelled_idx: tuple[int, ...] | None = None  # state dims the ensemble predicts (others carried over); None: all


def gym_id(env_id: str) -> str:
    """The Gymnasium registry id of `env_id` after importing its module: `pkg.mod:MyEnv-v0` -> `MyEnv-v0`.

    Gymnasium's `gym.make("pkg.mod:MyEnv-v0")` does the same import, but a missing module would surface as a
    traceback from deep inside gym; here it is one line naming the module and the ImportError. Only import
    errors are caught: any other exception in the user's module is a bug in it, and its traceback says where.
    """
    if ":" not in env_id:
        return env_id
    module, _, name = env_id.partition(":")
    if not module or not name or ":" in name:
        raise EnvError(f"env id {env_id!r}: write an env of your own package as 'yourpkg.module:EnvId'")
    try:
        importlib.import_module(module)
    except ImportError as err:
        hint = ""
        if isinstance(err, ModuleNotFoundError) and err.name and module.split(".")[0] == err.name.split(".")[0]:
            hint = " (install its package, e.g. `pip install -e PATH`, or put it on PYTHONPATH)"
        raise EnvError(f"env id {env_id!r}: cannot import module {module!r}: {type(err).__name__}: {err}{hint}") \
            from None
    return name


def check_env_id(env_id: str) -> str:
    """`gym_id(env_id)`, refused with a hint when Gymnasium's registry has no such env after the import."""
    name = gym_id(env_id)
    if name in gym.registry:
        return name
    close = difflib.get_close_matches(name, list(gym.registry), n=2)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    if ":" in env_id:
        raise EnvError(f"unknown Gymnasium env id {env_id!r}: module {env_id.partition(':')[0]!r} was imported but "
                       f"registers no {name!r}{hint}")
    raise EnvError(f"unknown Gymnasium env id {env_id!r}{hint}; an env registered by your own package needs the "
                   f"registering module imported first: write 'yourpkg.module:{env_id}'")


def make_env(env_id: str, seed: int | None = None, max_episode_steps: int | None = None,
             render_mode: str | None = None) -> gym.Env:
    """Build `env_id` under the state convention.

    A seed resets the env once and seeds its action space, so later `reset()` calls without a seed
    continue one reproducible stream (episodes differ, runs repeat). `env_id` may be `yourpkg.module:EnvId`.
    """
    env = gym.make(check_env_id(env_id), max_episode_steps=max_episode_steps, render_mode=render_mode,
                   **ENV_KWARGS.get(env_id, {}))
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise EnvError(f"{env_id}: action space must be a Box, got {type(env.action_space).__name__}")
    if not (np.isfinite(env.action_space.low).all() and np.isfinite(env.action_space.high).all()):
        env.close()
        raise EnvError(f"{env_id}: action bounds must be finite (the policy squashes into them)")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        env.close()
        raise EnvError(f"{env_id}: observation space must be a 1-D Box, got {env.observation_space}")
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def control_period(env: gym.Env) -> float:
    """Seconds per env step: MuJoCo envs expose `dt`; others may only state a render fps."""
    dt = getattr(env.unwrapped, "dt", None)
    if dt is None and env.metadata.get("render_fps"):
        dt = 1.0 / env.metadata["render_fps"]
    if dt is None:
        raise EnvError(f"{env.spec.id}: cannot determine the control period (no env.unwrapped.dt, no render_fps)")
    return float(dt)


@lru_cache(maxsize=None)
def env_info(env_id: str) -> EnvInfo:
    """Dims, bounds, dt and the network-visible dims of `env_id` (built once, then cached)."""
    env = make_env(env_id)
    try:
        state_dim = int(env.observation_space.shape[0])
        low, high = (np.array(b, dtype=np.float64) for b in (env.action_space.low, env.action_space.high))
        for bound in (low, high):
            bound.setflags(write=False)  # cached and shared: nobody may mutate it
        root, sensors, terminates = _BUILTIN.get(env_id, ({}, 0, 0, False))[1:]
        end = state_dim - sensors
        return EnvInfo(env_id=env_id, state_dim=state_dim, act_dim=int(low.shape[0]), act_low=low, act_high=high,
                       dt=control_period(env), net_obs_idx=tuple(range(root, end)), terminates=terminates,
                       modelled_idx=tuple(range(end)))
    finally:
        env.close()


# MuJoCo joint types (mjtJoint: free, ball, slide, hinge) -> names of their qpos and qvel coordinates
_JOINT_COORDS = {0: (("x", "y", "z", "qw", "qx", "qy", "qz"), ("vx", "vy", "vz", "wx", "wy", "wz")),
                 1: (("qw", "qx", "qy", "qz"), ("wx", "wy", "wz")), 2: (("",), ("",)), 3: (("",), ("",))}
_CFRC_AXES = ("tx", "ty", "tz", "fx", "fy", "fz")  # MuJoCo's cfrc_ext rows: torque, then force


def _mujoco_state_names(env: gym.Env, state_dim: int) -> list[str] | None:
    """Names of a built-in env's state dims: qpos, qvel (then Ant's cfrc_ext of every body but the world),
    the order Gymnasium's v5 MuJoCo envs concatenate them in; None when the counts do not add up."""
    import mujoco

    model = getattr(env.unwrapped, "model", None)
    if model is None:
        return None
    qpos, qvel = [], []
    for j in range(model.njnt):
        joint = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j) or f"joint{j}"
        pos, vel = _JOINT_COORDS[int(model.jnt_type[j])]
        qpos += [f"qpos:{joint}" + (f":{c}" if c else "") for c in pos]
        qvel += [f"qvel:{joint}" + (f":{c}" if c else "") for c in vel]
    names = qpos + qvel
    if state_dim == len(names) + 6 * (model.nbody - 1):
        bodies = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, b) or f"body{b}" for b in range(1, model.nbody)]
        names += [f"cfrc_ext:{body}:{axis}" for body in bodies for axis in _CFRC_AXES]
    return names if len(names) == state_dim else None


@lru_cache(maxsize=None)
def state_layout(env_id: str) -> StateLayout:
    """How `env_id`'s state is formed (the manifest's `state_layout`), checked against the envs themselves.

    The state is `gym.make(env_id, **ENV_KWARGS[env_id])`'s observation; Gymnasium's default observation
    is its tail after the root position (the built-ins) or all of it (other envs). Both envs are built
    here and reset with one seed, and the default observation must equal the state at `obs_idx`.
    """
    info = env_info(env_id)
    env, default = make_env(env_id), gym.make(gym_id(env_id))
    try:
        root = _BUILTIN[env_id][1] if env_id in _BUILTIN else 0
        obs_idx = list(range(root, info.state_dim))
        state, _ = env.reset(seed=0)
        obs, _ = default.reset(seed=0)
        if np.shape(obs) != (len(obs_idx),) or not np.array_equal(np.asarray(state)[obs_idx], obs):
            raise EnvError(f"{env_id}: the default observation {np.shape(obs)} is not the state {np.shape(state)} "
                           f"without its first {root} dims; the state convention does not describe this env")
        names = _mujoco_state_names(env, info.state_dim) if env_id in _BUILTIN else None
        layout = StateLayout(env_kwargs=dict(ENV_KWARGS.get(env_id, {})), names=names, obs_idx=obs_idx,
                             net_obs_idx=list(info.net_obs_idx))
        layout.check(info.state_dim)
        return layout
    finally:
        env.close()
        default.close()


# --------------------------------------------------------------------------------------------
# tasks of your own envs: closed-form reward and termination, registered next to the env

TransitionRef = Callable[..., Any] | str  # a function of (state, action, next_state), or "module:function"


@dataclass(frozen=True)
class TaskSpec:
    """What `register_task` recorded for one env; the learner resolves it (`learn.tasks.get_task`)."""

    reward_fn: TransitionRef | None
    termination_fn: TransitionRef | None
    terminates: bool | None


_TASKS: dict[str, TaskSpec] = {}


def register_task(env_id: str, *, reward_fn: TransitionRef | None = None,
                  termination_fn: TransitionRef | None = None, terminates: bool | None = None) -> None:
    """Tell the learner the closed-form reward and/or termination of your env `env_id` (its Gymnasium id).

    Call it in the module that calls `gymnasium.register`, so that naming the env as `yourpkg.module:EnvId`
    registers both from the CLI. The functions map batched torch tensors (state [..., S], action [..., A],
    next_state [..., S]) to the reward [...] (float, differentiable: MAAC's policy gradient flows through it)
    and to the termination [...] (bool), with only tensor ops so they export to ONNX (see `learn/tasks.py`).
    Each may be given as a "module:function" string instead: it is imported only when the learner needs it,
    so the env module, which the sim imports too, never needs torch.

    What is left out is learned: no reward_fn -> the ensemble predicts the reward; no termination_fn -> the
    ensemble's termination head predicts it, unless `terminates=False` (the env never terminates, only
    truncates) or the run's config says `env.terminates: false`.
    """
    name = env_id.partition(":")[2] if ":" in env_id else env_id
    if env_id in _BUILTIN or name in _BUILTIN:
        raise EnvError(f"{name} is built in: its closed-form reward and termination cannot be replaced")
    for what, fn in (("reward_fn", reward_fn), ("termination_fn", termination_fn)):
        if fn is not None and not callable(fn) and not (isinstance(fn, str) and fn.count(":") == 1):
            raise TypeError(f"register_task({name!r}): {what} must be a function or a 'module:function' string, "
                            f"got {fn!r}")
    if termination_fn is not None and terminates is False:
        raise ValueError(f"register_task({name!r}): a termination_fn contradicts terminates=False")
    _TASKS[name] = TaskSpec(reward_fn, termination_fn, terminates)


def registered_task(env_id: str) -> TaskSpec | None:
    """The `register_task` record of `env_id` (after importing its module), or None."""
    return _TASKS.get(gym_id(env_id))
