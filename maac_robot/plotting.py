"""Learning-curve PNGs (matplotlib, headless Agg backend) for runs and benchmarks."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_learning_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                         path: str | Path, title: str, target: float | None = None,
                         members: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]] | None = None
                         ) -> None:
    """Plot `label -> (env_steps, mean_return, std_return)` with a ±std band; written atomically.

    `members` optionally adds, per label, thin lines in the same colour for the individual seeds
    (so seeds that stopped early stay visible without bending the mean). Atomic (tmp + rename)
    because the trainer refreshes the PNG at every evaluation and a viewer or a kill -9 must never
    see half a file.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, (steps, mean, std) in curves.items():
        x, m, s = (np.asarray(v, dtype=float) for v in (steps, mean, std))
        (line,) = ax.plot(x, m, marker="o", markersize=3, label=label)
        ax.fill_between(x, m - s, m + s, alpha=0.2, color=line.get_color())
        for seed_steps, seed_values in (members or {}).get(label, ()):
            ax.plot(seed_steps, seed_values, linewidth=0.8, alpha=0.5, color=line.get_color())
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return (deterministic policy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves or target is not None:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
