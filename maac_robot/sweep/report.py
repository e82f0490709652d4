"""`maac-robot report SWEEP_DIR`: a sweep's mean curves with confidence bands, and the interquartile mean with its
95 % bootstrap confidence interval per variant at a few env-step budgets (`stats`), from SWEEP_DIR/evaluations.csv.

Writes SWEEP_DIR/curves.png and SWEEP_DIR/report.md, and prints the table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from maac_robot.runtime.errors import UserError
from maac_robot.sweep.records import CSV_NAME, SWEEP_FILE, read_rows
from maac_robot.sweep.stats import aggregate, bootstrap_ci, mean

REPORT_NAME, FIGURE_NAME = "report.md", "curves.png"
CONFIDENCE, REPS, SEED = 0.95, 2000, 0
MILESTONES = (0.25, 0.5, 0.75)  # shares of the final budget also tabulated (snapped to an evaluated step)

Curves = dict[str, dict[int, dict[int, float]]]  # variant -> seed -> env_step -> evaluation return


def read_curves(sweep_dir: Path) -> Curves:
    """Every variant's evaluation returns by seed and env step, variants in the CSV's order."""
    path = sweep_dir / CSV_NAME
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {CSV_NAME}); run `maac-robot sweep --out "
                        f"{sweep_dir} ...` first")
    curves: Curves = {}
    for row in read_rows(path):
        curves.setdefault(row["variant"], {}).setdefault(int(row["seed"]), {})[int(row["env_step"])] = float(
            row["eval_return_mean"])
    if not curves:
        raise UserError(f"{path} holds no evaluations yet")
    return curves


def at(curves: Mapping[int, Mapping[int, float]], step: int) -> list[float]:
    """The return of every seed evaluated at `step`."""
    return [curve[step] for curve in curves.values() if step in curve]


def budgets(curves: Curves) -> list[int]:
    """The env steps the table reports: the final budget (the last step every variant reached with at least
    one seed) and the evaluated steps nearest below MILESTONES of it."""
    final = min(max(step for curve in seeds.values() for step in curve) for seeds in curves.values())
    steps = sorted({step for seeds in curves.values() for curve in seeds.values() for step in curve if step <= final})
    picked = {final}
    for share in MILESTONES:
        below = [s for s in steps if s <= share * final]
        if below:
            picked.add(below[-1])
    return sorted(picked)


def table(curves: Curves, steps: Sequence[int]) -> list[str]:
    """Markdown: per variant, IQM [95 % CI] (n seeds) at each budget, and the mean at the final one."""
    final = steps[-1]
    head = ["variant", *(f"{s} steps{' (final)' if s == final else ''}" for s in steps), f"mean at {final}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, seeds in curves.items():
        cells = []
        for step in steps:
            values = at(seeds, step)
            if not values:
                cells.append("–")
                continue
            a = aggregate(values, CONFIDENCE, REPS, SEED)
            cells.append(f"{a['iqm']:.1f} [{a['ci_low']:.1f}, {a['ci_high']:.1f}] (n={a['n']})")
        values = at(seeds, final)
        cells.append(f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "–")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def mean_curve(seeds: Mapping[int, Mapping[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, the mean over the seeds evaluated there, and the bootstrap CI of that mean."""
    steps = sorted({s for curve in seeds.values() for s in curve})
    means, lows, highs = [], [], []
    for step in steps:
        values = at(seeds, step)
        lo, hi = bootstrap_ci(values, mean, CONFIDENCE, REPS, SEED)
        means.append(float(np.mean(values)))
        lows.append(lo)
        highs.append(hi)
    return steps, means, lows, highs


def plot(curves: Curves, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, seeds in curves.items():
        steps, means, lows, highs = mean_curve(seeds)
        (line,) = ax.plot(steps, means, label=f"{variant} (n={len(seeds)})")
        ax.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(sweep_dir: str | Path) -> list[str]:
    """Write SWEEP_DIR/curves.png and SWEEP_DIR/report.md; returns the report's lines."""
    sweep_dir = Path(sweep_dir)
    curves = read_curves(sweep_dir)
    meta_path = sweep_dir / SWEEP_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    steps = budgets(curves)
    plot(curves, sweep_dir / FIGURE_NAME, f"{sweep_dir.name}: mean return over seeds, {CONFIDENCE:.0%} bootstrap CI")
    lines = [f"# Sweep {sweep_dir.name}", ""]
    if meta:
        lines += [f"Command: `{meta['command']}` (commit {meta['commit']})", ""]
    lines += [f"Interquartile mean (IQM: the mean of the middle half of the seeds; with fewer than 4 it is the "
              f"mean) of the evaluation return, with its {CONFIDENCE:.0%} percentile bootstrap confidence interval "
              f"({REPS} resamples of the seeds, seed {SEED}), at each env-step budget; n: seeds evaluated there. "
              f"Every evaluation is in {CSV_NAME}.", "", *table(curves, steps), "",
              f"![mean curves]({FIGURE_NAME})", ""]
    (sweep_dir / REPORT_NAME).write_text("\n".join(lines))
    return lines


def report_from_cli(sweep_dir: Path) -> int:
    """`maac-robot report`: prints the table and where the files went."""
    lines = report(sweep_dir)
    print("\n".join(lines[:-2]))
    print(f"wrote {sweep_dir / REPORT_NAME} and {sweep_dir / FIGURE_NAME}")
    return 0
