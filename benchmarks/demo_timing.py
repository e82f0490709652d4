"""`maac-robot demo` end to end, per seed: wall time of each stage and the returns of its CEM-MPC episodes.

    python benchmarks/demo_timing.py --seeds 0 1 2 3 4 5 6 7 8 9

Each seed runs the user's command, `maac-robot demo --out DIR --bind ... --set train.seed=S`, as a subprocess in a
scratch directory (install excluded; the sim and the controller are the demo's own, real time, CURVE keys), and its
stdout is read line by line with a clock: training ends at the demo's "2/3" line, the export at "3/3", the episodes
at the process's exit. Rows (one per seed, replacing that seed's earlier row) go to
benchmarks/results/demo_timing.csv with the env steps trained, the policy's last evaluation, each CEM-MPC
episode's return, the load average and the command; `report.py` renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopback import free_port  # noqa: E402
from results_csv import RESULTS, provenance, read_rows, write_rows  # noqa: E402

COLUMNS = ("seed", "total_s", "train_s", "export_s", "episodes_s", "env_steps", "policy_eval", "cem_returns",
           "stop_return", "load_1min", "command", "commit", "date", "cpu")
_CEM_RETURN = re.compile(r"\[cem\] seed \d+: return (?P<ret>[-\d.]+)")


def run_demo(seed: int, workdir: Path, extra: list[str], timeout_s: float) -> dict[str, Any]:
    """One `maac-robot demo` in `workdir`; stage times from its progress lines, returns from its summary."""
    argv = ["maac-robot", "demo", "--out", "runs/demo", "--bind", f"tcp://127.0.0.1:{free_port()}",
            "--set", f"train.seed={seed}", *extra]
    marks: dict[str, float] = {}
    returns: list[float] = []
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each progress line as it is printed, not when a buffer fills
    with subprocess.Popen(argv, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            if line.startswith("[demo] 2/3"):
                marks["train"] = now
            elif line.startswith("[demo] 3/3"):
                marks["export"] = now
            if match := _CEM_RETURN.search(line):
                returns.append(float(match["ret"]))
            if now > timeout_s:
                proc.kill()
                raise TimeoutError(f"seed {seed}: demo still running after {timeout_s:g} s")
        rc = proc.wait()
    total = time.perf_counter() - start
    if rc != 0 or "train" not in marks or "export" not in marks:
        raise RuntimeError(f"seed {seed}: demo exited {rc} (stages seen: {sorted(marks)})")
    last = json.loads((workdir / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"seed": seed, "total_s": round(total, 1), "train_s": round(marks["train"], 1),
            "export_s": round(marks["export"] - marks["train"], 1), "episodes_s": round(total - marks["export"], 1),
            "env_steps": last["env_step"], "policy_eval": last["eval_return_mean"],
            "cem_returns": " ".join(f"{r:g}" for r in returns), "load_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--stop-return", type=float, default=1000.0, help="passed to demo --stop-return")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one seed's demo may take")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    stamp = provenance() | {"stop_return": args.stop_return}
    path = args.results / "demo_timing.csv"
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="demo-timing-") as tmp:
            row = run_demo(seed, Path(tmp), ["--stop-return", f"{args.stop_return:g}"], args.timeout)
        row |= stamp | {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        print(row, flush=True)
        kept = [r for r in read_rows(path) if str(r["seed"]) != str(seed)]
        write_rows(path, [*kept, row], COLUMNS)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
