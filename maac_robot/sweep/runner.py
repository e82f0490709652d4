"""`maac-robot sweep`: every (variant x seed) of a config as its own run directory, trained through Ray.

    maac-robot sweep --config hopper --seeds 0 1 2 --grid agent.horizon=0,1,3 --grid agent.steve=true,false \
        --steps 20000 --out sweeps/hopper-h

A variant is one point of the grid (the product of the --grid lists: 'agent.horizon=0,agent.steve=true'); its
trial for seed S trains in OUT/VARIANT-sS/ (`run_sweep(variants=[...])` takes an explicit variant list instead
of a grid: an ablation study, benchmarks/ablations.py), a run directory like `maac-robot train`'s, through the library
(`learn.trainer.train`) with `train.num_threads` = --cpus-per-trial, in a Ray task that reserves as many CPUs.
Trials are resumable: rerunning the same command skips the trials whose checkpoint has reached the budget and
resumes the others from their checkpoints (a kill -9 of the driver or of a worker loses at most
`train.checkpoint_every` env steps of a trial; Ray itself retries a trial whose worker died). OUT/evaluations.csv
gets every evaluation of every trial with the command, config digest and commit of the stretch that computed
it (`records.SWEEP_COLUMNS`), rewritten as each trial ends.

Without --address a local Ray instance is started on loopback with as many CPUs as this process may use, and
stopped at the end; `--address auto` or `ray://HOST:PORT` joins an existing cluster instead (every node needs
this package installed and OUT on a filesystem they all mount at the same path).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from maac_robot.runtime.errors import UserError
from maac_robot.runtime.files import atomic_write
from maac_robot.sweep.records import (CSV_NAME, SWEEP_COLUMNS, SWEEP_FILE, config_digest, evaluation_fields,
                                      source_commit, write_rows)

TRIAL_FILE = "trial.json"  # in each trial's run directory: its variant, overrides, seed and stretches
BASE_VARIANT = "base"  # the variant name of a sweep without --grid
LOCK_WAIT_S = 60.0  # a trial waits this long for another process (a dying worker) to release its run directory


class SweepError(UserError):
    """A sweep that cannot be planned or run as asked (exit code 2, one line)."""


@dataclass(frozen=True)
class Trial:
    """One (variant, seed) of a sweep: where it trains and the resolved config it trains with."""

    variant: str
    sets: tuple[str, ...]  # every --set item the trial applies: the common ones, then its grid point
    seed: int
    run_dir: Path
    config: dict[str, Any]  # Config.model_dump(mode="json"): seed, budget and threads included
    digest: str

    @property
    def steps(self) -> int:
        return int(self.config["train"]["total_steps"])

    @property
    def name(self) -> str:
        return self.run_dir.name


# ---- planning ---------------------------------------------------------------------------------------------


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`--grid section.key=v1,v2,...` items as (key, values), in the order given (values split on commas)."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")]
        if not sep or "." not in key or not all(values):
            raise SweepError(f"--grid {item!r}: expected section.key=value1,value2,..., e.g. "
                             "--grid agent.horizon=0,1,3")
        if key in (k for k, _ in grid):
            raise SweepError(f"--grid {item!r}: {key} is already a grid axis; give its values in one --grid")
        if len(set(values)) != len(values):
            raise SweepError(f"--grid {item!r}: a value is repeated")
        grid.append((key, values))
    return grid


def grid_points(grid: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, ...]]:
    """The product of the grid's axes, first axis outermost: each point a tuple of 'key=value' items."""
    return [tuple(f"{key}={value}" for (key, _), value in zip(grid, values))
            for values in itertools.product(*(values for _, values in grid))]


def variant_name(point: Sequence[str]) -> str:
    return ",".join(point) if point else BASE_VARIANT


def trial_dir_name(variant: str, seed: int) -> str:
    return f"{variant.replace('/', '_').replace(' ', '')}-s{seed}"


def plan(config: str | Path, seeds: Sequence[int], grid: Sequence[str] = (), sets: Sequence[str] = (),
         steps: int | None = None, out: str | Path = "sweeps/sweep", cpus_per_trial: int = 1,
         variants: Sequence[Sequence[str]] | None = None) -> list[Trial]:
    """Every (variant, seed) trial, each config loaded and validated before anything runs. The variants are
    the grid's points, or, with `variants`, exactly those lists of 'key=value' items (not a product: an
    ablation study; `()` is the config with `sets` alone, named 'base'; a variant's items are applied after
    `sets`, so they may change a key `sets` gives)."""
    from maac_robot.learn.config import load_config, parse_set

    if not seeds:
        raise SweepError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated")
    if cpus_per_trial < 1:
        raise SweepError(f"--cpus-per-trial must be at least 1, got {cpus_per_trial}")
    if steps is not None and steps < 1:
        raise SweepError(f"--steps must be positive, got {steps}")
    axes = parse_grid(grid)
    if variants is None:
        points, varied = grid_points(axes), {k for k, _ in axes}
    else:
        if grid:
            raise SweepError("give grid axes or an explicit variant list, not both")
        points = [tuple(v) for v in variants]
        if not points:
            raise SweepError("variants: give at least one (an empty one is the config itself)")
        if len(set(points)) != len(points):
            raise SweepError("variants: a variant is repeated")
        varied = {key for point in points for key in parse_set(list(point))[0]}
    common, _ = parse_set(list(sets))
    for key in ("train.seed", "train.num_threads"):
        if key in common or key in varied:
            raise SweepError(f"{key} is set by the sweep (--seeds, --cpus-per-trial), not by --set or --grid")
    overlap = sorted(set(common) & varied)
    if overlap and variants is None:  # a variant's own items are applied after the common ones, and win
        raise SweepError(f"{', '.join(overlap)} is both a --set and a --grid axis")
    out = Path(out)
    trials = []
    for point in points:
        items = (*sets, *point)
        overrides, flags = parse_set(list(items))
        overrides["train.seed"], overrides["train.num_threads"] = 0, cpus_per_trial
        if steps is not None:
            overrides["train.total_steps"], flags["train.total_steps"] = steps, f"--steps {steps}"
        variant = variant_name(point)
        for seed in seeds:
            overrides["train.seed"], flags["train.seed"] = seed, f"--seeds {seed}"
            dumped = load_config(config, overrides, flags).model_dump(mode="json")
            trials.append(Trial(variant, items, seed, out / trial_dir_name(variant, seed), dumped,
                                config_digest(dumped)))
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise SweepError("two grid points map to the same directory name; write their values differently")
    return trials


def checkpoint_step(run_dir: Path) -> int | None:
    """The env step of a run directory's checkpoint (None without one), read without loading its buffers."""
    import torch

    from maac_robot.learn.trainer import RunPaths, load_checkpoint

    path = RunPaths(run_dir).checkpoint
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["env_step"])
    except Exception:  # noqa: BLE001 - let the library's reader name the problem
        return int(load_checkpoint(path)["env_step"])


def trial_state(trial: Trial) -> tuple[str, int | None]:
    """('done' | 'resume' | 'new', checkpoint env step) of a trial, from its run directory. A directory that
    holds a checkpoint of another config (or seed) is an error: the sweep would mix two experiments."""
    step = checkpoint_step(trial.run_dir)
    if step is None:
        return "new", None
    import yaml

    saved = yaml.safe_load((trial.run_dir / "config.yaml").read_text())
    if config_digest(saved) != trial.digest or saved["train"]["seed"] != trial.seed:
        changed = sorted(f"{section}.{key}" for section in trial.config if section in saved
                         for key, value in trial.config[section].items()
                         if saved[section].get(key) != value and key not in ("total_steps", "num_threads"))
        raise SweepError(f"{trial.run_dir} was trained with another config ({', '.join(changed) or 'its digest'} "
                         "differ); give the sweep another --out, or remove that directory")
    return ("done" if step >= trial.steps else "resume"), step


# ---- one trial (runs in a Ray worker) ----------------------------------------------------------------------


@contextmanager
def trial_lock(run_dir: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Exclusive use of a run directory: a worker of a killed driver that has not died yet never trains
    into it at the same time as its successor (the lock goes with the process that holds it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".trial.lock").open("a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SweepError(f"{run_dir} is being trained by another process (pid in .trial.lock)") from None
                time.sleep(0.5)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_trial(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Train one trial to its budget in `run_dir`: resumed from its checkpoint, started over when it has
    none (the files of an attempt killed before its first checkpoint are removed), nothing when it is done."""
    from maac_robot.learn.config import config_from_dict
    from maac_robot.learn.trainer import RunPaths, read_metrics, train

    cfg = config_from_dict(config, source=run_dir)
    root = Path(run_dir)
    with trial_lock(root):
        start = checkpoint_step(root)
        if start is None or start < cfg.train.total_steps:
            if start is None:
                RunPaths(root).metrics.unlink(missing_ok=True)
                shutil.rmtree(root / "tensorboard", ignore_errors=True)
            trainer = train(cfg, root, resume=start is not None, progress=False)
            end = trainer.env_step
        else:
            end = start
    metrics = read_metrics(RunPaths(root).metrics)
    return {"run_dir": run_dir, "from_step": start or 0, "env_step": end, "last": metrics[-1] if metrics else None,
            "pid": os.getpid()}


# ---- Ray ---------------------------------------------------------------------------------------------------


def _ray():  # -> the ray module
    try:
        import ray
    except ModuleNotFoundError as err:
        if err.name != "ray":
            raise
        raise SweepError("`maac-robot sweep` runs its trials through Ray, which this install lacks: "
                         "pip install 'maac-robot[sweep]'") from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at `address` ('auto', 'HOST:PORT', 'ray://HOST:PORT'), or start a local
    instance with `num_cpus` CPUs (default: what this process may use) whose every server listens on loopback
    only and that has no dashboard."""
    if address is None:
        # Ray binds its servers to the node address it picks: with 'clusters' disabled that is the loopback
        # address (its default on macOS and Windows). Read when ray's constants are imported, and patched
        # for a process that imported ray before.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = _ray()
    if address is None:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        if num_cpus is None:
            from maac_robot.learn.trainer import available_cores

            num_cpus = available_cores()
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)


def run_trials(trials: Sequence[Trial], address: str | None = None, cpus_per_trial: int = 1, max_retries: int = 2,
               on_result: Callable[[Trial, dict[str, Any] | None, BaseException | None], None] | None = None,
               work: Callable[[dict[str, Any], str], dict[str, Any]] = run_trial) -> dict[str, BaseException]:
    """Run `trials` as Ray tasks of `cpus_per_trial` CPUs each, as many at a time as the cluster's CPUs allow,
    on the Ray instance this process is connected to, else on one `start_ray(address)` starts (and stops).
    A task whose worker dies is retried `max_retries` times (it resumes from the trial's checkpoint); an
    exception in a trial is not. `on_result(trial, result, error)` is called as each trial ends; returns the
    errors by trial name. `work(config, run_dir)` trains one trial (default `run_trial`; the benchmarks pass
    their SAC baseline's)."""
    ray = _ray()
    owns = not ray.is_initialized()
    if owns:
        start_ray(address)
    errors: dict[str, BaseException] = {}
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < cpus_per_trial:
            raise SweepError(f"the Ray cluster has {cpus:g} CPUs, fewer than --cpus-per-trial {cpus_per_trial}")
        task = ray.remote(work).options(num_cpus=cpus_per_trial, max_retries=max_retries,
                                             retry_exceptions=False, name="maac-robot-trial")
        pending = {task.remote(t.config, str(t.run_dir.resolve())): t for t in trials}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(ref)
            try:
                result, error = ray.get(ref), None
            except ray.exceptions.RayTaskError as err:
                result, error = None, (err.cause if isinstance(err.cause, BaseException) else err)
            except ray.exceptions.RayError as err:  # the worker died more often than it may be retried
                result, error = None, err
            if error is not None:
                errors[trial.name] = error
            if on_result is not None:
                on_result(trial, result, error)
    finally:
        if owns:
            ray.shutdown()
    return errors


# ---- the sweep's records -----------------------------------------------------------------------------------


def write_trial_record(trial: Trial, state: str, start: int | None, command: str, commit: str, config: str) -> None:
    """Record, before a trial (re)starts, what it is and the stretch about to run (a new trial's earlier
    stretches are dropped: its directory starts over). A finished run directory that the sweep did not train
    (no record yet) gets one without stretches: its rows name no command or commit."""
    path = trial.run_dir / TRIAL_FILE
    stretches = json.loads(path.read_text()).get("stretches", []) if path.is_file() and state == "resume" else []
    if state != "done":
        stretches.append({"command": command, "commit": commit, "from_step": start or 0,
                          "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    record = {"variant": trial.variant, "overrides": list(trial.sets), "seed": trial.seed, "config": config,
              "config_digest": trial.digest, "planned_steps": trial.steps, "stretches": stretches}
    atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())


def _overrides_text(sets: Sequence[str]) -> str:
    return " ".join(f"--set {shlex.quote(item)}" for item in sets)


def collect(sweep_dir: str | Path, order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every evaluation of every trial in `sweep_dir` (each directory with a trial.json) as CSV rows, written
    to SWEEP_DIR/evaluations.csv: trials in `order` (directory names) first, the others by name. Each row
    names the command and commit of the last stretch that started before its evaluation."""
    from maac_robot.learn.trainer import read_metrics

    sweep_dir = Path(sweep_dir)
    found = sorted(p.parent for p in sweep_dir.glob(f"*/{TRIAL_FILE}"))
    rank = {name: i for i, name in enumerate(order)}
    found.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    rows = []
    for run_dir in found:
        info = json.loads((run_dir / TRIAL_FILE).read_text())
        stretches = info.get("stretches") or [{}]
        for m in read_metrics(run_dir / "metrics.jsonl"):
            stretch = next((s for s in reversed(stretches) if s.get("from_step", 0) < m["env_step"]), stretches[0])
            rows.append({"variant": info["variant"], "overrides": _overrides_text(info["overrides"]),
                         "seed": info["seed"], **evaluation_fields(m), "planned_steps": info["planned_steps"],
                         "run": run_dir.name, "config": info["config"], "config_digest": info["config_digest"],
                         "command": stretch.get("command", ""), "commit": stretch.get("commit", "")})
    write_rows(sweep_dir / CSV_NAME, rows, SWEEP_COLUMNS)
    return rows


def sweep_command(config: str | Path, seeds: Sequence[int], grid: Sequence[str], sets: Sequence[str],
                  steps: int | None, out: str | Path, address: str | None, cpus_per_trial: int) -> str:
    """The canonical `maac-robot sweep` line for these choices: what a row's `command` says to rerun."""
    argv = ["maac-robot", "sweep", "--config", str(config), "--seeds", *map(str, seeds)]
    argv += [a for g in grid for a in ("--grid", g)] + [a for s in sets for a in ("--set", s)]
    argv += ["--steps", str(steps)] if steps is not None else []
    argv += ["--out", str(out)] + (["--address", address] if address else [])
    argv += ["--cpus-per-trial", str(cpus_per_trial)] if cpus_per_trial != 1 else []
    return shlex.join(argv)


@dataclass
class SweepResult:
    trials: list[Trial]
    states: dict[str, tuple[str, int | None]]  # before this call, by trial name
    results: dict[str, dict[str, Any]]
    errors: dict[str, BaseException]
    rows: list[dict[str, Any]]


def run_sweep(config: str | Path, seeds: Sequence[int], out: str | Path, grid: Sequence[str] = (),
              sets: Sequence[str] = (), steps: int | None = None, address: str | None = None,
              cpus_per_trial: int = 1, command: str | None = None,
              on_plan: Callable[[list[Trial], dict[str, tuple[str, int | None]]], None] | None = None,
              on_result: Callable[[Trial, dict[str, Any] | None, BaseException | None], None] | None = None,
              variants: Sequence[Sequence[str]] | None = None) -> SweepResult:
    """Plan the sweep, run its unfinished trials (`run_trials`; Ray is not started when none is) and write
    OUT/evaluations.csv, also after each trial ends. The programmatic twin of `maac-robot sweep`; with
    `variants` (an explicit variant list, see `plan`) it has no CLI twin, so `command` must say how to rerun it."""
    out = Path(out)
    if variants is not None and command is None:
        raise SweepError("a sweep of explicit variants has no `maac-robot sweep` line: pass the command that reruns it")
    trials = plan(config, seeds, grid, sets, steps, out, cpus_per_trial, variants)
    states = {t.name: trial_state(t) for t in trials}
    if on_plan is not None:
        on_plan(trials, states)
    command = command or sweep_command(config, seeds, grid, sets, steps, out, address, cpus_per_trial)
    commit = source_commit()
    out.mkdir(parents=True, exist_ok=True)
    order = [t.name for t in trials]
    meta = {"command": command, "commit": commit, "config": str(config), "grid": list(grid), "sets": list(sets),
            "seeds": list(seeds), "steps": steps, "trials": order}
    if variants is not None:
        meta["variants"] = [list(v) for v in variants]
    atomic_write(out / SWEEP_FILE, (json.dumps(meta, indent=1) + "\n").encode())
    todo = [t for t in trials if states[t.name][0] != "done"]
    for t in todo:
        write_trial_record(t, *states[t.name], command=command, commit=commit, config=str(config))
    for t in trials:
        if states[t.name][0] == "done" and not (t.run_dir / TRIAL_FILE).is_file():
            write_trial_record(t, "done", None, command=command, commit=commit, config=str(config))
    results: dict[str, dict[str, Any]] = {}

    def ended(trial: Trial, result: dict[str, Any] | None, error: BaseException | None) -> None:
        if result is not None:
            results[trial.name] = result
        collect(out, order)
        if on_result is not None:
            on_result(trial, result, error)

    errors = run_trials(todo, address, cpus_per_trial, on_result=ended) if todo else {}
    return SweepResult(trials, states, results, errors, collect(out, order))


# ---- the command -------------------------------------------------------------------------------------------


def sweep_from_cli(config: str | Path, seeds: Sequence[int], out: str | Path, grid: Sequence[str] = (),
                   sets: Sequence[str] = (), steps: int | None = None, address: str | None = None,
                   cpus_per_trial: int = 1) -> int:
    """`maac-robot sweep`: prints the plan, one line per trial as it ends, and where the CSV is."""
    _ray()  # before anything is planned: a missing extra is one line, at once
    done, total = [0], [0]

    def planned(trials: list[Trial], states: dict[str, tuple[str, int | None]]) -> None:
        variants = list(dict.fromkeys(t.variant for t in trials))
        kinds = [s for s, _ in states.values()]
        print(f"sweep {out}: {len(variants)} variant{'s' * (len(variants) != 1)} x {len(seeds)} seed"
              f"{'s' * (len(seeds) != 1)} = {len(trials)} trials of {trials[0].steps} env steps "
              f"({kinds.count('done')} done, {kinds.count('resume')} to resume from their checkpoints, "
              f"{kinds.count('new')} new); {cpus_per_trial} CPU and torch thread"
              f"{'s' * (cpus_per_trial != 1)} per trial, on "
              f"{'the Ray cluster at ' + address if address else 'a local Ray instance'}", flush=True)
        done[0], total[0] = kinds.count("done"), len(trials)

    def ended(trial: Trial, result: dict[str, Any] | None, error: BaseException | None) -> None:
        done[0] += 1
        head = f"[{done[0]}/{total[0]}] {trial.name}:"
        if error is not None:
            lines = str(error).strip().splitlines()
            print(f"{head} failed: {type(error).__name__}: {lines[-1] if lines else ''}", file=sys.stderr, flush=True)
            return
        assert result is not None
        last = result["last"]
        tail = f", last evaluation {last['eval_return_mean']:.1f} ± {last['eval_return_std']:.1f}" if last else ""
        frm = f" (resumed at {result['from_step']})" if result["from_step"] else ""
        print(f"{head} {result['env_step']} env steps{frm}{tail}", flush=True)

    try:
        outcome = run_sweep(config, seeds, out, grid, sets, steps, address, cpus_per_trial, on_plan=planned,
                            on_result=ended)
    except KeyboardInterrupt:
        print("interrupted; every trial keeps its last checkpoint: rerun the same command to resume", file=sys.stderr)
        raise
    csv_path = Path(out) / CSV_NAME
    print(f"{csv_path}: {len(outcome.rows)} evaluations of {len({r['run'] for r in outcome.rows})} trials; "
          f"maac-robot report {shlex.quote(str(out))}")
    if outcome.errors:
        print(f"{len(outcome.errors)} trial{'s' * (len(outcome.errors) != 1)} failed: "
              f"{', '.join(outcome.errors)}; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
