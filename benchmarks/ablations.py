"""Paper §5.3 (and App. A.4): the ablation study, as one sweep of explicit variants (issue 23, item 3).

    python benchmarks/ablations.py run --task inverted_pendulum --seeds 0 1 2 3 4 --steps 5000 \
        [--address auto] [--out benchmarks/runs/ablations-inverted_pendulum] [--cpus-per-trial 1]
    python benchmarks/ablations.py report --task inverted_pendulum [--out ...] [--budgets 0.25 0.5 1.0]

`run` trains every variant below for every seed through the sweep runner (`maac_robot.sweep.runner.run_sweep`
with `variants=`: one Ray submission, each trial its own run directory OUT/VARIANT-sS/, OUT/evaluations.csv
rewritten as each trial ends). Rerunning the same command skips finished trials and resumes the others from
their checkpoints; a larger --steps resumes every trial to the new budget. The variants, on the task's config
(`PRESETS`: the config and the --set items every variant shares):

* full MAAC: the config itself (sweep variant 'base');
* `agent.horizon=0`: the paper's "H = 0", the model left out of the *policy* objective only (its actor loss is
  SAC's); the critic still learns from STEVE targets and D_model, as in the paper's ablation, which removes one
  component at a time. The trainer needs nothing else for it (`learn.trainer.uses_model`: the ensemble is
  still fitted for STEVE and the rollouts). A fully model-free run (horizon 0 + steve false + real data only,
  i.e. SAC) is not an ablation of one component; SAC is benchmarks/sample_efficiency.py's baseline;
* `agent.steve=false` (critic targets: one-step soft Bellman), `agent.num_samples=1` (one imagined trajectory
  per start state), `agent.entropy=false` (no entropy bonus, α = 0), `agent.real_data_only=true` (policy and
  critic on D_env only, no imagined rollouts);
* `agent.horizon=1` ... `agent.horizon=5`.

A variant whose resolved config equals an earlier one's (the config's own horizon, e.g. `agent.horizon=3` on
InvertedPendulum) is not trained twice: OUT/ablations.json records it as the same as that variant, and the report
shows it with that variant's numbers.

`report` refreshes OUT/evaluations.csv from the trials' metrics (`runner.collect`, so an interrupted study's
finished evaluations count), computes per variant the IQM and its 95 % percentile bootstrap CI of the
evaluation return over seeds (`maac_robot.sweep.stats.aggregate`) at fixed shares of the planned budget (each
snapped down to an evaluated step), writes benchmarks/results/ablations_TASK.csv (the trials' command and commit
on every row) and prints the table that `benchmarks/report.py` renders into RESULTS.md (`ablation_table`: one
sentence per ablation on whether full MAAC ranks above it as the paper says).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import ablation_table  # noqa: E402
from results_csv import RESULTS, RUNS, command_line, git_commit, read_rows, write_rows  # noqa: E402

from maac_robot.runtime.files import atomic_write  # noqa: E402
from maac_robot.sweep.stats import aggregate  # noqa: E402

CONFIDENCE, REPS, BOOT_SEED = 0.95, 2000, 0
INFO_FILE = "ablations.json"  # in OUT: the task, config, shared --set items, variants and which equal which
FULL = ()  # the full-MAAC variant: no override (the sweep names it 'base')
HORIZONS = (1, 2, 3, 4, 5)
ABLATIONS: tuple[tuple[str, ...], ...] = (
    FULL,
    ("agent.horizon=0",),
    ("agent.steve=false",),
    ("agent.num_samples=1",),
    ("agent.entropy=false",),
    ("agent.real_data_only=true",),
    *((f"agent.horizon={h}",) for h in HORIZONS),
)
COLUMNS = ("task", "variant", "overrides", "same_as", "share", "env_step", "n", "seeds", "iqm", "ci_low", "ci_high",
           "mean", "planned_steps", "config_digest", "sweep_dir", "command", "commit", "report_command")


@dataclass(frozen=True)
class Preset:
    config: str
    sets: tuple[str, ...]  # --set items of every variant
    steps: int  # default budget (env steps per trial)
    budgets: tuple[float, ...]  # shares of the budget the report tabulates
    note: str


PRESETS: dict[str, Preset] = {
    "inverted_pendulum": Preset("inverted_pendulum", (), 5000, (0.25, 0.5, 1.0),
                                "the repository's InvertedPendulum config (horizon 3, 2 samples, STEVE horizon 5)"),
    # The budget variant of benchmarks/RESULTS.md (terminal_q_samples 1, updates_per_step 2) with num_samples 2,
    # not its 1: at 1 the num_samples=1 ablation would be the full config. Budgets from 50 %: the first 5000
    # steps are the random phase, the same for every variant.
    "hopper": Preset("hopper", ("agent.num_samples=2", "agent.terminal_q_samples=1", "agent.updates_per_step=2"),
                     20000, (0.5, 0.75, 1.0),
                     "the authors' Hopper settings at the budget variant's cost (terminal_q_samples 1, "
                     "updates_per_step 2) with num_samples 2"),
}


def default_out(task: str) -> Path:
    return RUNS / f"ablations-{task}"


def variant_of(point: Sequence[str]) -> str:
    from maac_robot.sweep.runner import variant_name

    return variant_name(point)


def plan_study(task: str, seeds: Sequence[int], steps: int | None, out: Path, extra_sets: Sequence[str] = (),
               cpus_per_trial: int = 1) -> tuple[list[tuple[str, ...]], dict[str, str], list[Any]]:
    """The variants to train (those with a config of their own), which variant each left-out one equals, and the
    trials (`runner.plan`), every config loaded and validated."""
    from maac_robot.sweep.runner import plan

    preset = PRESETS[task]
    sets = (*preset.sets, *extra_sets)
    trials = plan(preset.config, seeds[:1], sets=sets, steps=steps, out=out, cpus_per_trial=cpus_per_trial,
                  variants=ABLATIONS)
    first: dict[str, str] = {}
    kept, same_as = [], {}
    for point, trial in zip(ABLATIONS, trials):
        name = variant_of(point)
        if trial.digest in first:
            same_as[name] = first[trial.digest]
        else:
            first[trial.digest] = name
            kept.append(point)
    return kept, same_as, plan(preset.config, seeds, sets=sets, steps=steps, out=out,
                               cpus_per_trial=cpus_per_trial, variants=kept)


def run(task: str, seeds: Sequence[int], steps: int | None, out: Path, address: str | None = None,
        extra_sets: Sequence[str] = (), cpus_per_trial: int = 1, command: str | None = None) -> int:
    from maac_robot.sweep.runner import run_sweep

    preset = PRESETS[task]
    steps = preset.steps if steps is None else steps
    kept, same_as, trials = plan_study(task, seeds, steps, out, extra_sets, cpus_per_trial)
    command = command or command_line()
    out.mkdir(parents=True, exist_ok=True)
    info = {"task": task, "config": preset.config, "sets": [*preset.sets, *extra_sets], "seeds": list(seeds),
            "steps": steps, "variants": [variant_of(p) for p in ABLATIONS],
            "overrides": {variant_of(p): " ".join(p) for p in ABLATIONS}, "same_as": same_as, "command": command}
    atomic_write(out / INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    for name, other in same_as.items():
        print(f"{name}: the same config as {other}, not trained twice")

    def planned(trials: list[Any], states: Mapping[str, tuple[str, int | None]]) -> None:
        kinds = [s for s, _ in states.values()]
        print(f"ablations {task} in {out}: {len(kept)} variants x {len(seeds)} seeds = {len(trials)} trials of "
              f"{steps} env steps ({kinds.count('done')} done, {kinds.count('resume')} to resume, "
              f"{kinds.count('new')} new)", flush=True)

    def ended(trial: Any, result: Mapping[str, Any] | None, error: BaseException | None) -> None:
        if error is not None:
            print(f"{trial.name}: failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        elif result is not None:
            last = result["last"]
            print(f"{trial.name}: {result['env_step']} env steps"
                  + (f", last evaluation {last['eval_return_mean']:.1f}" if last else ""), flush=True)

    outcome = run_sweep(preset.config, seeds, out, sets=info["sets"], steps=steps, address=address,
                        cpus_per_trial=cpus_per_trial, command=command, on_plan=planned, on_result=ended,
                        variants=kept)
    print(f"{out / 'evaluations.csv'}: {len(outcome.rows)} evaluations; next: python benchmarks/ablations.py "
          f"report --task {task} --out {out}")
    if outcome.errors:
        print(f"{len(outcome.errors)} trials failed ({', '.join(outcome.errors)}); rerun the same command to retry",
              file=sys.stderr)
        return 1
    return 0


# ---- the report ---------------------------------------------------------------------------------------------


def budget_steps(evaluated: Sequence[int], planned: int, shares: Sequence[float]) -> list[tuple[float, int]]:
    """(share, env step) per share of the planned budget: the last evaluated step at or below share x planned
    (a share with none is left out; two shares snapping to one step keep the first)."""
    out: list[tuple[float, int]] = []
    for share in shares:
        below = [s for s in sorted(set(evaluated)) if s <= share * planned + 1e-9]
        if below and below[-1] not in (step for _, step in out):
            out.append((share, below[-1]))
    return out


def summarise(evaluations: Sequence[Mapping[str, str]], info: Mapping[str, Any], shares: Sequence[float],
              sweep_dir: str = "", report_command: str = "") -> list[dict[str, Any]]:
    """The CSV rows: per variant (ABLATIONS order, then any other) and budget, the IQM with its CI over seeds.
    `evaluations` are a sweep's evaluations.csv rows (`records.SWEEP_COLUMNS`)."""
    by_variant: dict[str, list[Mapping[str, str]]] = {}
    for row in evaluations:
        by_variant.setdefault(row["variant"], []).append(row)
    same_as = dict(info.get("same_as", {}))
    order = [v for v in info.get("variants", []) if v in by_variant or same_as.get(v) in by_variant]
    order += [v for v in by_variant if v not in order]
    planned = int(info.get("steps") or max(int(r["planned_steps"]) for r in evaluations))
    steps = budget_steps([int(r["env_step"]) for r in evaluations], planned, shares)
    overrides = dict(info.get("overrides", {}))
    out = []
    for variant in order:
        rows = by_variant[same_as.get(variant, variant)]
        returns: dict[int, dict[int, float]] = {}
        for r in rows:
            returns.setdefault(int(r["env_step"]), {})[int(r["seed"])] = float(r["eval_return_mean"])
        for share, step in steps:
            values = returns.get(step, {})
            a = aggregate(list(values.values()), CONFIDENCE, REPS, BOOT_SEED) if values else {}
            out.append({"task": info.get("task", ""), "variant": variant,
                        "overrides": overrides.get(variant, rows[0].get("overrides", "")),
                        "same_as": same_as.get(variant, ""), "share": share, "env_step": step,
                        "n": len(values), "seeds": " ".join(map(str, sorted(values))),
                        "iqm": a.get("iqm"), "ci_low": a.get("ci_low"), "ci_high": a.get("ci_high"),
                        "mean": a.get("mean"), "planned_steps": planned,
                        "config_digest": " ".join(sorted({r["config_digest"] for r in rows})),
                        "sweep_dir": sweep_dir,
                        "command": " ; ".join(sorted({r["command"] for r in rows if r["command"]})),
                        "commit": " ".join(sorted({r["commit"] for r in rows if r["commit"]})),
                        "report_command": report_command})
    return out


def report(task: str, out: Path, shares: Sequence[float] | None = None, results: Path = RESULTS,
           command: str | None = None) -> list[str]:
    """Refresh OUT/evaluations.csv, write RESULTS/ablations_TASK.csv, return the rendered table."""
    from maac_robot.runtime.errors import UserError
    from maac_robot.sweep.records import CSV_NAME, SWEEP_FILE
    from maac_robot.sweep.runner import TRIAL_FILE, collect

    info_path = out / INFO_FILE
    if not info_path.is_file():
        raise UserError(f"{out} holds no ablation study ({INFO_FILE}); run `python benchmarks/ablations.py run "
                        f"--task {task} --out {out} ...` first")
    info = json.loads(info_path.read_text())
    if info.get("task") != task:
        raise UserError(f"{out} is the ablation study of {info.get('task')!r}, not {task!r}")
    if any(out.glob(f"*/{TRIAL_FILE}")):
        meta = json.loads((out / SWEEP_FILE).read_text()) if (out / SWEEP_FILE).is_file() else {}
        collect(out, meta.get("trials", []))
    evaluations = read_rows(out / CSV_NAME)
    if not evaluations:
        raise UserError(f"{out / CSV_NAME} holds no evaluations yet")
    rows = summarise(evaluations, info, shares or PRESETS[task].budgets, _shown(out),
                     f"{command or command_line()} (at {git_commit()})")
    path = results / f"ablations_{task}.csv"
    write_rows(path, rows, COLUMNS)
    return [f"wrote {path}", "", *ablation_table(read_rows(path))]


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run_p = sub.add_parser("run", help="train every variant for every seed (resumable)")
    rep_p = sub.add_parser("report", help="IQM and CI per variant at fixed budgets -> benchmarks/results/")
    for p in (run_p, rep_p):
        p.add_argument("--task", choices=sorted(PRESETS), required=True)
        p.add_argument("--out", type=Path, default=None, help="the study's sweep directory "
                       "(default benchmarks/runs/ablations-TASK)")
    run_p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run_p.add_argument("--steps", type=int, default=None, help="env steps per trial (default: the task's preset)")
    run_p.add_argument("--address", default=None, help="a Ray cluster to join ('auto', 'ray://HOST:PORT'); "
                       "default: a local instance on loopback")
    run_p.add_argument("--cpus-per-trial", type=int, default=1)
    run_p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="also applied to every variant (after the task preset's)")
    rep_p.add_argument("--budgets", type=float, nargs="+", default=None,
                       help="shares of the planned budget to tabulate (default: the task's preset)")
    rep_p.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    out = args.out or default_out(args.task)
    from maac_robot.runtime.errors import UserError

    try:
        if args.cmd == "run":
            return run(args.task, args.seeds, args.steps, out, args.address, args.sets, args.cpus_per_trial)
        print("\n".join(report(args.task, out, args.budgets, args.results)))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
