"""Put run directories' evaluations into the sample-efficiency CSVs (benchmarks/results/sample_efficiency_<task>.csv).

    python benchmarks/collect_runs.py benchmarks/runs/hopper/maac-s0 [RUN_DIR ...] [--note "stopped at 12k: ..."]

A run directory holds `meta.json` (how the run was started: written by `sample_efficiency.py`),
`config.yaml` (MAAC's resolved config; SAC runs have none) and `metrics.jsonl`. Each run's rows replace its
earlier rows in the task's CSV (same algo, variant, seed and config digest), so collecting a run again after
it was resumed is safe. `sample_efficiency.py` calls this itself after every seed; run it by hand for a run
continued elsewhere, or to add a note (why a run was stopped) to its rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_csv import RESULTS, config_digest, eval_csv, eval_rows_from_metrics, replace_run, versions_text  # noqa: E402


def meta_note(meta: dict[str, Any]) -> str:
    """What a run's meta.json says beyond its start: resumes, a stop and why, renames and branches."""
    parts = [f"started at {meta['commit']} by `{_portable(meta['command'])}`"] if meta.get("resumes") else []
    if "branched_from" in meta:
        parts.append("branched from {run} at env step {env_step}".format(**meta["branched_from"]))
    if "stopped" in meta:
        parts.append(f"stopped at {meta['stopped']['env_step']}: {meta['stopped']['why']}")
    parts += [f"ran as {r['from']}" for r in meta.get("relabelled", [])[:1]]
    if "renamed" in meta:
        parts.append(meta["renamed"])
    return "; ".join(parts)


def run_fields(run_dir: Path, note: str | None = None) -> dict[str, Any]:
    """The run-level columns of a run directory's rows, from its meta.json and config.yaml."""
    from maac_robot.learn.config import load_config

    meta = json.loads((run_dir / "meta.json").read_text())
    config = run_dir / "config.yaml"
    digest = meta.get("config_digest") or (
        config_digest(load_config(config).model_dump(mode="json")) if config.is_file() else None)
    label = meta.get("label") or meta["algo"]
    stretches = [meta, *meta.get("resumes", [])]  # a resumed run's rows ran under every commit so far
    return {"task": meta["task"], "algo": label.partition("[")[0].split("-")[0], "variant": label,
            "seed": meta["seed"], "planned_steps": meta["planned_steps"],
            "note": "; ".join(p for p in (meta_note(meta), note) if p),
            "config_digest": digest, "command": _portable(stretches[-1]["command"]),
            "commit": "+".join(dict.fromkeys(str(s.get("commit", "")) for s in stretches)), "cpu": f"{meta.get('cpu', '')}, {meta.get('cores', '')} cores",
            "threads": meta.get("threads"), "versions": versions_text(meta.get("versions", {}))}


def _portable(command: str) -> str:
    """'/some/venv/bin/python benchmarks/x.py ...' -> 'python benchmarks/x.py ...' (rerunnable on any clone)."""
    first, _, rest = command.partition(" ")
    return f"python {rest}" if Path(first).name.startswith("python") else command


def collect(run_dir: Path, note: str | None = None, results: Path = RESULTS) -> int:
    """Replace the run's rows in its task's CSV with its metrics; returns how many rows it has."""
    from maac_robot.learn.trainer import read_metrics

    fields = run_fields(run_dir, note)
    rows = eval_rows_from_metrics(read_metrics(run_dir / "metrics.jsonl"), fields)
    if rows:
        replace_run(eval_csv(fields["task"], results), rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (each with meta.json and metrics.jsonl)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the task CSVs are")
    parser.add_argument("--note", help="text added to the note column of these runs' rows")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        print(f"{run_dir}: {collect(run_dir, args.note, args.results)} evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
