"""Config schemas the robot side reads, and the machinery every config section shares.

One YAML file per task holds every section; each process validates only the sections it uses
(the controller `controller`, the sim `env` and `sim`), so a robot computer needs neither torch
nor Gymnasium to read it. Every section forbids unknown keys, so a typo'd key fails loudly with
the field's path instead of silently falling back to a default.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maac_robot.runtime.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


S = TypeVar("S", bound=Section)

SECTION_NAMES = ("env", "model", "agent", "rollout", "train", "sim", "controller")
"""The sections of a task's YAML file. Each process knows the schemas of the sections it reads; the
names alone let it pass over `--set` flags meant for the others (one flag list serves sim and controller)."""


class EnvConfig(Section):
    id: str = Field(min_length=1, description="Gymnasium env id, e.g. HalfCheetah-v5")
    max_episode_steps: int | None = Field(default=None, gt=0, description="None: the env's own limit")


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
    seed: int = 0

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


