"""Run configuration: one YAML per task, validated by pydantic before anything starts.

Every section forbids unknown keys, so a typo'd key fails loudly with the field's path
instead of silently falling back to a default. Defaults are the MAAC authors' settings
(their public code) unless a comment says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from maac_robot.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnvConfig(_Section):
    id: str = Field(description="Gymnasium env id, e.g. HalfCheetah-v5")
    max_episode_steps: int | None = Field(default=None, gt=0, description="None: the env's own limit")

    @field_validator("id")
    @classmethod
    def _known_env(cls, value: str) -> str:
        import gymnasium as gym

        if value not in gym.registry:
            raise ValueError(f"unknown Gymnasium env id {value!r}")
        return value


class ModelConfig(_Section):
    """Bootstrap ensemble of probabilistic dynamics models (paper §4.3, 'Model learning')."""

    num_models: int = Field(8, gt=0)
    num_elites: int = Field(6, gt=0)
    hidden: int = Field(200, gt=0)
    layers: int = Field(4, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(2.5e-5, ge=0)
    batch_size: int = Field(256, gt=0)
    holdout_ratio: float = Field(0.2, gt=0, lt=1)
    patience: int = Field(5, gt=0, description="epochs without holdout improvement before stopping")
    max_epochs: int | None = Field(None, gt=0, description="cap on epochs per retraining; None: until early stop")
    min_logvar: float = -10.0
    max_logvar: float = 0.5
    train_every: int = Field(250, gt=0, description="env steps between model retrainings")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.num_elites > self.num_models:
            raise ValueError(f"num_elites ({self.num_elites}) exceeds num_models ({self.num_models})")
        if self.min_logvar >= self.max_logvar:
            raise ValueError("min_logvar must be below max_logvar")
        return self


class AgentConfig(_Section):
    """Actor, twin critics and the MAAC objective, with every ablation of the paper as a switch."""

    horizon: int = Field(3, ge=0, description="H: model steps in the pathwise policy objective (0: model-free actor)")
    num_samples: int = Field(5, gt=0, description="imagined trajectories per start state in the policy objective")
    terminal_q_samples: int = Field(5, gt=0, description="actions sampled at s_H, Q averaged over them")
    steve: bool = Field(True, description="STEVE-style model-expanded critic targets")
    steve_horizon: int = Field(2, ge=0)
    entropy: bool = Field(True, description="max-entropy policy with automatic temperature")
    real_data_only: bool = Field(False, description="ablation: policy/Q trained on D_env only, no D_model")
    gamma: float = Field(0.99, gt=0, le=1)
    tau: float = Field(5e-3, gt=0, le=1)
    critic_pessimism: float = Field(1.0, ge=0, le=1, description="critic targets use mean(Q1,Q2) − this·|Q1−Q2|/2: "
                                    "1 is clipped double Q (min), 0 the twins' mean")
    lr: float = Field(3e-4, gt=0)
    hidden: int = Field(256, gt=0)
    layers: int = Field(2, gt=0)
    batch_size: int = Field(256, gt=0)
    real_ratio: float = Field(0.05, ge=0, le=1, description="share of real transitions in each G2 batch")
    updates_per_step: int = Field(8, gt=0, description="G2 gradient steps per env step")
    target_entropy: float | None = Field(None, description=(
        "nats of log π in env units; None: -|A|. SAC sets -|A| on the [-1, 1]-normalised action, which for bounds "
        "±c is -|A| + Σ log c here (InvertedPendulum, c = 3: 0.1)"))
    init_alpha: float = Field(1.0, gt=0)


class RolloutConfig(_Section):
    """Imagined k-step rollouts that fill D_model (Algorithm 1, line 7)."""

    length: int = Field(1, gt=0)
    batch_size: int = Field(10_000, gt=0, description="start states per rollout round")
    every: int = Field(250, gt=0, description="env steps between rollout rounds")
    retain_rounds: int = Field(20, gt=0, description="D_model holds this many rounds of rollouts")


class TrainConfig(_Section):
    total_steps: int = Field(20_000, gt=0)
    initial_random_steps: int = Field(5_000, ge=0)
    eval_every: int = Field(1_000, gt=0)
    eval_episodes: int = Field(5, gt=0)
    checkpoint_every: int = Field(1_000, gt=0)
    buffer_size: int = Field(1_000_000, gt=0)
    seed: int = 0
    device: str = Field("cpu", description="'cpu' or 'cuda'; nothing requires a GPU")
    num_threads: int | None = Field(None, gt=0, description="torch intra-op threads; None: all cores")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: autocast the G2 updates' matrix products (same algorithm, coarser "
        "rounding; pays on CPUs with AVX512-BF16/AMX and on recent GPUs)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")
        return value


class SimConfig(_Section):
    """The sim process (robot side of the protocol)."""

    bind: str = "tcp://127.0.0.1:5555"
    mode: Literal["lockstep", "realtime"] = "lockstep"
    watchdog_periods: float = Field(3.0, gt=0, description="no valid action for this many dt: apply the safe action")
    max_message_bytes: int = Field(1 << 16, gt=0, description="largest message (all frames) a peer may send")
    seed: int = 0
    owner_timeout_s: float = Field(2.0, gt=0, description="an episode's owner silent this long loses it to another "
                                   "controller's reset (at least the watchdog period)")
    server_key: Path | None = Field(None, description="CURVE: the sim's NAME.key_secret (maac-robot keys)")
    authorized: Path | None = Field(None, description="CURVE: directory of the controllers' public NAME.key files")
    admin_key: Path | None = Field(None, description="CURVE: public key allowed to send shutdown over the wire")
    insecure: bool = Field(False, description="allow a bind off loopback without keys (warns)")
    memory_headroom_mb: float = Field(256, gt=0, description="resident memory above the start-up size at which "
                                      "every connection is dropped (ZeroMQ buffers multipart messages whole)")


class ControllerConfig(_Section):
    """Real-time CEM-MPC seeded by the stochastic policy (paper §5.4)."""

    planner: Literal["cem", "policy"] = "cem"
    population: int = Field(256, gt=1)
    horizon: int | None = Field(None, gt=0, description="None: the plan graph's (manifest plan_horizon); "
                                "a value must equal it, the fused graph's horizon is fixed at export")
    iterations: int = Field(5, gt=0, description="upper bound; the deadline may stop CEM earlier")
    elite_frac: float = Field(0.1, gt=0, le=1)
    momentum: float = Field(0.1, ge=0, lt=1)
    policy_frac: float = Field(0.0, ge=0, le=1, description="share of each population that is the stochastic "
                              "policy rolled through the model (sampled once per step, in every iteration; TD-MPC2). "
                              "0 by default: no measurable gain on InvertedPendulum/Hopper/HalfCheetah, and the "
                              "closed-loop rollouts cost ~2 ms a step (benchmarks/RESULTS.md, issue 5)")
    budget_frac: float = Field(0.45, gt=0, lt=1, description="planning budget as a fraction of dt; latency p99 "
                               "is the budget plus ~0.5 ms wake-up jitter (measured), so 0.45 keeps it under dt/2")
    timeout_periods: float = Field(10.0, gt=0, description="observation receive timeout in dt")
    retry_s: float = Field(0.1, gt=0, description="resend an unanswered request (same seq) after this long")
    reconnect_s: float = Field(30.0, ge=0, description="after losing the robot, keep trying to reconnect and "
                               "start a new episode for this long; 0: exit with one line instead")
    client_key: Path | None = Field(None, description="CURVE: this controller's NAME.key_secret")
    server_public: Path | None = Field(None, description="CURVE: the robot's public NAME.key")
    realtime_priority: int | None = Field(
        None, ge=1, le=99, description="real-time mode: SCHED_FIFO priority of the control process (Linux, needs "
        "CAP_SYS_NICE); None: normal scheduling, which misses deadlines on a loaded machine")
    seed: int = 0


class Config(_Section):
    env: EnvConfig
    model: ModelConfig = ModelConfig()
    agent: AgentConfig = AgentConfig()
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    sim: SimConfig = SimConfig()
    controller: ControllerConfig = ControllerConfig()


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message names the file and the offending fields."""


def _format_errors(source: str, err: ValidationError, prefix: str = "", flags: dict[str, str] | None = None) -> str:
    """One line per bad field; a field set on the command line names the flag that set it."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = prefix + (".".join(str(p) for p in e["loc"]) or "<root>")
        flag = next((f for key, f in (flags or {}).items() if field == key or field.startswith(key + ".")), None)
        lines.append(f"  {field}{f' (from {flag})' if flag else ''}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>", flags: dict[str, str] | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err, flags=flags)) from None


def config_keys() -> dict[str, type[BaseModel]]:
    """Every `section.key` a config has, with its section's model."""
    keys = {}
    for section, field in Config.model_fields.items():
        model = field.annotation
        keys.update({f"{section}.{key}": model for key in model.model_fields})  # type: ignore[union-attr]
    return keys


def config_help(sections: tuple[str, ...] | None = None) -> str:
    """Every `--set` key with its default and description, for `--help` (from the models, so never stale)."""
    lines = ["config keys for --set (default; description):"]
    for section, field in Config.model_fields.items():
        if sections is not None and section not in sections:
            continue
        model = field.annotation
        for key, info in model.model_fields.items():  # type: ignore[union-attr]
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            lines.append(f"  {section}.{key} ({default})" + (f": {info.description}" if info.description else ""))
    return "\n".join(lines)


def parse_set(items: list[str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Repeatable `--set section.key=value` flags as (overrides for `load_config`, the flag behind each key).

    Values are read as YAML, so `3` is an int, `true` a bool, `null` None and `[1, 2]` a list; the
    section's pydantic model then validates and converts them like values from the file (`1e-3` for
    a float field included). An unknown key is refused with the closest known ones.
    """
    import difflib

    known = config_keys()
    overrides: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for item in items or []:
        dotted, sep, raw = item.partition("=")
        dotted = dotted.strip()
        if not sep or "." not in dotted:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set agent.horizon=5")
        if dotted not in known:
            close = difflib.get_close_matches(dotted, list(known), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; `maac-robot train --help` lists the sections"
            raise ConfigError(f"--set {item!r}: unknown config key {dotted!r}{hint}")
        try:
            overrides[dotted] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        flags[dotted] = f"--set {item}"
    return overrides, flags


def read_sections(path: str | Path) -> dict[str, Any]:
    """The raw mapping of sections in a YAML config file, or a ConfigError saying why there is none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _apply(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data[section] = {**(data.get(section) or {}), key: value}
    return data


def load_section(path: str | Path | None, name: str, model: type[_Section], overrides: dict[str, Any] | None = None,
                 flags: dict[str, str] | None = None) -> _Section:
    """Validate one section only: the controller reads `controller` without the learner's env checks.

    `path` None: the section's defaults (and `overrides` of keys in this section; others are ignored).
    """
    data = read_sections(path) if path is not None else {}
    _apply(data, {k: v for k, v in (overrides or {}).items() if k.startswith(name + ".")})
    try:
        return model.model_validate(data.get(name) or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(str(path or "<defaults>"), err, prefix=f"{name}.", flags=flags)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                flags: dict[str, str] | None = None) -> Config:
    """Read and validate a YAML config; `overrides` maps dotted keys ('train.seed') to values, and
    `flags` the command-line flag behind each (named in errors instead of blaming the file)."""
    return config_from_dict(_apply(read_sections(path), overrides), str(path), flags)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
