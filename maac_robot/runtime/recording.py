"""Recorded episodes: the path back from deployment (sim or robot) to training. Torch-free.

One episode per `.npz` file, plain arrays only (loads with ``allow_pickle=False``):

    states [T, S] float64        the state s_t each action was applied in, as served (with a perturbed
                                 sim's observation noise; meta["states"] then says so)
    actions [T, A] float64       the action actually applied (after clipping, or the safe action; with
                                 an action delay, the one received that many ticks earlier)
    rewards [T] float64
    next_states [T, S] float64
    terminated [T] bool          true terminal (no bootstrapping)
    truncated [T] bool           time limit, or the recording was cut short (reset/disconnect/stop)
    flag_<name> [T] bool         robot-side safety flags per step (clipped, rejected, watchdog, held;
                                 late; pushed, from a sim that pushes); a controller recording adds
                                 `predicted`, `skipped` and `substituted` (see below)
    telemetry_<name> [T]         per-step numbers of the side that recorded (controller: latency [s],
                                 iterations, disagreement (nan: guard off), guarded, planner (small ints,
                                 names in meta["planner_names"]))
    meta                         0-d unicode array holding a JSON object (env_id, dt, mode, source, ...;
                                 a perturbed sim adds `perturbation`: its settings and the episode's draws)

Two sides write this format. `sim --record` (meta source "sim", or no source in older files): exact,
the sim applied these actions. `control --record` (source "controller"; controller/run.py): the states
the controller acted on, the action it sent, the reward and next state the robot reported, plus the
artifacts' state layout and hash and the robot's hello metadata. In real time a transition is not always
one robot tick with the action sent: `flag_predicted` marks a step whose state or next state was the
model's stand-in for a lost observation, `flag_skipped` one whose robot step count did not advance by
exactly one (stale observations skipped), `flag_substituted` one where the robot applied another action
than the one recorded (held, watchdog, rejected or late); `usable_mask` drops all three when the episode
goes into a replay buffer (`maac-robot finetune`). Lockstep recordings have none of them.

Into a run's replay buffer: `maac-robot finetune RUN --data DIR --out NEW_RUN`
(`maac_robot.learn.finetune`), which checks env and state layout and tags the rows as recorded.

The actions stored are the ones the robot applied, not the ones the controller asked for: a
replay buffer must hold the transitions that happened. An episode that did not end on its own
gets ``truncated[-1] = True`` so a learner bootstraps its last transition instead of treating the
cut as a terminal state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maac_robot.runtime.errors import UserError
from maac_robot.runtime.files import atomic_write

TRANSITION_KEYS = ("states", "actions", "rewards", "next_states", "terminated", "truncated")
FLAG_PREFIX = "flag_"
TELEMETRY_PREFIX = "telemetry_"
INEXACT_FLAGS = ("predicted", "skipped", "substituted")
"""Controller-side flags of steps that are not one real robot transition; `usable_mask` leaves them out."""


class RecordingError(UserError, ValueError):
    """A recording file that is missing, unreadable or inconsistent; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class Episode:
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_states: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    flags: dict[str, np.ndarray]
    meta: dict[str, Any]
    telemetry: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())

    @property
    def source(self) -> str:
        """"sim" or "controller" (recordings from before the field are the sim's)."""
        return str(self.meta.get("source", "sim"))

    def usable_mask(self) -> np.ndarray:
        """[T] bool: the steps that are one real transition (not flagged in INEXACT_FLAGS) with finite numbers."""
        keep = np.ones(len(self), dtype=bool)
        for name in INEXACT_FLAGS:
            if name in self.flags:
                keep &= ~self.flags[name]
        for array in (self.states, self.actions, self.next_states):
            keep &= np.isfinite(array).all(axis=1)
        return keep & np.isfinite(self.rewards)


class EpisodeRecorder:
    """Accumulates one episode's transitions and writes them to `directory` when the episode finishes."""

    def __init__(self, directory: str | Path, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise RecordingError(f"recording directory {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self._rows: list[tuple[np.ndarray, np.ndarray, float, np.ndarray, bool, bool]] = []
        self._flags: dict[str, list[bool]] = {}
        self._telemetry: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, state: np.ndarray, action: np.ndarray, reward: float, next_state: np.ndarray,
            terminated: bool, truncated: bool, flags: dict[str, bool],
            telemetry: dict[str, float] | None = None) -> None:
        telemetry = telemetry or {}
        if self._rows and set(flags) != set(self._flags):
            raise RecordingError(f"flag names changed mid-episode: {sorted(self._flags)} -> {sorted(flags)}")
        if self._rows and set(telemetry) != set(self._telemetry):
            raise RecordingError(f"telemetry names changed mid-episode: {sorted(self._telemetry)} -> "
                                 f"{sorted(telemetry)}")
        self._rows.append((np.array(state, dtype=np.float64), np.array(action, dtype=np.float64), float(reward),
                           np.array(next_state, dtype=np.float64), bool(terminated), bool(truncated)))
        for name, value in flags.items():
            self._flags.setdefault(name, []).append(bool(value))
        for name, value in telemetry.items():
            self._telemetry.setdefault(name, []).append(value)

    def finish(self, name: str, extra_meta: dict[str, Any] | None = None) -> Path | None:
        """Write the episode as `<directory>/<name>.npz` (None if it has no transitions) and start afresh."""
        if not self._rows:
            return None
        states, actions, rewards, next_states, terminated, truncated = (list(col) for col in zip(*self._rows))
        complete = terminated[-1] or truncated[-1]
        truncated[-1] = truncated[-1] or not terminated[-1]
        episode = Episode(states=np.stack(states), actions=np.stack(actions), rewards=np.array(rewards),
                          next_states=np.stack(next_states), terminated=np.array(terminated, dtype=bool),
                          truncated=np.array(truncated, dtype=bool),
                          flags={k: np.array(v, dtype=bool) for k, v in self._flags.items()},
                          meta={**self.meta, **(extra_meta or {}), "complete": bool(complete)},
                          telemetry={k: np.array(v) for k, v in self._telemetry.items()})
        self._rows, self._flags, self._telemetry = [], {}, {}
        return save_episode(self.directory / f"{name}.npz", episode)


def save_episode(path: str | Path, episode: Episode) -> Path:
    """Write atomically, so a reader never sees half an episode, not even after a crash."""
    arrays = {key: getattr(episode, key) for key in TRANSITION_KEYS}
    arrays.update({FLAG_PREFIX + name: value for name, value in episode.flags.items()})
    arrays.update({TELEMETRY_PREFIX + name: value for name, value in episode.telemetry.items()})
    arrays["meta"] = np.array(json.dumps(episode.meta))
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_episode(path: str | Path) -> Episode:
    """Read and check one episode file (shapes agree, dtypes as documented)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise RecordingError(f"recording not found: {path}") from None
    except (OSError, ValueError) as err:
        raise RecordingError(f"{path}: not a readable .npz episode ({err})") from None
    missing = [key for key in (*TRANSITION_KEYS, "meta") if key not in contents]
    if missing:
        raise RecordingError(f"{path}: missing arrays {missing}")
    try:
        meta = json.loads(str(contents["meta"]))
    except ValueError:
        raise RecordingError(f"{path}: meta is not JSON") from None
    steps = contents["rewards"].shape[0] if contents["rewards"].ndim == 1 else -1
    expected_ndim = {"states": 2, "actions": 2, "rewards": 1, "next_states": 2, "terminated": 1, "truncated": 1}
    for key, ndim in expected_ndim.items():
        value = contents[key]
        if value.ndim != ndim or value.shape[0] != steps:
            raise RecordingError(f"{path}: {key} has shape {value.shape}, expected {ndim}-D with {steps} rows")
    if contents["states"].shape != contents["next_states"].shape:
        raise RecordingError(f"{path}: states {contents['states'].shape} and next_states "
                             f"{contents['next_states'].shape} differ")
    flags = {key[len(FLAG_PREFIX):]: contents[key].astype(bool) for key in contents if key.startswith(FLAG_PREFIX)}
    telemetry = {key[len(TELEMETRY_PREFIX):]: contents[key] for key in contents if key.startswith(TELEMETRY_PREFIX)}
    for name, value in {**{FLAG_PREFIX + k: v for k, v in flags.items()},
                        **{TELEMETRY_PREFIX + k: v for k, v in telemetry.items()}}.items():
        if value.shape != (steps,):
            raise RecordingError(f"{path}: {name} has shape {value.shape}, expected ({steps},)")
    if not isinstance(meta, dict):
        raise RecordingError(f"{path}: meta is not a JSON object")
    return Episode(states=contents["states"].astype(np.float64), actions=contents["actions"].astype(np.float64),
                   rewards=contents["rewards"].astype(np.float64),
                   next_states=contents["next_states"].astype(np.float64),
                   terminated=contents["terminated"].astype(bool), truncated=contents["truncated"].astype(bool),
                   flags=flags, meta=meta, telemetry=telemetry)


def load_episodes(directory: str | Path) -> list[Episode]:
    """Every `*.npz` episode in `directory`, in file-name order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RecordingError(f"recording directory not found: {directory}")
    return [load_episode(p) for p in sorted(directory.glob("*.npz"))]
