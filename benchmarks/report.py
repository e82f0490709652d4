"""Rebuild the generated tables of benchmarks/RESULTS.md and the learning-curve PNGs from benchmarks/results/.

    python benchmarks/report.py            # rewrite every marked table and every figure
    python benchmarks/report.py --check    # exit 1 if RESULTS.md is not what the CSVs give (nothing written)

Each generated table sits between `<!-- table:NAME:begin -->` and `<!-- table:NAME:end -->` in RESULTS.md;
only the text between a pair is replaced, so the prose around it is kept and a second run changes nothing.
A marker pair whose table has no data is left as it is and reported. Inputs, all under benchmarks/results/:
`sample_efficiency_<task>.csv` (every evaluation of every seed, `sample_efficiency.py`),
`sample_efficiency_archived.csv` (per-step means of sessions 1-7, whose run records were lost),
`training_cost_<task>.csv` (`profile_update.py`), `train_speed.csv` (`train_speed.py`),
`adaptation_<task>.csv` (`adaptation.py`, issue 22), `finetune_screen_<task>.csv` (`finetune_screen.py`),
`ablations_<task>.csv` (`ablations.py report`, paper §5.3, issue 23), and `diagnose.json`, `critic_probe.json`,
`entropy_pressure.json` (`diagnose_runs.py`, `critic_probe.py`, `entropy_pressure.py`), `gradient_error.csv`
(`gradient_error.py`, paper §5.2).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_csv import RESULTS, ROOT, TASKS, eval_csv, read_rows  # noqa: E402

from maac_robot.sweep.stats import iqm  # noqa: E402  the one IQM: seeds' quartiles cut, as rliable

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
FIGURES = ROOT / "benchmarks"
# task -> [(return, within env steps)]: the targets of issue 2
TARGETS: dict[str, list[tuple[float, int]]] = {
    "inverted_pendulum": [(1000.0, 3000)], "hopper": [(2500.0, 20000)],
    "half_cheetah": [(5000.0, 20000), (10000.0, 50000)]}
MILESTONES = {"inverted_pendulum": [1000, 2000, 3000, 3500, 4000, 5000, 10000, 20000, 30000]}
DEFAULT_MILESTONES = [5000, 10000, 15000, 20000, 30000, 50000]
_MARKER = re.compile(r"<!-- table:(?P<name>[\w.-]+):begin -->\n.*?<!-- table:(?P=name):end -->", re.S)


# ---- statistics over seeds -------------------------------------------------------------------------------


@dataclass
class Group:
    """The evaluations of one variant on one task: seed -> [(env_step, return)] in step order."""

    label: str
    algo: str
    seeds: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    rows: list[Mapping[str, str]] = field(default_factory=list)

    def at(self, step: int) -> list[float]:
        """The return of every seed that was evaluated at `step`."""
        return [r for curve in self.seeds.values() for s, r in curve if s == step]

    def steps(self) -> list[int]:
        return sorted({s for curve in self.seeds.values() for s, _ in curve})

    def mean_curve(self) -> tuple[list[int], list[float], list[float], list[int]]:
        """Steps with the mean and std over the seeds evaluated there, and how many were."""
        steps = self.steps()
        values = [self.at(s) for s in steps]
        return steps, [float(np.mean(v)) for v in values], [float(np.std(v)) for v in values], [len(v) for v in values]


def groups(rows: Iterable[Mapping[str, str]]) -> dict[str, Group]:
    """Rows grouped by run identity (variant and config digest). A label that ran under more than one
    config is shown once per config, as 'LABEL @DIGEST', rather than averaged across configs."""
    by_key: dict[tuple[str, str], Group] = {}
    for row in rows:
        key = (row["variant"], row.get("config_digest", ""))
        group = by_key.setdefault(key, Group(row["variant"], row["algo"]))
        group.seeds.setdefault(int(row["seed"]), []).append((int(row["env_step"]), float(row["eval_return_mean"])))
        group.rows.append(row)
    labels = defaultdict(list)
    for variant, digest in by_key:
        labels[variant].append(digest)
    out = {}
    for (variant, digest), group in sorted(by_key.items()):
        if len(labels[variant]) > 1:
            group.label = f"{variant} @{digest or 'no config'}"
        for curve in group.seeds.values():
            curve.sort()
        out[group.label] = group
    return out


def first_reaching(steps: Sequence[int], values: Sequence[float], level: float) -> int | None:
    return next((s for s, v in zip(steps, values) if v >= level), None)


def display(label: str) -> str:
    """'maac[tau=0.02]' -> 'MAAC[tau=0.02]': the algorithm stands out from its overrides."""
    name, bracket, rest = label.partition("[")
    return name.upper() + bracket + rest


def legend_name(label: str) -> str:
    """'maac[num_samples=1,updates_per_step=2,precision=bfloat16]' -> 'MAAC [ns=1, ups=2, bf16]': multi-word
    keys by their initials, the numerics-only precision switch by its dtype (legends must stay short)."""
    base, _, rest = label.partition("[")
    overrides = dict(item.split("=", 1) for item in rest.rstrip("]").split(",")) if rest else {}
    if not overrides:
        return base.upper()
    parts = []
    for key, value in overrides.items():
        if key == "precision":
            parts.append({"bfloat16": "bf16"}.get(value, value))
            continue
        words = key.split("_")
        parts.append(f"{''.join(w[0] for w in words) if len(words) > 1 else key}={value}")
    return f"{base.upper()} [{', '.join(parts)}]"


def _cell(values: Sequence[float]) -> str:
    if not values:
        return ""
    return f"{np.mean(values):.0f} ± {np.std(values):.0f} (n={len(values)})"


# ---- sample-efficiency tables ------------------------------------------------------------------------------


def cpu_per_1000(group: Group) -> str:
    """Training CPU seconds per 1000 env steps (evaluation excluded), mean over seeds at each seed's last row."""
    rates = [float(r["train_cpu_s"]) / int(r["env_step"]) * 1000 for r in _last_rows(group) if r.get("train_cpu_s")]
    return f"{np.mean(rates):.0f}" if rates else "–"


def _last_rows(group: Group) -> list[Mapping[str, str]]:
    last: dict[int, Mapping[str, str]] = {}
    for row in group.rows:
        seed = int(row["seed"])
        if seed not in last or int(row["env_step"]) > int(last[seed]["env_step"]):
            last[seed] = row
    return list(last.values())


def target_cell(group: Group, level: float, budget: int) -> str:
    """Where the mean over seeds first reached `level` (and whether within `budget`), and how many seeds
    reached it by the budget. A run that stopped before the budget and missed counts as 'not run to it'."""
    steps, means, _, counts = group.mean_curve()
    hit = first_reaching(steps, means, level)
    seed_hits = [first_reaching([s for s, _ in curve], [r for _, r in curve], level) for curve in group.seeds.values()]
    seeds_by_budget = sum(1 for h in seed_hits if h is not None and h <= budget)
    ran_to = sum(1 for curve in group.seeds.values() if curve[-1][0] >= budget)
    if hit is None:
        mean = f"not by {steps[-1]}" if steps[-1] >= budget else f"not run to {budget}"
    else:
        fewer = f" (n={counts[steps.index(hit)]})" if counts[steps.index(hit)] < len(group.seeds) else ""
        mean = f"{hit}{fewer}" + (" ✓" if hit <= budget else "")
    return f"{mean}; {seeds_by_budget} of {len(group.seeds)} seeds by {budget} ({ran_to} ran to it)"


def sac_ratio(group: Group, sac: Group | None) -> str:
    """Env steps this variant's mean needs to reach SAC's final mean return, over the steps SAC's mean needed."""
    if sac is None or group is sac:
        return "–"
    sac_steps, sac_means, _, _ = sac.mean_curve()
    final = sac_means[-1]
    sac_hit = first_reaching(sac_steps, sac_means, final)
    steps, means, _, _ = group.mean_curve()
    hit = first_reaching(steps, means, final)
    if hit is None:
        return f"not reached ({final:.0f} at {sac_hit})"
    return f"{hit / sac_hit:.2f} ({hit} / {sac_hit})"


def summary_table(task: str, found: Mapping[str, Group]) -> list[str]:
    """One row per variant: seeds, final return (mean, IQM), each target, env-step ratio to SAC, CPU cost."""
    targets = TARGETS.get(task, [])
    sac = next((g for g in found.values() if g.label == "sac"), None)
    head = ["variant", "seeds", "last evaluation: mean ± std (IQM), n", "best mean (step)",
            *[f"mean ≥ {level:g} by {budget} (first step)" for level, budget in targets],
            "steps to SAC's final return: ratio (MAAC / SAC)", "train CPU-s / 1000 steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, group in found.items():
        steps, means, _, counts = group.mean_curve()
        full = [i for i, n in enumerate(counts) if n == len(group.seeds)]  # the last step every seed reached
        last = steps[full[-1]] if full else steps[-1]
        values = group.at(last)
        best = int(np.argmax(means))
        seeds = ", ".join(str(s) for s in sorted(group.seeds))
        cells = [display(label), seeds,
                 f"{np.mean(values):.0f} ± {np.std(values):.0f} ({iqm(values):.0f}) at {last}, n={len(values)}",
                 f"{means[best]:.0f} ({steps[best]}, n={counts[best]})",
                 *[target_cell(group, level, budget) for level, budget in targets],
                 sac_ratio(group, sac), cpu_per_1000(group)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def milestone_table(task: str, found: Mapping[str, Group]) -> list[str]:
    """Mean ± std over seeds (and how many) at fixed env steps; every evaluation is in the CSV."""
    every = sorted({s for g in found.values() for s in g.steps()})
    steps = [s for s in MILESTONES.get(task, DEFAULT_MILESTONES) if s in every]
    if not steps:
        return []
    lines = ["| variant | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for label, group in found.items():
        lines.append(f"| {display(label)} | " + " | ".join(_cell(group.at(s)) for s in steps) + " |")
    return lines


def provenance_lines(found: Mapping[str, Group]) -> list[str]:
    """Machines and library versions the rows ran on: CPU seconds compare only within one CPU model."""
    machines = sorted({(r.get("cpu", ""), r.get("threads", ""), r.get("versions", ""))
                       for g in found.values() for r in g.rows})
    return [f"- {cpu}, torch threads {threads}; {versions}" for cpu, threads, versions in machines]


def plot_task(task: str, found: Mapping[str, Group], path: Path, title: str) -> None:
    """Mean ± std over the seeds that reached each step, thin lines per seed, dashed where fewer seeds go on."""
    from maac_robot.learn.plotting import plot_learning_curves

    curves, members, partial = {}, {}, {}
    for label, group in found.items():
        steps, means, stds, counts = group.mean_curve()
        n = len(group.seeds)
        name = legend_name(label) + (", 1 seed" if n == 1 else f", mean ± std of {n} seeds")
        common = [i for i, c in enumerate(counts) if c == n]
        if len(common) < len(steps):
            name += " (dashed: fewer seeds)"
            beyond = range(common[-1] if common else 0, len(steps))
            partial[name] = ([steps[i] for i in beyond], [means[i] for i in beyond])
        curves[name] = tuple([seq[i] for i in common] for seq in (steps, means, stds))
        members[name] = [([s for s, _ in c], [r for _, r in c]) for c in group.seeds.values()]
    plot_learning_curves(curves, path, title, targets=TARGETS.get(task, []), members=members, partial=partial)


# ---- archived sessions 1-7: per-step means only ------------------------------------------------------------


def archived_groups(rows: Iterable[Mapping[str, str]], task: str) -> dict[str, list[Mapping[str, str]]]:
    out: dict[str, list[Mapping[str, str]]] = {}
    for row in rows:
        if row["task"] == task:
            out.setdefault(row["variant"], []).append(row)
    return out


def archived_table(task: str, found: Mapping[str, list[Mapping[str, str]]]) -> list[str]:
    every = sorted({int(r["env_step"]) for rows in found.values() for r in rows})
    steps = [s for s in MILESTONES.get(task, DEFAULT_MILESTONES) if s in every]
    lines = ["| variant | seeds | " + " | ".join(str(s) for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for label, rows in found.items():
        at = {int(r["env_step"]): r for r in rows}
        cells = [f"{float(at[s]['return_mean']):.0f} ± {float(at[s]['return_std']):.0f} (n={at[s]['n_seeds']})"
                 if s in at else "" for s in steps]
        lines.append(f"| {display(label)} | {rows[0]['seeds']} | " + " | ".join(cells) + " |")
    return lines


def plot_archived(task: str, found: Mapping[str, list[Mapping[str, str]]], path: Path) -> None:
    from maac_robot.learn.plotting import plot_learning_curves

    curves = {}
    for label, rows in found.items():
        ordered = sorted(rows, key=lambda r: int(r["env_step"]))
        curves[f"{legend_name(label)} (max n={max(int(r['n_seeds']) for r in rows)})"] = (
            [int(r["env_step"]) for r in ordered], [float(r["return_mean"]) for r in ordered],
            [float(r["return_std"]) for r in ordered])
    plot_learning_curves(curves, path, f"{TASKS[task]}: sessions 1-7 (records lost; per-step means)",
                         targets=TARGETS.get(task, []))


# ---- training cost ----------------------------------------------------------------------------------------


def _cost(rows: Sequence[Mapping[str, str]], kind: str) -> dict[tuple[str, str], Mapping[str, str]]:
    return {(r["item"], r["unit"]): r for r in rows if r["kind"] == kind}


def profile_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Where 1000 env steps go, extrapolated from measured parts; then the shares inside one G2 update."""
    parts = _cost(rows, "per_1000_steps")
    if not parts:
        return []
    facts = {k: float(r["value"]) for (k, unit), r in _cost(rows, "profile").items()
             for k in [f"{k}:{unit}"]}
    first = next(iter(parts.values()))
    items = list(dict.fromkeys(item for item, _ in parts))
    total_cpu = sum(float(parts[(i, "cpu_s")]["value"]) for i in items)
    total_wall = sum(float(parts[(i, "wall_s")]["value"]) for i in items)
    lines = [f"`{first['command']}` at {first['commit']} on {first['cpu']} (torch threads {first['threads']}), "
             f"{first['date']}. After the random phase (D_env {facts.get('d_env:rows', math.nan):.0f}): cold model fit "
             f"{facts.get('cold_fit:cpu_s', math.nan)} CPU-s ({facts.get('cold_fit:epochs', math.nan):.0f} epochs), "
             f"warm fit {facts.get('warm_fit:cpu_s', math.nan)} CPU-s ({facts.get('warm_fit:epochs', math.nan):.0f} "
             f"epochs), one rollout round {facts.get('rollout_round:wall_s', math.nan)} s, "
             f"{facts.get('updates_measured:updates', math.nan):.0f} G2 updates at "
             f"{facts.get('update:cpu_ms', math.nan)} CPU-ms each.", "",
             "| part | CPU s / 1000 env steps | share | wall s / 1000 env steps |", "|---|---|---|---|"]
    for item in items:
        cpu = float(parts[(item, "cpu_s")]["value"])
        lines.append(f"| {item} | {cpu:.1f} | {100 * cpu / total_cpu:.0f} % | {float(parts[(item, 'wall_s')]['value']):.1f} |")
    lines.append(f"| **total** | **{total_cpu:.1f}** | target ≤ 150 s | {total_wall:.1f} |")
    shares = _cost(rows, "update_share")
    if shares:
        lines += ["", "Inside one G2 update: " + ", ".join(
            f"{item} {100 * float(r['value']):.0f} %" for (item, _), r in shares.items())
            + f" ({next(iter(shares.values()))['unit']})."]
    return lines


def update_cost_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """FLOPs and CPU time of one G2 update per setting; operator shares; the matmul ceiling."""
    cost = _cost(rows, "update_cost")
    if not cost:
        return []
    first = next(iter(cost.values()))
    items = list(dict.fromkeys(item for item, _ in cost))
    lines = [f"`{first['command']}` at {first['commit']} on {first['cpu']} (torch threads {first['threads']}), "
             f"{first['date']}:", "",
             "| settings | GFLOP / update | CPU ms / update | CPU s of updates / 1000 env steps |", "|---|---|---|---|"]
    for item in items:
        lines.append(f"| {item} | {cost[(item, 'gflop')]['value']} | {cost[(item, 'cpu_ms')]['value']} | "
                     f"{cost[(item, 'cpu_s_per_1000_env_steps')]['value']} |")
    ops = _cost(rows, "op_share")
    if ops:
        lines += ["", "Self-CPU share by operator in the first setting's update (torch.profiler): "
                  + ", ".join(f"{item} {100 * float(r['value']):.0f} %" for (item, _), r in ops.items()) + "."]
    matmul = _cost(rows, "matmul")
    if matmul:
        lines += ["", "One 6400×256 by 256×256 matmul at the same thread count (the ceiling for this work): "
                  + ", ".join(f"{item} {r['value']} GFLOP/s" for (item, _), r in matmul.items()) + "."]
    return lines


def train_speed_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Per setting: one G2 update against the matmul floor, and training speed against SB3 SAC (train_speed.py)."""
    by_setting: dict[str, dict[str, Mapping[str, str]]] = defaultdict(dict)
    for r in rows:
        by_setting[r["setting"]][r["item"]] = r
    if not by_setting:
        return []
    lines = ["| setting | GFLOP / update | CPU ms / update | matmul GFLOP/s | floor ratio (target ≤ 1.5) | "
             "env steps / wall s (window) | wall share: updates / fits / rollouts / evals | SAC wall s / 1000 steps | "
             "MAAC ÷ SAC | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for setting, r in by_setting.items():
        def v(item: str, digits: int = 1) -> str:
            return f"{float(r[item]['value']):.{digits}f}" if item in r else "–"
        window = r["env_steps_per_s"]["window"] if "env_steps_per_s" in r else "–"
        lines.append(f"| {setting} | {v('gflop', 2)} | {v('cpu_ms')} | {v('matmul_gflop_per_s')} | {v('floor_ratio')} | "
                     f"{v('env_steps_per_s')} ({window}) | "
                     f"{' / '.join(v(f'{p}_share', 2) for p in ('update', 'model_fit', 'rollout', 'eval'))} | "
                     f"{v('sac_s_per_1000')} | "
                     f"{v('maac_over_sac')} | {v('load_1min')} |")
    lines += ["", "Measured by:"] + sorted({f"- `{r['command']}` at {r['commit']} on {r['cpu']}, {r['date']}"
                                            for items in by_setting.values() for r in items.values()})
    return lines


def demo_timing_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """`maac-robot demo` per seed: stage times and the CEM-MPC episodes' returns (demo_timing.py)."""
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: int(r["seed"]))
    lines = ["| seed | total s (target ≤ 240) | training s | env steps | policy eval | export s | episodes s | "
             "CEM-MPC returns | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['total_s']} | {r['train_s']} | {r['env_steps']} | {r['policy_eval']} | "
                     f"{r['export_s']} | {r['episodes_s']} | {r['cem_returns']} | {r['load_1min']} |")
    held = [r for r in rows if r["cem_returns"] and all(float(x) >= 1000 for x in r["cem_returns"].split())]
    in_time = [r for r in held if float(r["total_s"]) <= 240]
    lines += ["", f"Every CEM-MPC episode at 1000 on {len(held)} of {len(rows)} seeds; within 240 s as well on "
              f"{len(in_time)} (target: 9 of 10 seeds).", "", "Measured by:"]
    lines += sorted({f"- `{r['command']}` at {r['commit']} on {r['cpu']}" for r in rows})
    return lines


# ---- checkpoint analyses (JSON: nested per-episode results) ------------------------------------------------


def diagnosis_table(d: Mapping[str, Any]) -> list[str]:
    """Per run (latest checkpoint): deterministic episodes, the critic's bias and the ensemble's foresight."""
    lines = ["| run | env step | return | length | last state (1st episode) | foresight k=1/5/20 "
             "| model return: predicted / real | stochastic return | Q(s₀) | G(s₀) | bias |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        eps = r["episodes"]
        biases = [e["q_bias_mean"] for e in eps if e["q_bias_mean"] is not None]
        ends = [e["elites_predicting_end"] for e in eps if e["elites_predicting_end"]]
        foresight = "/".join(f"{np.mean([f[k] for f in ends if k in f]):.2f}" if any(k in f for f in ends) else "–"
                             for k in ("1", "5", "20"))
        last = ", ".join(f"{k} {v}" for k, v in eps[0]["final_state"].items())
        imagined = [e["model_return"] for e in eps if e.get("model_return")]  # absent from rows diagnosed before it
        model = (f"{np.mean([m['predicted'] for m in imagined]):.2f} / {np.mean([m['real'] for m in imagined]):.2f} "
                 f"(H={eps[0]['model_return_steps']})" if imagined else "–")
        soft = [e["soft_return_start"] for e in eps if e["soft_return_start"] is not None]
        lines.append(
            f"| {r['run'].removeprefix('benchmarks/runs/')} | {r['env_step']} | {np.mean([e['return'] for e in eps]):.0f} | "
            f"{np.mean([e['length'] for e in eps]):.0f} | {last} | {foresight if ends else '– (none terminated)'} | {model} | "
            f"{np.mean([e['stochastic_return'] for e in eps]):.0f} | {np.mean([e['q_start'] for e in eps]):.1f} | "
            f"{f'{np.mean(soft):.1f}' if soft else '–'} | "
            f"{f'{np.mean(biases):.1f}' if biases else '– (all cut by the time limit)'} |")
    return lines


def probe_fit_lines(r: Mapping[str, Any]) -> list[str]:
    """The checkpoint's critic against its own targets per data slice, beside the frozen policy's episodes."""
    fit = r.get("fit_at_checkpoint")
    if not fit:  # probes run before the fit check was added
        return []
    lines = ["| data (before any probe update) | rows | mean reward | terminal | mean Q | mean target |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {f['rows']} | {f['reward']:.3f} | {f['terminal']:.4f} | {f['q']:.1f} | {f['target']:.1f} |"
              for name, f in fit.items()]
    return lines + [f"| the frozen policy's stochastic episodes | {r['episode_steps']} | "
                    f"{r['episode_reward']:.3f} | | | |", ""]


def probe_table(d: Mapping[str, Any]) -> list[str]:
    """Critic bias under policy evaluation, per probe variant, at each measured number of updates."""
    lines: list[str] = []
    for r in d["runs"]:
        curves = r["bias_by_updates"]
        steps = [u for u, _ in next(iter(curves.values()))]
        lines += [f"`{r['command']}` ({r['date']}): {r['run'].removeprefix('benchmarks/runs/')} at {r['env_step']} "
                  f"env steps, α {r['alpha']}, stochastic return {r['stochastic_return']} "
                  f"({r['steps_measured']} steps of {r['episodes']} episodes measured).", "",
                  *probe_fit_lines(r),
                  "| critic-only updates | " + " | ".join(str(u) for u in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        lines += [f"| {name} | " + " | ".join(f"{b:+.1f}" for _, b in curve) + " |" for name, curve in curves.items()]
        lines.append("")
    return lines[:-1]


def entropy_pressure_table(d: Mapping[str, Any]) -> list[str]:
    """Per checkpoint: the entropy bonus's push on the first action's log σ against the objective's pull."""
    lines = ["| run | env step | α | push | pull by step t = 0…H (H: terminal actions) | 1st-step pull: rewards / "
             "terminal Q | 1st-step pull at horizon 0/1/2/H |", "|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        by_h = r["pull_first_step_by_horizon"]
        lines.append(f"| {r['run'].removeprefix('benchmarks/runs/')} | {r['env_step']} | {r['alpha']:.3f} | "
                     f"{r['push']:+.3f} | {' '.join(f'{v:+.3f}' for v in r['pull_by_step'])} | "
                     f"{r['pull_first_step']['rewards_only']:+.3f} / {r['pull_first_step']['terminal_q_only']:+.3f} | "
                     + " / ".join(f"{v:+.3f}" for v in by_h.values()) + f" (H={len(r['pull_by_step']) - 1}) |")
    return lines


# ---- assembling -------------------------------------------------------------------------------------------


def _model_label(row: Mapping[str, str]) -> str:
    return "true dynamics" if row["dynamics"] == "true" else f"learned, {int(row['data'])} transitions"


def gradient_error_curves(rows: Iterable[Mapping[str, str]]) -> dict[str, dict[int, float]]:
    """Mean relative error of `gradient_error.py`'s rows per (dynamics, data) label and horizon, over seeds."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        out.setdefault(_model_label(r), {}).setdefault(int(r["horizon"]), []).append(float(r["rel_l1_error"]))
    return {label: {h: float(np.mean(v)) for h, v in sorted(by_h.items())} for label, by_h in out.items()}


def gradient_error_verdicts(mean: Mapping[str, Mapping[int, float]]) -> list[str]:
    """Whether each curve has the paper's shape: true dynamics falling with H; learned falling then rising."""
    lines = []
    for label, curve in mean.items():
        hs, errs = list(curve), list(curve.values())
        best = hs[int(np.argmin(errs))]
        if label == "true dynamics":
            falling = errs[-1] < errs[0] and all(b <= a * 1.05 for a, b in zip(errs, errs[1:]))
            lines.append(f"{label}: error {errs[0]:.3f} at H={hs[0]} -> {errs[-1]:.3f} at H={hs[-1]}; "
                         f"{'falls with H as the paper says' if falling else 'does NOT fall monotonically with H'}")
        else:
            interior = hs[0] < best < hs[-1]
            lines.append(f"{label}: lowest error {min(errs):.3f} at H={best} (H={hs[0]}: {errs[0]:.3f}, "
                         f"H={hs[-1]}: {errs[-1]:.3f}); "
                         f"{'falls then rises: an intermediate H is best, as the paper says' if interior else 'no intermediate optimum in this range'}")
    return lines


def plot_gradient_error(mean: Mapping[str, Mapping[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in mean.items():
        ax.plot(list(curve), list(curve.values()), marker="o", label=label, linewidth=2 if "true" in label else 1)
    ax.set_xlabel("horizon H")
    ax.set_ylabel("relative L1 error of the policy gradient")
    ax.set_yscale("log")
    ax.set_title("MAAC gradient error vs horizon (double integrator)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gradient_error_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Relative L1 gradient error by horizon: mean ± std (median) over seeds per model, then the verdicts."""
    by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[_model_label(r)][int(r["horizon"])].append(float(r["rel_l1_error"]))
    horizons = sorted({h for curve in by.values() for h in curve})
    seeds = sorted({r["seed"] for r in rows}, key=int)
    lines = [f"Rows: `benchmarks/results/gradient_error.csv` ({len(seeds)} seeds; command and commit on every row).", "",
             "| model | " + " | ".join(f"H={h}" for h in horizons) + " |", "|---|" + "---|" * len(horizons)]
    for label, curve in by.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{np.mean(curve[h]):.3f} ± {np.std(curve[h]):.3f} ({np.median(curve[h]):.3f})" if h in curve else "–"
            for h in horizons) + " |")
    return lines + ["", *(f"- {line}" for line in gradient_error_verdicts(gradient_error_curves(rows)))]


# ---- adaptation to a perturbed sim (issue 22; benchmarks/adaptation.py) --------------------------------------


def _adaptation_values(rows: Sequence[Mapping[str, str]], measure: str, condition: str) -> dict[int, float]:
    """Seed -> value of one measure/condition (seeds whose cell is empty are left out)."""
    return {int(r["seed"]): float(r["value"]) for r in rows
            if r["measure"] == measure and r["condition"] == condition and r["value"] != ""}


def _seeds_cell(values: Mapping[int, float], digits: int = 1, percent_of: Mapping[int, float] | None = None) -> str:
    if not values:
        return "–"
    v = list(values.values())
    text = f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"
    if percent_of:
        ratios = [values[s] / percent_of[s] for s in values if percent_of.get(s)]
        if ratios:
            text += f" ({100 * np.mean(ratios):.0f} %)"
    return text + (" [" + ", ".join(f"{values[s]:.{digits}f}" for s in sorted(values)) + "]" if len(v) > 1 else "")


def adaptation_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Nominal, perturbed and finetuned returns per controller, guarded share, model error, the fresh run, the
    target of issue 22; means ± std over seeds [per seed], % of the same controller's nominal return in parentheses."""
    main = [r for r in rows if r["measure"] != "screen_return"]
    if not main:
        return []
    seeds = sorted({int(r["seed"]) for r in main})
    perturbation = sorted({r["perturbation"] for r in main})
    ks = sorted({int(r["condition"][2:].split(":")[0]) for r in main if r["condition"].startswith("ft")})
    nominal = {c: _adaptation_values(main, "return", f"nominal:{c}") for c in ("policy", "cem_guard")}
    nominal["cem"] = nominal["cem_guard"]  # the nominal sim is run with the guard on only
    lines = [f"Rows: `benchmarks/results/adaptation_{main[0]['task']}.csv` (seeds {', '.join(map(str, seeds))}; "
             f"perturbation `{', '.join(perturbation)}`; command and commit on every row). Cells: mean ± std over "
             "seeds, in parentheses the share of the same controller's nominal return (CEM-MPC's nominal return is "
             "the guarded one's), in brackets each seed's value in seed order. Model error: normalised one-step MSE "
             "of the ensemble's elite mean on held-out perturbed transitions (1.0 = no better than a constant Δs).",
             "",
             "| deployment | policy | CEM-MPC | CEM-MPC + guard | guarded share | model error |",
             "|---|---|---|---|---|---|"]

    def line(label: str, prefix: str, model: str) -> str:
        cells = [_seeds_cell(_adaptation_values(main, "return", f"{prefix}:{c}"), 1,
                             None if prefix == "nominal" else nominal[c]) for c in ("policy", "cem", "cem_guard")]
        share = _seeds_cell(_adaptation_values(main, "guarded_share", f"{prefix}:cem_guard"), 3)
        error = _seeds_cell(_adaptation_values(main, "model_nmse", model), 3)
        return f"| {label} | " + " | ".join(cells) + f" | {share} | {error} |"

    lines.append(line("nominal sim, nominal run", "nominal", "-"))
    lines.append(line("perturbed sim, nominal run", "perturbed", "nominal"))
    for k in ks:
        lines.append(line(f"perturbed sim, finetuned on {k} recorded steps", f"ft{k}", f"ft{k}"))
    notes = {r["note"] for r in main if r["condition"].startswith("ft") and r["measure"] == "model_nmse"}
    lines += ["", f"Finetuning: {'; '.join(sorted(notes))}." if notes else ""]
    fresh = [r for r in main if r["measure"] == "fresh_steps"]
    if fresh:
        lines.append("Fresh run on the perturbed env, env steps to reach the finetuned return (a run that did "
                     "not reach it needs more than it ran): " + "; ".join(
            f"seed {r['seed']}: {int(float(r['value'])) if r['value'] else 'not reached'} ({r['note']})"
            for r in sorted(fresh, key=lambda r: int(r["seed"]))) + ".")
    else:
        lines.append("Fresh run on the perturbed env: not run yet.")
    verdicts = []
    for k in [k for k in ks if k <= 2000]:
        best = {}
        for s in seeds:
            ratios = [_adaptation_values(main, "return", f"ft{k}:{c}").get(s, math.nan) / nominal[c].get(s, math.nan)
                      for c in ("policy", "cem_guard") if nominal[c].get(s)]
            ratios = [x for x in ratios if not math.isnan(x)]
            if ratios:
                best[s] = max(ratios)
        if not best:
            continue
        steps = {int(r["seed"]): (float(r["value"]) if r["value"] else None) for r in fresh}
        # a run that did not reach the target needs more than the last step it was evaluated at
        went = {s: max(int(r["condition"]) for r in main if r["measure"] == "fresh_return" and int(r["seed"]) == s)
                for s in steps if any(r["measure"] == "fresh_return" and int(r["seed"]) == s for r in main)}
        quarter = [s for s in best if (steps.get(s) is not None and k < steps[s] / 4)
                   or (s in steps and steps[s] is None and 4 * k <= went.get(s, 0))]
        verdicts.append(f"{k} recorded steps: best controller at {100 * np.mean(list(best.values())):.0f} % of its "
                        f"nominal return on average ({sum(v >= 0.9 for v in best.values())}/{len(best)} seeds "
                        f">= 90 %); fewer than a quarter of a fresh run's steps on {len(quarter)}/{len(best)} seeds; "
                        f"both (the target met) on {sum(best[s] >= 0.9 for s in quarter)}/{len(best)} seeds"
                        + ("" if fresh else " (no fresh run yet)"))
    if verdicts:
        lines += ["", "Target (>= 90 % of nominal after <= 2k recorded steps, in < 1/4 of a fresh run's steps):",
                  *(f"- {v}" for v in verdicts)]
    return lines


def adaptation_screen_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """The perturbation screen: the nominal run on the nominal sim and on each candidate, policy and CEM + guard."""
    screen = [r for r in rows if r["measure"] == "screen_return"]
    if not screen:
        return []
    order = list(dict.fromkeys(r["perturbation"] for r in screen))
    order.sort(key=lambda p: p != "nominal")

    def value(p: str, c: str) -> tuple[float, str] | None:
        row = next((r for r in screen if r["perturbation"] == p and r["condition"] == c), None)
        return None if row is None else (float(row["value"]), row["n"])

    lines = [f"Seed {screen[0]['seed']}, returns over each candidate's episodes (reset seeds from --eval-seed); "
             f"rows in `benchmarks/results/adaptation_{screen[0]['task']}.csv` (measure screen_return).", "",
             "| sim | policy | change | CEM-MPC + guard | change |", "|---|---|---|---|---|"]
    base = {c: value("nominal", c) for c in ("policy", "cem_guard")}
    for p in order:
        cells = []
        for c in ("policy", "cem_guard"):
            v = value(p, c)
            cells.append("–" if v is None else f"{v[0]:.1f} ({v[1]} ep.)")
            cells.append("" if v is None or p == "nominal" or not base[c] or not base[c][0] else
                         f"{100 * (v[0] / base[c][0] - 1):+.0f} %")
        lines.append(f"| `{p}` | " + " | ".join(cells) + " |")
    return lines


def finetune_screen_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """What finetune's rounds train on (finetune_screen.py): the perturbed return per seed, recorded steps, variant
    and rounds, with D_env and D_model as the rounds saw them."""
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: (int(r["seed"]), int(r["record_steps"]), int(r["rounds"]), r["variant"]))
    lines = [f"Rows: `benchmarks/results/finetune_screen_{rows[0]['task']}.csv` (perturbation "
             f"`{rows[0]['perturbation']}`). Perturbed return: the finetuned deterministic policy, mean over the "
             "episodes listed.", "",
             "| seed | recorded steps | variant | rounds | D_env: run's / recorded rows | D_model rows | perturbed return "
             "| episodes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['record_steps']} | {r['variant']} | {r['rounds']} | {r['d_env_env']} / "
                     f"{r['d_env_recorded']} | {r['d_model']} | {float(r['perturbed_return']):.1f} | {r['returns']} |")
    lines += ["", "Measured by:", *sorted({f"- `{r['command']}` at {r['commit']} on {r['cpu']}" for r in rows})]
    return lines


# ---- ablations (paper §5.3 and App. A.4; benchmarks/ablations.py, issue 23) ---------------------------------

# override -> (the verdicts, full MAAC against the ablation, that agree with the paper; what the paper found).
# Verdicts: 'above' (full MAAC's IQM CI lies above the ablation's), 'overlap', 'below'.
ABLATION_PAPER: dict[str, tuple[frozenset[str], str]] = {
    "agent.horizon=0": (frozenset({"above"}), "§5.3, Fig. 4: H = 0 'inflicts a severe drop' (full MAAC above)"),
    "agent.steve=false": (frozenset({"overlap"}), "§5.3, Fig. 4: STEVE targets give 'slightly more stable training, "
                          "but [...] not a significant effect' (no significant difference)"),
    "agent.num_samples=1": (frozenset({"overlap"}), "§5.3, Fig. 4: single samples 'can be used in simple "
                            "environments' and fall short only in high-dimensional ones such as Ant (no significant "
                            "difference on this task)"),
    "agent.entropy=false": (frozenset({"above"}), "App. A.4, Fig. 5: the entropy term is 'very important' "
                            "(full MAAC above)"),
    "agent.real_data_only=true": (frozenset({"above"}), "App. A.4, Fig. 5: augmenting the data with the model is "
                                  "'very important' (full MAAC above)"),
}
# Tasks where the paper's single-sample finding does not settle the expectation (neither simple nor Ant-sized).
ABLATION_PAPER_BY_TASK: dict[tuple[str, str], tuple[frozenset[str], str]] = {
    ("hopper", "agent.num_samples=1"): (frozenset({"overlap", "above"}), "§5.3, Fig. 4: single samples suffice in "
                                        "simple environments, not in high-dimensional ones such as Ant; Hopper lies "
                                        "between (no difference or full MAAC above)"),
}
HORIZON_PAPER = ("§5.2, Fig. 3 (gradient error, not return): with a learned model the error falls and then rises "
                 "with H, so an intermediate H should be best")


def _float(row: Mapping[str, str], key: str) -> float | None:
    return float(row[key]) if row.get(key) not in (None, "") else None


def ablation_label(variant: str) -> str:
    if variant == "base":
        return "full MAAC"
    names = {"agent.horizon=0": "H = 0 (no model in the policy objective)", "agent.steve=false": "−STEVE",
             "agent.num_samples=1": "single sample", "agent.entropy=false": "no entropy",
             "agent.real_data_only=true": "real data only"}
    if variant in names:
        return names[variant]
    if variant.startswith("agent.horizon="):
        return f"H = {variant.partition('=')[2]}"
    return variant


def ablation_verdict(full: Mapping[str, str], other: Mapping[str, str]) -> str | None:
    """'above' / 'below' when full MAAC's IQM CI lies entirely above / below the ablation's, else 'overlap';
    None with fewer than 2 seeds on either side (no interval to compare)."""
    if int(full["n"] or 0) < 2 or int(other["n"] or 0) < 2:
        return None
    if float(full["ci_low"]) > float(other["ci_high"]):
        return "above"
    if float(full["ci_high"]) < float(other["ci_low"]):
        return "below"
    return "overlap"


def _iqm_cell(row: Mapping[str, str]) -> str:
    if not row or int(row["n"] or 0) == 0:
        return "–"
    return f"{float(row['iqm']):.1f} [{float(row['ci_low']):.1f}, {float(row['ci_high']):.1f}] (n={row['n']})"


def ablation_sentences(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """One sentence per ablation at the final budget (and the verdicts at the earlier ones), next to the paper's
    finding; then where the horizons rank."""
    task = rows[0]["task"]
    steps = sorted({int(r["env_step"]) for r in rows})
    at = {(r["variant"], int(r["env_step"])): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    final = steps[-1]
    if ("base", final) not in at:
        return ["No full-MAAC (base) rows: nothing to compare against."]
    full = at[("base", final)]
    words = {"above": "full MAAC ranks above it (disjoint CIs)", "below": "full MAAC ranks BELOW it (disjoint CIs)"}
    lines = []
    for variant in variants:
        if variant == "base":
            continue
        row = at.get((variant, final))
        label = f"**{ablation_label(variant)}** (`{row['overrides'] if row else variant}`)"
        if row is not None and row["same_as"]:
            lines.append(f"{label}: the same config as {ablation_label(row['same_as'])}, not trained separately.")
            continue
        verdict = ablation_verdict(full, row) if row else None
        if verdict is None:
            text = (f"{label}: too few seeds at {final} env steps to compare (n = {row['n'] if row else 0} "
                    f"against {full['n']})")
        else:
            diff = float(full["iqm"]) - float(row["iqm"])
            said = words.get(verdict) or (f"the CIs overlap (full MAAC's IQM {'higher' if diff > 0 else 'lower'} by "
                                          f"{abs(diff):.1f})" if diff else "the CIs overlap (equal IQMs)")
            text = f"{label}: at {final} env steps {float(full['iqm']):.1f} against {float(row['iqm']):.1f}: {said}"
        earlier = [f"{s}: {ablation_verdict(at[('base', s)], at[(variant, s)]) or 'too few seeds'}"
                   for s in steps[:-1] if ("base", s) in at and (variant, s) in at]
        if earlier:
            text += f" (earlier budgets: {', '.join(earlier)})"
        expected = ABLATION_PAPER_BY_TASK.get((task, variant)) or ABLATION_PAPER.get(variant)
        if expected is not None:
            accepted, says = expected
            agreement = ("not judged" if verdict is None else
                         "consistent with it" if verdict in accepted else "NOT consistent with it")
            text += f". Paper: {says}; {agreement}."
        else:
            text += ". Paper: no return ablation of this setting (see the horizon ranking below)."
        lines.append(text)
    horizons: dict[int, Mapping[str, str]] = {}
    for variant in variants:
        if variant.startswith("agent.horizon=") and (variant, final) in at:
            row = at[(variant, final)]
            horizons[int(variant.partition("=")[2])] = full if row["same_as"] == "base" else row
    horizons = {h: r for h, r in horizons.items() if int(r["n"] or 0) > 0}
    if len(horizons) > 1:
        ranked = sorted(horizons, key=lambda h: -float(horizons[h]["iqm"]))
        best = ranked[0]
        interior = min(horizons) < best < max(horizons)
        ties = [h for h in ranked[1:] if ablation_verdict(horizons[best], horizons[h]) == "overlap"]
        lines.append(f"**Horizons** at {final} env steps, by IQM: "
                     + " > ".join(f"H = {h} ({float(horizons[h]['iqm']):.1f})" for h in ranked)
                     + f"; the best, H = {best}, is {'inside' if interior else 'at the edge of'} the range "
                     f"{min(horizons)}–{max(horizons)}"
                     + (f" (its CI overlaps those of H = {', '.join(map(str, sorted(ties)))})" if ties else
                        " (its CI is disjoint from every other H's)")
                     + f". Paper: {HORIZON_PAPER}; "
                     + ("consistent with it." if interior else "NOT consistent with it in this range."))
    return lines


def ablation_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """IQM [95 % CI] (n seeds) per variant at each budget, then the verdict sentences (`ablation_sentences`)."""
    if not rows:
        return []
    task = rows[0]["task"]
    budgets = sorted({(int(r["env_step"]), float(r["share"])) for r in rows})
    at = {(r["variant"], int(r["env_step"])): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    commands = sorted({r["command"] for r in rows if r["command"]})
    commits = sorted({c for r in rows for c in r["commit"].split()})  # space-joined: a commit may end in +dirty
    lines = [f"Rows: `benchmarks/results/ablations_{task}.csv` (sweep directory `{rows[0]['sweep_dir']}`, "
             f"{rows[0]['planned_steps']} env steps planned per trial; trained by "
             + ("; ".join(f"`{c}`" for c in commands) or "an unrecorded command")
             + f" at {', '.join(commits) or 'an unrecorded commit'}; summarised by `{rows[0]['report_command']}`). "
             "Interquartile mean of the evaluation return over seeds with its 95 % percentile bootstrap CI "
             "(2000 resamples), n seeds evaluated at that step.", "",
             "| variant | overrides | " + " | ".join(f"{s} steps ({share:.0%})" for s, share in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for variant in variants:
        first = next(r for r in rows if r["variant"] == variant)
        name = ablation_label(variant) + (f" (= {ablation_label(first['same_as'])})" if first["same_as"] else "")
        lines.append(f"| {name} | {'`' + first['overrides'] + '`' if first['overrides'] else '–'} | "
                     + " | ".join(_iqm_cell(at.get((variant, s), {})) for s, _ in budgets) + " |")
    return lines + ["", *(f"- {line}" for line in ablation_sentences(rows))]


def tables(results: Path = RESULTS, figures: Path | None = FIGURES) -> dict[str, list[str]]:
    """Every generated table by marker name, from the files under `results`; writes the PNGs to `figures`."""
    out: dict[str, list[str]] = {}
    for task, env_id in TASKS.items():
        found = groups(read_rows(results / eval_csv(task).name))
        if not found:
            continue
        milestones = milestone_table(task, found)
        out[f"sample_efficiency_{task}"] = [
            f"Rows: `benchmarks/results/{eval_csv(task).name}` (every evaluation of every seed, with its command "
            "and commit).", "", *summary_table(task, found), "", *milestones, *([""] if milestones else []),
            "Machines:", *provenance_lines(found)]
        if figures is not None:
            plot_task(task, found, figures / f"{task}_learning_curve.png",
                      f"{env_id}: MAAC vs SAC\n(MAAC: --config {task} [with overrides])")
    archived = read_rows(results / "sample_efficiency_archived.csv")
    for task in TASKS:
        found_archived = archived_groups(archived, task)
        if found_archived:
            out[f"archived_{task}"] = archived_table(task, found_archived)
            if figures is not None:
                plot_archived(task, found_archived, figures / "archive" / f"{task}_learning_curve.png")
    for path in sorted(results.glob("training_cost_*.csv")):
        task = path.stem.removeprefix("training_cost_")
        rows = read_rows(path)
        for name, lines in ((f"profile_{task}", profile_table(rows)), (f"update_cost_{task}", update_cost_table(rows))):
            if lines:
                out[name] = lines
    demo = demo_timing_table(read_rows(results / "demo_timing.csv"))
    if demo:
        out["demo_timing"] = demo
    speed = train_speed_table(read_rows(results / "train_speed.csv"))
    if speed:
        out["train_speed"] = speed
    gradient_rows = read_rows(results / "gradient_error.csv")
    if gradient_rows:
        out["gradient_error"] = gradient_error_table(gradient_rows)
        if figures is not None:
            plot_gradient_error(gradient_error_curves(gradient_rows), figures / "gradient_error.png")
    for path in sorted(results.glob("adaptation_*.csv")):
        task = path.stem.removeprefix("adaptation_")
        rows = read_rows(path)
        for name, lines in ((f"adaptation_{task}", adaptation_table(rows)),
                            (f"adaptation_screen_{task}", adaptation_screen_table(rows))):
            if lines:
                out[name] = lines
    for path in sorted(results.glob("finetune_screen_*.csv")):
        lines = finetune_screen_table(read_rows(path))
        if lines:
            out[path.stem] = lines
    for path in sorted(results.glob("ablations_*.csv")):
        lines = ablation_table(read_rows(path))
        if lines:
            out[f"ablations_{path.stem.removeprefix('ablations_')}"] = lines
    for name, render in (("diagnose", diagnosis_table), ("critic_probe", probe_table),
                         ("entropy_pressure", entropy_pressure_table)):
        path = results / f"{name}.json"
        if path.is_file():
            out[name] = render(json.loads(path.read_text()))
    return out


def fill_markers(text: str, generated: Mapping[str, Sequence[str]]) -> tuple[str, list[str]]:
    """`text` with each marked table replaced by its generated lines; also the marker names with no table."""
    missing = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in generated:
            missing.append(name)
            return match[0]
        body = "\n".join(generated[name]).strip("\n")
        return f"<!-- table:{name}:begin -->\n{body}\n<!-- table:{name}:end -->"

    return _MARKER.sub(replace, text), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result CSVs and JSONs")
    parser.add_argument("--markdown", type=Path, default=RESULTS_MD)
    parser.add_argument("--check", action="store_true", help="compare only: exit 1 if the markdown is stale")
    args = parser.parse_args(argv)
    generated = tables(args.results, None if args.check else FIGURES)
    text = args.markdown.read_text()
    new, missing = fill_markers(text, generated)
    for name in missing:
        print(f"no data for table {name!r}: left as it is", file=sys.stderr)
    unused = sorted(set(generated) - set(_MARKER.findall(text)))
    for name in unused:
        print(f"table {name!r} has data but no markers in {args.markdown.name}", file=sys.stderr)
    if args.check:
        return 0 if new == text else 1
    args.markdown.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
