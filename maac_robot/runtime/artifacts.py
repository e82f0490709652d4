"""Deployment artifacts: the manifest, verified loading, and onnxruntime sessions for the controller.

Torch-free on purpose: a robot computer has onnxruntime, numpy and pydantic only. An artifact
directory (written by `maac_robot.learn.export`) holds four ONNX graphs and `manifest.json`:

- `policy.onnx`   (net_obs [B,N], noise [B,A]) -> mean [B,A], log_std [B,A], action [B,A], where
                  net_obs = state[manifest.state_layout.net_obs_idx]: only what the actor reads
- `ensemble.onnx` (state [B,S], action [B,A]) -> every member's next-state mean/logvar [M,B,S]
                  and reward [M,B] (+ reward_logvar [M,B] when the reward is learned)
- `q.onnx`        (state [B,S], action [B,A]) -> q1 [B], q2 [B]
- `plan.onnx`     (state [S], actions [P,H,A]) -> returns [P]  (graph: P a multiple of num_elites)

All normalisation lives inside the graphs: callers pass raw env-unit states and actions.
The manifest's `state_layout` says how the state is formed from the env (`gym.make(env_id, **env_kwargs)`'s
observation), where the env's default observation (`gym.make(env_id)`) sits in it, and which dims the
policy graph takes, so the policy runs from a plain Gymnasium observation (`runtime.policy.Policy`).
Nothing is trusted on load: every file is hashed, the format version, env id and every graph's
input/output signature are checked against the manifest, and each failure says which.
"""

from __future__ import annotations

import hashlib
import json
import io
from pathlib import Path
from collections.abc import Collection
from typing import Any, Literal

import numpy as np
from maac_robot.runtime.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# 2: policy.onnx takes net_obs [B,N] (what the actor reads) instead of the full state; manifest.state_layout.
# Optional manifest fields added later (`guard`) keep version 2: a manifest without them still loads here; a
# runtime older than the field refuses a manifest that has it (extra fields are forbidden), naming the field.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("policy", "ensemble", "q", "plan")
# Measured by benchmarks/inference.py (see benchmarks/RESULTS.md, "Inference latency"): one intra-op
# thread with spinning off gives the lowest p99 on a shared 2-core machine; spinning threads steal
# the core the control loop and the other sessions need.
DEFAULT_INTRA_OP_THREADS = 1
DEFAULT_ALLOW_SPINNING = False
# Manifest fields copied into every graph's ONNX metadata_props (so a lone .onnx file is identifiable).
METADATA_KEYS = ("format_version", "env_id", "state_dim", "act_dim", "dt", "gamma", "horizon", "plan_horizon",
                 "num_models", "num_elites", "reward", "train_steps", "opset", "state_layout")

# Upper bounds checked (by `stat`) before a file is read, so a huge or sparse file is refused without
# costing its size in RAM and seconds. An Ant-sized export (8 members x 4 layers x 200 units, 256-unit
# actor/critic) has a 6.6 MB plan.onnx and a 5.5 MB ensemble.onnx, its manifest about 1 KB plus the run's
# config; the limits leave ~40x (graphs) and far more (manifest) room for bigger networks while keeping
# the memory a load can take bounded on a small robot computer.
MAX_GRAPH_BYTES = 256 * 2**20
MAX_MANIFEST_BYTES = 16 * 2**20
READ_CHUNK_BYTES = 2**20

Dim = int | str  # an int is a fixed size; a str names a dynamic axis


class ArtifactError(UserError):
    """Artifacts that cannot be used as they are: the message names the file and what disagrees."""


class StateLayout(BaseModel):
    """How the state is formed from the env, and which of its dims the env's default observation and the
    policy graph hold: everything a third party needs to feed the graphs from Gymnasium.

    state       = gym.make(env_id, **env_kwargs) observation                     [state_dim]
    observation = gym.make(env_id) observation (Gymnasium's default) = state[obs_idx]
    net_obs     = policy.onnx's input = state[net_obs_idx]
                = observation[[obs_idx.index(i) for i in net_obs_idx]]

    The ensemble, Q and plan graphs take the full state: the closed-form rewards read the root position
    that the default observation drops (Hopper's x, Ant's x and y).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    env_kwargs: dict[str, Any] = Field(
        description="gym.make(env_id, **env_kwargs) returns the state as its observation")
    names: list[str] | None = Field(
        description="one name per state dim (MuJoCo: 'qpos:<joint>', 'qvel:<joint>', 'cfrc_ext:<body>:<axis>'), "
                    "or null when unknown")
    obs_idx: list[int] = Field(description="gym.make(env_id)'s default observation is state[obs_idx] (increasing)")
    net_obs_idx: list[int] = Field(description="policy.onnx's net_obs input is state[net_obs_idx] (increasing); a "
                                               "subset of obs_idx, so the policy runs from the default observation")

    def check(self, state_dim: int) -> None:
        """Raise ValueError unless the layout fits a state of `state_dim` dims."""
        if self.names is not None and len(self.names) != state_dim:
            raise ValueError(f"state_layout.names has {len(self.names)} entries, state_dim is {state_dim}")
        for name, idx in (("obs_idx", self.obs_idx), ("net_obs_idx", self.net_obs_idx)):
            if not idx or any(b <= a for a, b in zip(idx, idx[1:])) or not all(0 <= i < state_dim for i in idx):
                raise ValueError(f"state_layout.{name} must list increasing dims in [0, {state_dim}), got {idx}")
        if missing := sorted(set(self.net_obs_idx) - set(self.obs_idx)):
            raise ValueError(f"state_layout.net_obs_idx holds dims {missing} that are not in obs_idx")

    @property
    def obs_net_idx(self) -> list[int]:
        """Where the policy's inputs sit in the default observation: net_obs = observation[obs_net_idx]."""
        where = {dim: pos for pos, dim in enumerate(self.obs_idx)}
        return [where[i] for i in self.net_obs_idx]


class GuardSpec(BaseModel):
    """The uncertainty guard's calibration (`maac_robot.runtime.guard`): the controller falls back when the
    elites' disagreement about the next state of (state, action to send) exceeds `threshold`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(gt=0, description="percentile of the disagreement over the calibration transitions, "
                                               "times margin")
    percentile: float = Field(gt=0, le=100, description="which percentile of the calibration disagreements")
    margin: float = Field(gt=0, description="multiplier applied to the percentile")
    samples: int = Field(gt=0, description="(state, action) pairs of the run's replay buffer it was computed on")
    scale: list[float] = Field(description="per state dim: std of the next-state change in the ensemble's "
                                           "training data (1 where the dim is carried over unchanged)")
    definition: str = Field(description="the disagreement it bounds, in words (runtime.guard.DEFINITION)")

    @model_validator(mode="after")
    def _check(self) -> GuardSpec:
        if not all(x > 0 for x in self.scale):
            raise ValueError("guard.scale must be positive in every dim")
        return self


class Manifest(BaseModel):
    """What an artifact directory contains and how it was made; `manifest.json` on disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(description="bumped whenever graphs or fields change incompatibly")
    env_id: str
    state_dim: int = Field(gt=0, description="full state incl. root position (the state convention)")
    state_layout: StateLayout = Field(description="how the state is formed from the env, and which dims the "
                                                  "default observation and the policy graph hold")
    act_dim: int = Field(gt=0)
    act_low: list[float]
    act_high: list[float]
    dt: float = Field(gt=0, description="control period in seconds")
    gamma: float = Field(gt=0, le=1)
    horizon: int = Field(ge=0, description="H the policy was trained with (paper §4.3)")
    plan_horizon: int = Field(gt=0, description="H of the fused plan graph (the actions input's second axis)")
    num_models: int = Field(gt=0)
    num_elites: int = Field(gt=0)
    elites: list[int] = Field(description="ensemble member indices; plan particle i uses elites[i % num_elites]")
    reward: Literal["closed_form", "learned"] = Field(
        description="closed_form: the task's reward of (s, a, s') computed inside the graphs; learned: ensemble output")
    terminates: bool = Field(description="whether the task's termination function can end an episode")
    # optional (no version bump): older exports have none; their terminates said closed_form or never
    termination: Literal["closed_form", "learned", "never"] | None = Field(
        None, description="how the plan graph ends imagined episodes: the task's closed-form rule, the ensemble's "
                          "learned termination head, or never (an env declared never to terminate)")
    normalisation: Literal["inside_graphs"] = Field(
        "inside_graphs", description="all input/output normalisation is inside the graphs; feed raw env units")
    opset: int
    files: dict[str, str] = Field(description="file name -> SHA-256 hex digest")
    train_steps: int = Field(ge=0, description="env steps the exported run had trained for")
    config: dict[str, Any] = Field(description="the run's resolved config")
    versions: dict[str, str] = Field(description="package versions at export time")
    created_utc: str
    # optional (no version bump): artifacts exported before the guard existed have none and load as before
    guard: GuardSpec | None = Field(None, description="the uncertainty guard's calibrated threshold; None: "
                                                      "no guard (older export, or fewer than 2 elites)")

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        for name, bound in (("act_low", self.act_low), ("act_high", self.act_high)):
            if len(bound) != self.act_dim:
                raise ValueError(f"{name} has {len(bound)} entries, act_dim is {self.act_dim}")
        if any(lo >= hi for lo, hi in zip(self.act_low, self.act_high, strict=True)):
            raise ValueError("act_low must be below act_high in every dimension")
        if self.num_elites > self.num_models or len(self.elites) != self.num_elites:
            raise ValueError(f"elites {self.elites} inconsistent with num_elites={self.num_elites}, "
                             f"num_models={self.num_models}")
        if any(not 0 <= e < self.num_models for e in self.elites):
            raise ValueError(f"elites {self.elites} out of range for num_models={self.num_models}")
        self.state_layout.check(self.state_dim)
        if self.guard is not None and len(self.guard.scale) != self.state_dim:
            raise ValueError(f"guard.scale has {len(self.guard.scale)} entries, state_dim is {self.state_dim}")
        if self.guard is not None and self.num_elites < 2:
            raise ValueError("guard needs num_elites >= 2 (a spread across members)")
        missing = [f"{g}.onnx" for g in GRAPH_NAMES if f"{g}.onnx" not in self.files]
        if missing:
            raise ValueError(f"files lacks {missing}")
        return self

    def metadata(self, graph: str) -> dict[str, str]:
        """The ONNX metadata_props for one graph: the key manifest fields as strings."""
        fields = self.model_dump()
        return {"graph": graph, **{k: json.dumps(fields[k]) for k in METADATA_KEYS}}


def graph_signatures(m: Manifest) -> dict[str, dict[str, dict[str, tuple[Dim, ...]]]]:
    """The input/output shapes every graph must have for manifest `m` (str = dynamic axis).

    One definition used by the exporter (to assert what it wrote) and by the loader (to refuse
    graphs that disagree), so the two cannot drift apart.
    """
    s, a, mm, n = m.state_dim, m.act_dim, m.num_models, len(m.state_layout.net_obs_idx)
    reward = {"reward": (mm, "batch")}
    if m.reward == "learned":
        reward["reward_logvar"] = (mm, "batch")
    return {
        "policy": {"inputs": {"net_obs": ("batch", n), "noise": ("batch", a)},
                   "outputs": {"mean": ("batch", a), "log_std": ("batch", a), "action": ("batch", a)}},
        "ensemble": {"inputs": {"state": ("batch", s), "action": ("batch", a)},
                     "outputs": {"next_state_mean": (mm, "batch", s), "next_state_logvar": (mm, "batch", s),
                                 **reward}},
        "q": {"inputs": {"state": ("batch", s), "action": ("batch", a)},
              "outputs": {"q1": ("batch",), "q2": ("batch",)}},
        "plan": {"inputs": {"state": (s,), "actions": ("particles", m.plan_horizon, a)},
                 "outputs": {"returns": ("particles",)}},
    }


# A graph's actual inputs or outputs ("inputs"/"outputs" -> name -> (onnxruntime type string, dims)), a dim an
# int when fixed and a str (or None when unnamed) when dynamic.
GraphIO = dict[str, dict[str, tuple[str, list[int | str | None]]]]


def signature_mismatch(io: GraphIO, m: Manifest, graph: str) -> str | None:
    """How a graph's inputs/outputs disagree with `graph_signatures(m)[graph]`, or None when they agree.

    The one check the exporter (on the graph it wrote) and the loader (on the graph it is given) both run:
    the names in order, float32 tensors, every fixed dim equal and every dynamic axis left dynamic (a graph
    whose batch axis was frozen at the export example's size would fail on the robot only at run time).
    """
    want = graph_signatures(m)[graph]
    for kind in ("inputs", "outputs"):
        got = io[kind]
        if list(got) != list(want[kind]):
            return f"graph {kind} are {list(got)}, the manifest implies {list(want[kind])}"
        for name, (dtype, dims) in got.items():
            if dtype != "tensor(float)":
                return f"{kind[:-1]} {name!r} is {dtype}, expected tensor(float)"
            expected = want[kind][name]
            agree = len(dims) == len(expected) and all(
                d == e if isinstance(e, int) else not isinstance(d, int) for d, e in zip(dims, expected))
            if not agree:
                return (f"{kind[:-1]} {name!r} has shape {_fmt_shape(dims)}, the manifest implies "
                        f"{_fmt_shape(expected)} (state_dim={m.state_dim}, act_dim={m.act_dim}, "
                        f"len(state_layout.net_obs_idx)={len(m.state_layout.net_obs_idx)}, "
                        f"num_models={m.num_models}, plan_horizon={m.plan_horizon}; names are dynamic axes)")
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bounded(file: Path, limit: int, what: str) -> tuple[bytes, str]:
    """The bytes of `file` and their SHA-256 hex digest, refusing a file over `limit` bytes.

    The size is checked before reading, and again while streaming (a file growing after the check
    still cannot take more than `limit` bytes of memory); hashing happens chunk by chunk as the
    bytes arrive, and the caller uses exactly these bytes, so nothing can change between check and use.
    """
    size = file.stat().st_size
    if size > limit:
        raise ArtifactError(f"{file}: {size} bytes, over the {limit}-byte limit for {what}; "
                            f"this is not a file written by `maac-robot export` (re-export the run)")
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    with file.open("rb") as stream:
        while chunk := stream.read(READ_CHUNK_BYTES):
            if buffer.tell() + len(chunk) > limit:
                raise ArtifactError(f"{file}: grew past the {limit}-byte limit for {what} while being read; "
                                    f"do not load artifacts that are still being written")
            digest.update(chunk)
            buffer.write(chunk)
    # getvalue() hands over the buffer without copying it, so a graph costs its size in memory once
    return buffer.getvalue(), digest.hexdigest()


def _fmt_idx(idx: list[int]) -> str:
    """Indices with runs of consecutive ones written start..end (inclusive): [0, 1, 2, 5] -> '0..2, 5'."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "[" + ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs) + "]"


def _fmt_shape(dims: Any) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def session_options(intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
                    allow_spinning: bool = DEFAULT_ALLOW_SPINNING) -> Any:
    """onnxruntime SessionOptions chosen for a control loop: bounded threads, no spinning, sequential."""
    import onnxruntime as ort

    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = 3
    return so


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate `manifest.json` (a directory or the file itself); format version checked first."""
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not path.exists():
        raise ArtifactError(f"artifact directory not found: {path}")
    if not file.is_file():
        raise ArtifactError(f"missing file: {file} (not an artifact directory written by `maac-robot export`?)")
    text, _ = _read_bounded(file, MAX_MANIFEST_BYTES, "a manifest")
    try:
        raw = json.loads(text.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        why = (" (format 1 policy graphs take the full state and its manifest lacks state_layout)"
               if version == 1 else "")
        raise ArtifactError(f"{file}: manifest format version {version!r}, this maac_robot "
                            f"{_package_version()} reads format version {FORMAT_VERSION}{why}; re-export the run "
                            f"with this version (`maac-robot export RUN --out DIR`) or load it with a matching "
                            f"maac_robot")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        lines = [f"{file}: invalid manifest:"]
        lines += [f"  {'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ArtifactError("\n".join(lines)) from None


def _package_version() -> str:
    # from the installed metadata, not `maac_robot.__version__`: the package root lazily offers the learner
    # (`maac_robot.MAAC`), and the runtime must not import anything that names it
    import importlib.metadata

    try:
        return importlib.metadata.version("maac-robot")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class Artifacts:
    """Verified, warmed-up onnxruntime sessions over one artifact directory (use `load_artifacts`).

    Inputs are cast to contiguous float32; shapes are checked so a wrong call fails with a
    message instead of an onnxruntime stack trace. Safe to call from several threads (e.g. the
    policy fallback beside a CEM worker): nothing here keeps per-call state and onnxruntime's
    `run` is thread-safe.
    """

    def __init__(self, path: Path, manifest: Manifest, sessions: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.sessions = sessions
        self._signatures = graph_signatures(manifest)
        self._outputs = {g: list(sig["outputs"]) for g, sig in self._signatures.items()}
        self._net_obs_idx = np.array(manifest.state_layout.net_obs_idx, dtype=np.intp)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if graph not in self.sessions:
            raise ArtifactError(f"{self.path / graph}.onnx was verified but not loaded; "
                                f"pass graphs=(..., {graph!r}) to load_artifacts to call it")
        return self.sessions[graph].run(self._outputs[graph], feeds)

    def _batch_pair(self, graph: str, state: np.ndarray, second: np.ndarray, second_name: str,
                    second_dim: int) -> tuple[np.ndarray, np.ndarray, bool]:
        state = np.ascontiguousarray(state, dtype=np.float32)
        second = np.ascontiguousarray(second, dtype=np.float32)
        single = state.ndim == 1
        if single:
            state, second = state[None], second[None]
        s = self.manifest.state_dim
        if state.ndim != 2 or state.shape[1] != s or second.shape != (state.shape[0], second_dim):
            raise ValueError(f"{graph}: expected state [B,{s}] (or [{s}]) and {second_name} [B,{second_dim}] "
                             f"with the same B, got {list(state.shape)} and {list(second.shape)}")
        return state, second, single

    def policy(self, state: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, log_std, action) for state [B,S] and standard-normal noise [B,A]; [S]/[A] also accepted.

        action = act_low + (tanh(mean + exp(log_std)·noise) + 1)/2·(act_high − act_low), so noise 0
        gives the deterministic action and the caller's own RNG makes sampling reproducible.
        The graph takes only the dims the actor reads (`state_layout.net_obs_idx`); they are picked here, so
        the controller keeps passing the state. `policy_net_obs` takes them directly.
        """
        state, noise, single = self._batch_pair("policy", state, noise, "noise", self.manifest.act_dim)
        return self._policy(np.ascontiguousarray(state[:, self._net_obs_idx]), noise, single)

    def policy_net_obs(self, net_obs: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `policy`, for the graph's own input net_obs = state[state_layout.net_obs_idx], [B,N] or [N]."""
        net_obs = np.ascontiguousarray(net_obs, dtype=np.float32)
        noise = np.ascontiguousarray(noise, dtype=np.float32)
        single = net_obs.ndim == 1
        if single:
            net_obs, noise = net_obs[None], noise[None]
        n, a = len(self._net_obs_idx), self.manifest.act_dim
        if net_obs.ndim != 2 or net_obs.shape[1] != n or noise.shape != (net_obs.shape[0], a):
            raise ValueError(f"policy: expected net_obs [B,{n}] (or [{n}]) and noise [B,{a}] with the same B, "
                             f"got {list(net_obs.shape)} and {list(noise.shape)}")
        return self._policy(net_obs, noise, single)

    def _policy(self, net_obs: np.ndarray, noise: np.ndarray,
                single: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mean, log_std, action = self._run("policy", {"net_obs": net_obs, "noise": noise})
        return (mean[0], log_std[0], action[0]) if single else (mean, log_std, action)

    def ensemble(self, state: np.ndarray, action: np.ndarray) -> dict[str, np.ndarray]:
        """Every member's next-state mean/logvar [M,B,S] and reward [M,B] (env units) for a batch."""
        state, action, single = self._batch_pair("ensemble", state, action, "action", self.manifest.act_dim)
        out = dict(zip(self._outputs["ensemble"], self._run("ensemble", {"state": state, "action": action}),
                       strict=True))
        return {k: v[:, 0] for k, v in out.items()} if single else out

    def q(self, state: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both critics (q1, q2), each [B] (scalars for a single [S], [A] pair)."""
        state, action, single = self._batch_pair("q", state, action, "action", self.manifest.act_dim)
        q1, q2 = self._run("q", {"state": state, "action": action})
        return (q1[0], q2[0]) if single else (q1, q2)

    def plan(self, state: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Predicted discounted return [P] of each action sequence in `actions` [P,H,A] from `state` [S].

        One onnxruntime call: particle i rolls through elite member elites[i % num_elites] with mean
        predictions, rewards, termination masks and a γ^H·min(Q1,Q2) terminal value at the
        deterministic policy action. H = plan_horizon. The graph takes P as a multiple of num_elites;
        any other P > 0 is padded here to the next multiple (particle i still uses i % num_elites).
        """
        m = self.manifest
        state = np.ascontiguousarray(state, dtype=np.float32).reshape(-1)
        actions = np.ascontiguousarray(actions, dtype=np.float32)
        if state.shape != (m.state_dim,):
            raise ValueError(f"plan: expected state [{m.state_dim}], got {list(state.shape)}")
        if actions.ndim != 3 or actions.shape[1:] != (m.plan_horizon, m.act_dim):
            raise ValueError(f"plan: expected actions [P,{m.plan_horizon},{m.act_dim}] "
                             f"(plan_horizon={m.plan_horizon}), got {list(actions.shape)}")
        particles = actions.shape[0]
        if particles == 0:
            raise ValueError("plan: actions holds no sequences (P=0)")
        pad = -particles % m.num_elites
        if pad:  # the graph needs a multiple of num_elites; padded rows are scored, then dropped
            actions = np.concatenate([actions, np.zeros((pad, *actions.shape[1:]), np.float32)])
        return self._run("plan", {"state": state, "actions": actions})[0][:particles]

    def warm_up(self, calls: int = 3) -> None:
        """Run every loaded graph a few times so the first control step does not pay allocation/first-run costs."""
        m = self.manifest
        rng = np.random.default_rng(0)
        s = rng.standard_normal((1, m.state_dim)).astype(np.float32)
        a = np.zeros((1, m.act_dim), np.float32)
        plan_actions = np.zeros((m.num_elites, m.plan_horizon, m.act_dim), np.float32)
        run = {"policy": lambda: self.policy(s, a), "ensemble": lambda: self.ensemble(s, a),
               "q": lambda: self.q(s, a), "plan": lambda: self.plan(s[0], plan_actions)}
        for _ in range(calls):
            for graph in self.sessions:
                run[graph]()

    def describe(self) -> str:
        """The manifest (without the config) and every graph's input/output signature, for humans."""
        lines = [f"artifacts: {self.path}"]
        for key, value in self.manifest.model_dump(exclude={"config", "files", "versions", "state_layout",
                                                            "guard"}).items():
            lines.append(f"  {key}: {value}")
        guard = self.manifest.guard
        if guard is None:
            lines.append("  guard: none (exported without an uncertainty guard)")
        else:
            lines.append(f"  guard: threshold {guard.threshold:.6g} (p{guard.percentile:g} x {guard.margin:g} over "
                         f"{guard.samples} replay-buffer pairs) of: {guard.definition}")
        layout = self.manifest.state_layout
        lines.append("  state_layout:")
        lines.append(f"    env_kwargs: {json.dumps(layout.env_kwargs)}  (gym.make(env_id, **env_kwargs) gives the state)")
        lines.append(f"    obs_idx: {_fmt_idx(layout.obs_idx)}  (gym.make(env_id)'s observation = state[obs_idx])")
        lines.append(f"    net_obs_idx: {_fmt_idx(layout.net_obs_idx)}  (policy.onnx's net_obs = state[net_obs_idx])")
        if layout.names is not None:
            lines.append("    names: " + " ".join(f"{i}:{name}" for i, name in enumerate(layout.names)))
        lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in self.manifest.versions.items()))
        lines.append("  files:")
        lines += [f"    {name}  sha256 {digest}" for name, digest in self.manifest.files.items()]
        lines.append("  config: " + json.dumps(self.manifest.config, sort_keys=True))
        for graph, sess in self.sessions.items():
            lines.append(f"graph {graph}.onnx (opset {self.manifest.opset}):")
            for kind, args in (("input ", sess.get_inputs()), ("output", sess.get_outputs())):
                lines += [f"  {kind} {arg.name:18s} {arg.type:16s} {_fmt_shape(arg.shape)}" for arg in args]
        return "\n".join(lines)


def _check_signature(file: Path, sess: Any, manifest: Manifest, graph: str) -> None:
    io = {kind: {arg.name: (arg.type, list(arg.shape)) for arg in args}
          for kind, args in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs()))}
    if problem := signature_mismatch(io, manifest, graph):
        raise ArtifactError(f"{file}: {problem}")


def _check_metadata(file: Path, graph: str, sess: Any, manifest: Manifest) -> None:
    meta = sess.get_modelmeta().custom_metadata_map
    for key, value in manifest.metadata(graph).items():
        if meta.get(key) != value:
            raise ArtifactError(f"{file}: metadata_props {key}={meta.get(key)!r} disagrees with the manifest "
                                f"({value!r}); the graph comes from a different export")


def load_artifacts(path: str | Path, expected_env_id: str | None = None,
                   intra_op_threads: int = DEFAULT_INTRA_OP_THREADS, *,
                   allow_spinning: bool = DEFAULT_ALLOW_SPINNING, warm_up: bool = True,
                   graphs: Collection[str] = GRAPH_NAMES) -> Artifacts:
    """Load an artifact directory, verify everything, and return warmed-up sessions.

    Refuses (ArtifactError, naming the file and the disagreement) on: a missing directory or
    file, a file over MAX_MANIFEST_BYTES / MAX_GRAPH_BYTES (checked before it is read), a manifest
    of another format version or failing its schema, an env id other than `expected_env_id`, a
    SHA-256 mismatch (tampered or truncated file; checked before onnxruntime parses anything),
    graphs whose input/output names, types or shapes disagree with the manifest, and
    metadata_props from another export. Each session is created from the very bytes that were
    hashed (no check-then-reload race).

    Sessions are opened for `graphs` only (all four by default): the controller never calls q.onnx, so it
    does not pay the session's memory and load time. Every file's hash is still checked, so an artifact
    directory is accepted or refused as a whole.
    """
    import onnxruntime as ort

    unknown = sorted(set(graphs) - set(GRAPH_NAMES))
    if unknown:
        raise ValueError(f"unknown graphs {unknown}; the artifacts hold {list(GRAPH_NAMES)}")
    path = Path(path)
    manifest = read_manifest(path)
    if expected_env_id is not None and manifest.env_id != expected_env_id:
        raise ArtifactError(f"{path}: artifacts are for env {manifest.env_id!r}, expected {expected_env_id!r}")
    options = session_options(intra_op_threads, allow_spinning)
    sessions = {}
    for graph in GRAPH_NAMES:
        file = path / f"{graph}.onnx"
        if not file.is_file():
            raise ArtifactError(f"missing file: {file} (listed in {path / MANIFEST_NAME})")
        data, digest = _read_bounded(file, MAX_GRAPH_BYTES, "a graph")
        if digest != manifest.files[file.name]:
            raise ArtifactError(f"{file}: SHA-256 mismatch (file {digest[:16]}…, manifest "
                                f"{manifest.files[file.name][:16]}…, {len(data)} bytes): the file was "
                                f"modified or truncated after export")
        if graph not in graphs:
            continue
        try:
            sess = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises several private exception types
            raise ArtifactError(f"{file}: onnxruntime cannot load it: {err}") from None
        _check_signature(file, sess, manifest, graph)
        sessions[graph] = sess
    # after every signature passed, so a wrong manifest field is reported as the shape it breaks
    for graph, sess in sessions.items():
        _check_metadata(path / f"{graph}.onnx", graph, sess, manifest)
    artifacts = Artifacts(path, manifest, sessions)
    if warm_up:
        artifacts.warm_up()
    return artifacts
