"""Where a run's evaluations go besides `metrics.jsonl`: TensorBoard event files in `RUN_DIR/tensorboard`
(always), and Weights & Biases when the config asks for it (`train.wandb: true`) and `wandb` is installed.

Each evaluation record becomes one set of scalars at its env step: the deterministic return (mean, std),
the critic's bias, the training episodes' return, the G2 losses and α, the ensemble's fit (holdout error,
epochs), the buffer sizes, cumulative wall and CPU seconds per phase, and env steps per wall second
since the previous evaluation.

A resumed run appends to the same event directory with `purge_step` one past its checkpoint, so
TensorBoard hides what the interrupted process logged after that checkpoint and no step appears twice
(the same rule `metrics.jsonl` follows).
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any

from maac_robot.runtime.errors import UserError

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"  # the run's W&B id, so a resumed run continues the same W&B run


def scalars(record: dict[str, Any], steps_per_s: float | None = None) -> dict[str, float]:
    """The TensorBoard/W&B scalars of one evaluation record (`Trainer.evaluate`), by tag."""
    out: dict[str, float] = {"eval/return_mean": record["eval_return_mean"],
                             "eval/return_std": record["eval_return_std"]}
    if record.get("critic_bias") is not None:
        out["eval/critic_bias"] = record["critic_bias"]
    if record.get("train_return_mean") is not None:
        out["train/episode_return_mean"] = record["train_return_mean"]
    out.update({f"update/{k}": v for k, v in record.get("losses", {}).items()})  # q_loss, policy_loss, alpha, ...
    out.update({f"model/{k}": v for k, v in record.get("model", {}).items()})  # holdout_mse, epochs, ...
    for key in ("buffer_env", "buffer_model"):
        if key in record:
            out[f"buffer/{key.removeprefix('buffer_')}"] = record[key]
    out["time/wall_s"] = record.get("wall_time_s", 0.0)
    out.update({f"time/{k}_wall_s": v for k, v in record.get("phase_time_s", {}).items()})
    out.update({f"time/{k}_cpu_s": v for k, v in record.get("phase_cpu_s", {}).items()})
    if steps_per_s is not None:
        out["time/env_steps_per_s"] = steps_per_s
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb is true but wandb is not installed: `pip install wandb` (and `wandb login`), "
                        "or leave train.wandb false (TensorBoard event files are written either way)") from None
    return wandb


class RunLoggers:
    """TensorBoard (and W&B) writers for one `Trainer.train` call; `log` one evaluation record at a time."""

    def __init__(self, run_dir: Path, *, config: dict[str, Any], use_wandb: bool, purge_step: int | None,
                 start_step: int, start_wall_s: float) -> None:
        wandb = _import_wandb() if use_wandb else None  # refuse before anything is written
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("TensorBoard event files need the tensorboard package, part of the [train] extra: "
                            "pip install 'maac-robot[train]'") from None
        self.directory = run_dir / TENSORBOARD_DIR
        self.tb = SummaryWriter(str(self.directory), purge_step=purge_step)
        self.wandb_run = None
        if wandb is not None:
            id_file = run_dir / WANDB_ID_FILE
            if not id_file.is_file():
                id_file.write_text(secrets.token_hex(8) + "\n")
            # W&B keeps only increasing steps: after a resume it ignores the steps it already has.
            self.wandb_run = wandb.init(project="maac-robot", name=run_dir.name, id=id_file.read_text().strip(),
                                        resume="allow", dir=str(run_dir), config=config)
        self._last = (start_step, start_wall_s)

    def log(self, record: dict[str, Any]) -> None:
        step, wall = int(record["env_step"]), float(record.get("wall_time_s", 0.0))
        rate = (step - self._last[0]) / (wall - self._last[1]) if wall > self._last[1] and step > self._last[0] else None
        self._last = (step, wall)
        values = scalars(record, rate)
        for tag, value in values.items():
            self.tb.add_scalar(tag, value, step)
        self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
