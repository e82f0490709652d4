"""Merge one analysis's rows into its JSON file under benchmarks/results/ (diagnose, critic probe, entropy pressure).

These analyses produce nested per-episode or per-update results, kept as one small JSON file each
({"runs": [...]}, one entry per run and checkpoint) with the command and commit of every entry;
`report.py` renders them into RESULTS.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from results_csv import ROOT, command_line, git_commit


def provenance() -> dict[str, str]:
    """The command line, commit and time that produced a result, stored beside it so RESULTS.md can cite it."""
    return {"command": command_line(), "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run_name(run_dir: Path) -> str:
    """A run directory as it is named in the results: relative to the repository when inside it."""
    resolved = run_dir.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(run_dir)


def merge_runs(out: Path, rows: Sequence[dict[str, Any]], keys: tuple[str, ...] = ("run",)) -> None:
    """Add or replace `rows` (keyed by their `keys`) in the JSON file `out`, keeping the other entries."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(r[k] for k in keys)

    merged = {key(r): r for r in (json.loads(out.read_text())["runs"] if out.is_file() else [])}
    merged.update({key(r): r for r in rows})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": sorted(merged.values(), key=key)}, indent=1))
