"""What a sweep (or a benchmark) records per evaluation: one CSV row with its provenance.

Every row carries the command line, the config digest and the source commit that produced it, so a number
can always be traced to a command. Torch- and Ray-free: `benchmarks/results_csv.py` reuses it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from maac_robot.runtime.files import atomic_write

NOT_TRAINING = ("eval", "checkpoint")  # phases that are bookkeeping, not the cost of learning
# Fields that say how long or on how many threads a run ran, not what it computes: not part of the digest.
NOT_IN_DIGEST = ("train.seed", "train.total_steps", "train.num_threads", "train.wandb")  # wandb: logging only
LEARNER_SECTIONS = ("env", "model", "agent", "rollout", "train")  # sim/controller do not change training

CSV_NAME = "evaluations.csv"  # in a sweep directory: SWEEP_COLUMNS, one row per evaluation of every trial
SWEEP_FILE = "sweep.json"  # in a sweep directory: its latest command and plan (variant and seed order)

SWEEP_COLUMNS = (
    "variant", "overrides", "seed", "env_step",
    "eval_return_mean", "eval_return_std", "eval_returns",  # the deterministic policy, one return per reset seed
    "critic_bias", "alpha", "train_wall_s", "train_cpu_s",
    "planned_steps", "run", "config", "config_digest", "command", "commit",
)
"""`evaluations.csv` of a sweep: one row per evaluation of every trial. `variant` is the grid point
('agent.horizon=0,agent.steve=true'; 'base' without --grid), `overrides` every --set and grid item the trial
ran with, `run` its directory (relative to the sweep's), `command`/`commit` those of the sweep stretch that
computed the row (a resumed trial's earlier rows keep theirs)."""


def config_digest(config: Mapping[str, Mapping[str, Any]]) -> str:
    """12 hex digits of sha256 over the learner sections of a resolved config (a `Config.model_dump`),
    seed, budget and thread count left out: equal digests mean the same algorithm and settings ran."""
    kept = {section: {key: value for key, value in config[section].items()
                      if f"{section}.{key}" not in NOT_IN_DIGEST}
            for section in LEARNER_SECTIONS if section in config}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def evaluation_fields(m: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of one evaluation record of a run's metrics.jsonl (`learn.trainer.read_metrics`)."""
    phases, cpu = m.get("phase_time_s", {}), m.get("phase_cpu_s", {})
    return {"env_step": m["env_step"], "eval_return_mean": m["eval_return_mean"],
            "eval_return_std": m["eval_return_std"],
            "eval_returns": " ".join(f"{x:.2f}" for x in m.get("eval_returns", [])),
            "critic_bias": m.get("critic_bias"), "alpha": (m.get("losses") or {}).get("alpha"),
            "train_wall_s": training_seconds(phases), "train_cpu_s": training_seconds(cpu)}


def training_seconds(phases: Mapping[str, float]) -> float | None:
    """Seconds spent learning (evaluation and checkpoints excluded), None when the record has no timings."""
    return round(sum(v for k, v in phases.items() if k not in NOT_TRAINING), 3) if phases else None


def read_rows(path: Path) -> list[dict[str, str]]:
    """All rows of a result CSV (none if it does not exist yet)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write `rows` (missing columns empty) atomically: a killed writer leaves the old file, never half a table."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: cell(row.get(c)) for c in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.getvalue().encode())


def cell(value: Any) -> str:
    """A CSV cell: empty for None, 6 significant digits for floats (one decimal from 1e5 on)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.1f}"
    return str(value)


def source_commit() -> str:
    """The short commit of the source tree this package runs from, '+dirty' when its files differ from it;
    for an installed (non-checkout) package, 'maac-robot VERSION'."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(package.parent), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode == 0 and (package.parent / ".git").exists():
            dirty = git("diff", "--quiet", "HEAD", "--", package.name).returncode != 0
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"maac-robot {version('maac-robot')}"
    except PackageNotFoundError:
        return "unknown"
