"""Config schemas the robot side reads, and the machinery every config section shares.

One YAML file per task holds every section; each process validates only the sections it uses
(the controller `controller`, the sim `env` and `sim`), so a robot computer needs neither torch
nor Gymnasium to read it. Every section forbids unknown keys, so a typo'd key fails loudly with
the field's path instead of silently falling back to a default.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from maac_robot.runtime.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


S = TypeVar("S", bound=Section)

SECTION_NAMES = ("env", "model", "agent", "rollout", "train", "sim", "controller")
"""The sections of a task's YAML file. Each process knows the schemas of the sections it reads; the
names alone let it pass over `--set` flags meant for the others (one flag list serves sim and controller)."""


class EnvConfig(Section):
    id: str = Field(min_length=1, description="Gymnasium env id, e.g. HalfCheetah-v5; an env your own package "
                    "registers: yourpkg.module:MyEnv-v0 (the module is imported first)")
    max_episode_steps: int | None = Field(default=None, gt=0, description="None: the env's own limit")
    terminates: bool | None = Field(default=None, description=(
        "whether imagined rollouts can end: None uses the task's closed-form termination (built-in or "
        "maac_robot.register_task) or else learns one (the ensemble's termination head); false: the env never "
        "terminates, only truncates (no head); true: it does (learned unless a closed-form rule is registered)"))


def _value_or_range(what: str, check: Callable[[float], bool], integer: bool = False) -> BeforeValidator:
    """A number, or a range `[lo, hi]` (lo <= hi) that the sim samples a new value from each episode."""

    def one(value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be {what} or a range [lo, hi] of them, got {value!r}")
        if integer and value != int(value):
            raise ValueError(f"must be {what} (a whole number), got {value!r}")
        if not check(value):
            raise ValueError(f"must be {what}, got {value!r}")
        return int(value) if integer else float(value)

    def validate(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"a range is [lo, hi] (two values), got {list(value)!r}")
            lo, hi = one(value[0]), one(value[1])
            if lo > hi:
                raise ValueError(f"range [{lo}, {hi}]: lo must not exceed hi")
            return (lo, hi)
        return one(value)

    return BeforeValidator(validate)


Scale = Annotated[float | tuple[float, float], _value_or_range("a number > 0", lambda v: v > 0)]
NonNegative = Annotated[float | tuple[float, float], _value_or_range("a number >= 0", lambda v: v >= 0)]
Probability = Annotated[float | tuple[float, float], _value_or_range("a probability in [0, 1]", lambda v: 0 <= v <= 1)]
Ticks = Annotated[int | tuple[int, int], _value_or_range("a tick count >= 0", lambda v: v >= 0, integer=True)]


class PerturbConfig(Section):
    """A sim that differs from the nominal env on purpose (`sim.perturb`, `maac-robot sim --perturb KEY=VALUE`).

    Every value may be a range `[lo, hi]`: the sim samples a new value from it at each reset (domain
    randomisation), from a generator seeded by the sim seed and the reset seed, so lockstep stays
    deterministic. Scales multiply the model's nominal values, which the sim keeps, so resampling never
    compounds. The sim reports the perturbation in force (hello_reply metadata, each recording, its log).
    """

    mass_scale: Scale = Field(1.0, description="multiplies every body's mass and inertia")
    body_mass_scale: dict[str, Scale] = Field(default_factory=dict, description="body name -> mass and inertia "
                                              "scale, on top of mass_scale (names checked against the model)")
    damping_scale: Scale = Field(1.0, description="multiplies every joint's damping (dof_damping)")
    friction_scale: Scale = Field(1.0, description="multiplies every geom's friction coefficients")
    actuator_gain_scale: Scale = Field(1.0, description="multiplies every actuator's force (gain and bias terms)")
    obs_noise_std: NonNegative = Field(0.0, description="std of Gaussian noise added to each served observation "
                                       "(state units; the physics is untouched)")
    action_delay_ticks: Ticks = Field(0, description="the robot applies the action received this many control "
                                      "periods earlier (the safe action before that)")
    push_prob: Probability = Field(0.0, description="probability per control period of a random push")
    push_force: NonNegative = Field(0.0, validate_default=True, description="a push's force in N: horizontal, random direction, on "
                                    "push_body for one control period")
    push_body: str | None = Field(None, description="the body pushed; None: the model's first body (the root)")

    @field_validator("push_force")
    @classmethod
    def _pushes_need_a_force(cls, value: float | tuple[float, float], info: ValidationInfo) -> Any:
        if _upper(info.data.get("push_prob", 0.0)) > 0 and _upper(value) == 0:
            raise ValueError("must be > 0 when push_prob > 0")
        return value

    @property
    def nominal(self) -> bool:
        """Whether this perturbs nothing (the defaults)."""
        return self == PerturbConfig()

    def in_force(self) -> dict[str, Any]:
        """The settings that differ from the nominal env, as JSON-ready values."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def __repr_args__(self) -> Any:
        """Only the settings that differ from the defaults: `PerturbConfig()` is the nominal env (e.g. in --help)."""
        changed = self.model_dump(exclude_defaults=True)
        return [(key, value) for key, value in super().__repr_args__() if key in changed]


def _upper(value: float | tuple[float, float]) -> float:
    return value[1] if isinstance(value, tuple) else value


class SimConfig(Section):
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
    perturb: PerturbConfig = Field(default_factory=PerturbConfig, description="dynamics that differ from the "
                                   "nominal env on purpose (maac-robot sim --perturb KEY=VALUE; README)")


class ControllerConfig(Section):
    """Real-time CEM-MPC seeded by the stochastic policy (paper §5.4)."""

    planner: Literal["cem", "policy"] = "cem"
    population: int = Field(256, gt=1)
    iterations: int = Field(5, gt=0, description="upper bound; the deadline may stop CEM earlier")
    elite_frac: float = Field(0.1, gt=0, le=1)
    momentum: float = Field(0.1, ge=0, lt=1)
    policy_frac: float = Field(0.0, ge=0, le=1, description="share of each population that is the stochastic "
                              "policy rolled through the model (sampled once per step, in every iteration; TD-MPC2). "
                              "0 by default: no measurable gain on InvertedPendulum/Hopper/HalfCheetah, and the "
                              "closed-loop rollouts cost ~2 ms a step (benchmarks/mpc.py, benchmarks/RESULTS.md)")
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
    guard: Literal["off", "policy", "safe"] = Field(
        "policy", description="uncertainty guard: when the ensemble's elites disagree about the next state of the "
        "action to send by more than the manifest's calibrated guard.threshold (x guard_scale), send the policy "
        "action ('policy') or the safe action, zero clipped into the bounds ('safe'), and count the step; 'off' "
        "(or artifacts without a guard) never overrides")
    guard_scale: float = Field(1.0, gt=0, description="multiplier on the manifest's guard.threshold")
    guard_steps: int = Field(1, ge=1, description="plan steps the guard checks: 1 the action to send; k > 1 also "
                             "the next k-1 actions of the CEM plan along the elites' mean prediction (one more "
                             "ensemble call each)")
    seed: int = 0

    @field_validator("guard", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `off` (in a file or in `--set controller.guard=off`) as false: that is 'off'."""
        return "off" if value is False else value

    @model_validator(mode="before")
    @classmethod
    def _plan_horizon_is_the_artifacts(cls, data: Any) -> Any:
        """Run directories saved by versions that had a `horizon` field carry `horizon: null`: dropped, so those
        runs still resume, evaluate and export. A number is refused as an unknown key: the plan graph's horizon
        is fixed at export (`maac-robot export --plan-horizon`)."""
        if isinstance(data, dict) and "horizon" in data and data["horizon"] is None:
            return {k: v for k, v in data.items() if k != "horizon"}
        return data


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message names the file and the offending fields."""


def format_errors(source: str, err: ValidationError, prefix: str = "", flags: dict[str, str] | None = None) -> str:
    """One line per bad field; a field set on the command line names the flag that set it."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = prefix + (".".join(str(p) for p in e["loc"]) or "<root>")
        flag = next((f for key, f in (flags or {}).items() if field == key or field.startswith(key + ".")), None)
        lines.append(f"  {field}{f' (from {flag})' if flag else ''}: {e['msg']}")
    return "\n".join(lines)


def section_keys(sections: Mapping[str, type[Section]]) -> dict[str, type[Section]]:
    """Every `section.key` of `sections` (name -> model), with its section's model."""
    return {f"{name}.{key}": model for name, model in sections.items() for key in model.model_fields}


def section_help(sections: Mapping[str, type[Section]]) -> str:
    """Every `--set` key with its default and description, for `--help` (from the models, so never stale)."""
    lines = ["config keys for --set (default; description):"]
    for name, model in sections.items():
        for key, info in model.model_fields.items():
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            lines.append(f"  {name}.{key} ({default})" + (f": {info.description}" if info.description else ""))
    return "\n".join(lines)


def parse_set(items: list[str] | None, sections: Mapping[str, type[Section]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Repeatable `--set section.key=value` flags as (overrides for `load_section`, the flag behind each key).

    Values are read as YAML, so `3` is an int, `true` a bool, `null` None and `[1, 2]` a list; the
    section's pydantic model then validates and converts them like values from the file (`1e-3` for
    a float field included). An unknown key of `sections` is refused with the closest known ones; a
    key of another of the file's sections is left to the process that reads that section.
    """
    known = section_keys(sections)
    overrides: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for item in items or []:
        dotted, sep, raw = item.partition("=")
        dotted = dotted.strip()
        if not sep or "." not in dotted:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set agent.horizon=5")
        if dotted.partition(".")[0] in set(SECTION_NAMES) - set(sections):
            continue
        if dotted not in known:
            close = difflib.get_close_matches(dotted, list(known), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; --help lists the keys this command takes"
            raise ConfigError(f"--set {item!r}: unknown config key {dotted!r}{hint}")
        try:
            overrides[dotted] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        flags[dotted] = f"--set {item}"
    return overrides, flags


def merge_perturb(base: PerturbConfig, items: list[str] | None) -> PerturbConfig:
    """`base` (the config's `sim.perturb`) with repeatable `--perturb KEY=VALUE` flags merged over it.

    KEY is a `PerturbConfig` field, or `body_mass_scale.BODY` for one body; VALUE is read as YAML
    like `--set` (`1.5`, `[0.8, 1.2]` for a range). A flag replaces the config's value of its key;
    bodies are merged one by one. Errors name the key and the flag that set it.
    """
    if not items:
        return base
    data = base.model_dump(exclude_defaults=True)
    flags: dict[str, str] = {}
    fields = list(PerturbConfig.model_fields)
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        name, dot, body = key.partition(".")
        if not sep or not key:
            raise ConfigError(f"--perturb {item!r}: expected KEY=VALUE, e.g. --perturb mass_scale=1.5")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"the keys are {', '.join(fields)}"
            raise ConfigError(f"--perturb {item!r}: unknown perturbation {name!r}; {hint}")
        if dot and (name != "body_mass_scale" or not body):
            raise ConfigError(f"--perturb {item!r}: only body_mass_scale takes a body name (body_mass_scale.BODY=...)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--perturb {item!r}: the value is not valid YAML ({err})") from None
        if dot:
            data[name] = {**data.get(name, {}), body: value}
        else:
            data[name] = value
        flags[f"sim.perturb.{key}"] = f"--perturb {item}"
    try:
        return PerturbConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors("--perturb", err, prefix="sim.perturb.", flags=flags)) from None


# The built-in task configs ship inside the package (maac_robot/configs/NAME.yaml), so `--config hopper` works
# from any directory and in a plain `pip install .`.
BUILTIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def builtin_configs() -> list[str]:
    """Names of the built-in configs (`--config NAME`)."""
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """The YAML file `--config` names: an existing file as given; otherwise a built-in name (`hopper`,
    `hopper.yaml`), or `configs/hopper.yaml`, where the repository kept the built-in configs before they
    became package data (older commands and records name them so)."""
    path = Path(path)
    if path.is_file():
        return path
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs"):
        builtin = BUILTIN_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
        if builtin.is_file():
            return builtin
    raise ConfigError(f"config file not found: {path} (built-in configs, usable from any directory: "
                      f"{', '.join(builtin_configs())}; e.g. --config {builtin_configs()[0]})")


def read_sections(path: str | Path) -> dict[str, Any]:
    """The raw mapping of sections in a YAML config file (a path or a built-in name, see `resolve_config`),
    or a ConfigError saying why there is none."""
    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`data` (sections read from a file) with `--set` overrides (dotted key -> value) applied."""
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data[section] = {**(data.get(section) or {}), key: value}
    return data


def load_section(path: str | Path | None, name: str, model: type[S], overrides: dict[str, Any] | None = None,
                 flags: dict[str, str] | None = None) -> S:
    """Validate one section only, so a process never needs the dependencies of sections it does not use.

    `path` None: the section's defaults (and `overrides` of keys in this section; others are ignored).
    """
    data = read_sections(path) if path is not None else {}
    apply_overrides(data, {k: v for k, v in (overrides or {}).items() if k.startswith(name + ".")})
    try:
        return model.model_validate(data.get(name) or {})
    except ValidationError as err:
        raise ConfigError(format_errors(str(path or "<defaults>"), err, prefix=f"{name}.", flags=flags)) from None


