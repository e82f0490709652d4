"""Learning-curve PNGs (matplotlib, headless Agg backend) for runs and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maac_robot.runtime.files import atomic_write  # noqa: E402


def plot_learning_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                         path: str | Path, title: str, targets: Sequence[tuple[float, int]] = (),
                         members: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]] | None = None,
                         partial: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> None:
    """Plot `label -> (env_steps, mean_return, std_return)` with a ±std band; written atomically.

    Each `(level, budget)` target is a dashed line at `level` that stops at `budget` env steps, so
    the plot shows both what was asked and by when.

    `members` optionally adds, per label, thin lines in the same colour for the individual seeds
    (so seeds that stopped early stay visible without bending the mean), and `partial` a dashed
    continuation of a label's mean over the steps only some of its seeds reached. Written atomically
    because the trainer refreshes the PNG at every evaluation and a viewer or a kill -9 must never
    see half a file.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    if len(curves) > 10:  # the default cycle has 10 colours: a benchmark with many variants would repeat them
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for label, (steps, mean, std) in curves.items():
        x, m, s = (np.asarray(v, dtype=float) for v in (steps, mean, std))
        (line,) = ax.plot(x, m, marker="o", markersize=3, label=label)
        ax.fill_between(x, m - s, m + s, alpha=0.2, color=line.get_color())
        if label in (partial or {}):
            ax.plot(*partial[label], linestyle="--", linewidth=1.2, color=line.get_color())  # type: ignore[index]
        for seed_steps, seed_values in (members or {}).get(label, ()):
            ax.plot(seed_steps, seed_values, linewidth=0.8, alpha=0.5, color=line.get_color())
    target_labels = [f"target {level:g} by {budget / 1000:g}k steps" for level, budget in targets]
    for (level, budget), label in zip(targets, target_labels):
        ax.hlines(level, 0, budget, color="grey", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return (deterministic policy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves or targets:
        # below the axes: a legend inside would hide curves or target lines, whichever way they run
        longest = max(map(len, [*curves, *target_labels]))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2 if longest < 36 else 1,
                  fontsize="small", frameon=False)
    # No tight_layout: it would shrink the axes to fit a long legend into the figure; savefig's tight
    # bounding box grows the figure around the legend instead.
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))  # grows the figure to hold the legend
    finally:
        plt.close(fig)
