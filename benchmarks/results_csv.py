"""The benchmark result tables: CSV files under benchmarks/results/, one row per measurement.

Shared by the benchmark scripts (which write rows) and `report.py` (which reads them). Every row carries the
command line and the git commit that produced it, so a number in RESULTS.md can always be traced to a
command. Run directories (checkpoints, logs, metrics.jsonl) stay untracked under benchmarks/runs/; these
CSVs are the record.

Sample-efficiency rows (`EVAL_COLUMNS`, files `sample_efficiency_<task>.csv`) are one evaluation of one
seed of one run; `commit` is the commit the run had run under when the row was collected ('+'-joined
when it was resumed at another), `command` the command of its latest stretch. A run is identified by (algo, variant, seed, config_digest): `variant` is the label the
report groups by ('maac', 'maac[tau=0.02]', 'sac'), `config_digest` a hash of the learner config that
actually ran, so two runs whose label reads the same but whose configs differ are never averaged together.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The row helpers live in the package, shared with `maac-robot sweep` (maac_robot/sweep/records.py).
from maac_robot.sweep.records import (LEARNER_SECTIONS, NOT_IN_DIGEST, NOT_TRAINING, cell,  # noqa: F401
                                      config_digest, evaluation_fields, read_rows, write_rows)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"
TASKS = {"inverted_pendulum": "InvertedPendulum-v5", "hopper": "Hopper-v5", "half_cheetah": "HalfCheetah-v5",
         "walker2d": "Walker2d-v5", "ant": "Ant-v5"}

EVAL_COLUMNS = (
    "task", "algo", "variant", "seed", "env_step",
    "eval_return_mean", "eval_return_std", "eval_returns",  # returns of the deterministic policy, one per reset seed
    "critic_bias", "alpha",  # MAAC only: min-twin Q − realised soft return; the temperature at that evaluation
    "train_wall_s", "train_cpu_s",  # cumulative seconds of training (evaluation and checkpoints excluded)
    "planned_steps", "note", "config_digest", "command", "commit", "cpu", "threads", "versions",
)
RUN_KEY = ("algo", "variant", "seed", "config_digest")


def eval_csv(task: str, results: Path = RESULTS) -> Path:
    return results / f"sample_efficiency_{task}.csv"


def machine() -> dict[str, Any]:
    """CPU model, core count and library versions: what a row's times and its bit-exact curve depend on."""
    import platform

    import gymnasium
    import mujoco
    import numpy as np
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "mujoco": mujoco.__version__,
                "gymnasium": gymnasium.__version__, "numpy": np.__version__}
    try:
        import stable_baselines3

        versions["stable_baselines3"] = stable_baselines3.__version__
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), "") if cpuinfo.exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions}


def git_commit() -> str:
    """HEAD's short hash, '+dirty' when tracked files differ from it (the row then did not run at HEAD alone)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "maac_robot", "benchmarks"],
                           cwd=ROOT).returncode != 0
    return head.strip() + ("+dirty" if dirty else "")


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this process was started, as a shell line a reader can rerun from the repository root."""
    return " ".join(shlex.quote(a) for a in ["python", *(sys.argv if argv is None else argv)])


def run_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in RUN_KEY)


def replace_run(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Put one run's evaluation rows into `path`, replacing that run's earlier rows and keeping every other
    run's. Rows the file already holds for an env step keep their command and commit (the stretch of a
    resumed run that an earlier command made), so each row names the commit that computed it."""
    keys = {run_key(r) for r in rows}
    if len(keys) != 1:
        raise ValueError(f"replace_run takes the rows of one run, got {sorted(keys)}")
    existing = read_rows(path)
    earlier = {int(r["env_step"]): r for r in existing if run_key(r) in keys}
    merged = [{**row, **{k: earlier[int(row["env_step"])][k] for k in ("command", "commit")}}
              if _same_evaluation(earlier.get(int(row["env_step"])), row) else row for row in rows]
    kept = [r for r in existing if run_key(r) not in keys]
    write_rows(path, sorted([*kept, *merged], key=_order), EVAL_COLUMNS)


def _same_evaluation(old: Mapping[str, str] | None, new: Mapping[str, Any]) -> bool:
    """Whether a stored row is this evaluation (a rerun from scratch computes new values: new provenance)."""
    return old is not None and old["eval_return_mean"] == cell(new["eval_return_mean"])


def _order(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["algo"], row["variant"], int(row["seed"]), str(row["config_digest"]), int(row["env_step"]))


def eval_rows_from_metrics(metrics: Sequence[Mapping[str, Any]], run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CSV rows from a run's evaluation records (`maac_robot.learn.trainer.read_metrics`) and its
    run-level fields (`run`: task, algo, variant, seed, planned_steps, config_digest, command, commit, ...)."""
    return [{**run, **evaluation_fields(m)} for m in metrics]


def versions_text(versions: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in versions.items())


def provenance() -> dict[str, Any]:
    """What a result row carries to be traced: command, commit, CPU, library versions, time (UTC)."""
    from datetime import datetime, timezone

    host = machine()
    return {"command": command_line(), "commit": git_commit(), "cpu": f"{host['cpu']}, {host['cores']} cores",
            "versions": versions_text(host["versions"]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
