"""Run configuration: one YAML per task, validated by pydantic before anything starts.

Every section forbids unknown keys, so a typo'd key fails loudly with the field's path
instead of silently falling back to a default. Defaults are the MAAC authors' settings
(their public code) unless a comment says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from maac_robot.runtime.config import (ConfigError, ControllerConfig, EnvConfig, Section, SimConfig, apply_overrides,
                                       format_errors, read_sections, section_help)
from maac_robot.runtime.config import parse_set as parse_sections
from maac_robot.runtime.files import atomic_write


class RegisteredEnvConfig(EnvConfig):
    """The env section as the learner reads it: the id is checked against Gymnasium's registry at load, after
    importing the module of a `yourpkg.module:EnvId` id (so a typo fails before a run directory exists)."""

    @field_validator("id")
    @classmethod
    def _known_env(cls, value: str) -> str:
        from maac_robot.envs import check_env_id

        check_env_id(value)  # EnvError is a ValueError: reported as this field's error, in one line
        return value


class ModelConfig(Section):
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


class AgentConfig(Section):
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


class RolloutConfig(Section):
    """Imagined k-step rollouts that fill D_model (Algorithm 1, line 7)."""

    length: int = Field(1, gt=0)
    batch_size: int = Field(10_000, gt=0, description="start states per rollout round")
    every: int = Field(250, gt=0, description="env steps between rollout rounds")
    retain_rounds: int = Field(20, gt=0, description="D_model holds this many rounds of rollouts")


class TrainConfig(Section):
    total_steps: int = Field(20_000, gt=0)
    initial_random_steps: int = Field(5_000, ge=0)
    eval_every: int = Field(1_000, gt=0)
    eval_episodes: int = Field(5, gt=0)
    stop_return: float | None = Field(None, description="stop before total_steps once every episode of `stop_evals` "
                                      "consecutive evaluations returns at least this; None: run to total_steps")
    stop_evals: int = Field(2, gt=0, description="consecutive evaluations that must hold stop_return")
    checkpoint_every: int = Field(1_000, gt=0)
    buffer_size: int = Field(1_000_000, gt=0)
    seed: int = 0
    device: str = Field("cpu", description="'cpu' or 'cuda'; nothing requires a GPU")
    num_threads: int | None = Field(None, gt=0, description="torch intra-op threads; None: the CPUs this process "
                                    "may use (affinity and cgroup quota) that no other process is running on at "
                                    "start; recorded in RUN_DIR/sessions.jsonl")
    wandb: bool = Field(False, description="also log each evaluation to Weights & Biases (needs `pip install wandb`; "
                        "TensorBoard event files in RUN_DIR/tensorboard are written either way)")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: autocast the G2 updates' matrix products (same algorithm, coarser "
        "rounding; pays on CPUs with AVX512-BF16/AMX and on recent GPUs)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")
        return value


class Config(Section):
    env: RegisteredEnvConfig
    model: ModelConfig = ModelConfig()
    agent: AgentConfig = AgentConfig()
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    sim: SimConfig = SimConfig()
    controller: ControllerConfig = ControllerConfig()


SECTIONS: dict[str, type[Section]] = {name: field.annotation for name, field in Config.model_fields.items()}  # type: ignore[misc]


def config_from_dict(data: dict[str, Any], source: str = "<dict>", flags: dict[str, str] | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(source, err, flags=flags)) from None


def config_help(sections: tuple[str, ...] | None = None) -> str:
    """Every `--set` key of `sections` (None: all) with its default and description, for `--help`."""
    return section_help({name: SECTIONS[name] for name in sections or SECTIONS})


def parse_set(items: list[str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """`--set section.key=value` flags against every section of the config (see `runtime.config.parse_set`)."""
    return parse_sections(items, SECTIONS)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                flags: dict[str, str] | None = None) -> Config:
    """Read and validate a YAML config; `overrides` maps dotted keys ('train.seed') to values, and
    `flags` the command-line flag behind each (named in errors instead of blaming the file)."""
    return config_from_dict(apply_overrides(read_sections(path), overrides), str(path), flags)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config (atomically: a resumed run reads it back)."""
    atomic_write(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
